"""pytorch_grad_cam.metrics: the same modules, names and signatures, computed by camexport's
metric driver and imputer (:mod:`camexport.metrics`, :mod:`camexport.imputation`); the model and
user callables run in torch. Deliberate differences: see
:mod:`camexport.compat.metrics.perturbation_confidence`.
"""
