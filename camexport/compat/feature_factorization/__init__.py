"""pytorch_grad_cam.feature_factorization counterparts."""
