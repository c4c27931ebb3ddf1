"""pytorch_grad_cam.guided_backprop: the model class, and the guided ReLU for torch users."""

from __future__ import annotations

import torch

from camexport.compat.cams import GuidedBackpropReLUModel


class GuidedBackpropReLU(torch.autograd.Function):
    """Y = relu(X); dX = dY [X > 0] [dY > 0] (Springenberg et al. 2015)."""

    @staticmethod
    def forward(self, input_img):  # noqa: PLW0211 (pgc names the context self)
        self.save_for_backward(input_img)
        return input_img.clamp(min=0)

    @staticmethod
    def backward(self, grad_output):  # noqa: PLW0211
        (input_img,) = self.saved_tensors
        return grad_output * (input_img > 0).to(grad_output.dtype) * (grad_output > 0).to(grad_output.dtype)


class GuidedBackpropReLUasModule(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, input_img):
        return GuidedBackpropReLU.apply(input_img)


__all__ = ["GuidedBackpropReLU", "GuidedBackpropReLUModel", "GuidedBackpropReLUasModule"]
