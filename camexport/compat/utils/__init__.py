"""pytorch_grad_cam.utils counterparts."""
