"""pytorch_grad_cam.metrics counterparts."""
