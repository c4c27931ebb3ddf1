"""TEMP stub."""
import torch


class AblationLayer(torch.nn.Module):
    pass


class AblationLayerVit(AblationLayer):
    pass


class AblationLayerFasterRCNN(AblationLayer):
    pass
