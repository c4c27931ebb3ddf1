"""First call on a lent GPU machine: does camexport export and run there (its torch, CPU
onnxruntime)? A resnet18 GradCAM through build + Explainer in well under a minute."""

import tempfile
import time

import numpy as np
import torch
import torchvision

from camexport.build import build
from camexport.explain import Explainer
from camexport.load import Preprocessing, from_module

start = time.perf_counter()
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
folder = tempfile.mkdtemp()
build(from_module(model, "resnet18", Preprocessing(size=(64, 64))), ["layer4"], methods="gradcam",
      out_dir=folder)
x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
cams = Explainer(folder)(x, None, methods=["gradcam"]).cams["gradcam"]
print("gradcam", cams.shape, float(cams.max()), f"{time.perf_counter() - start:.1f} s", flush=True)
