"""The CLI as the tests call it in-process (click's runner, exceptions not caught)."""

from click.testing import CliRunner

from camexport.cli import main


def cli(*args, ok: bool = True):
    """``camexport ARGS`` (each argument str()-ed); with ``ok``, asserts exit code 0."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def tiny_workspace(root, size: int, samples: int, methods: str, width_extra: int = 8):
    """A tiny CNN (conv-relu-conv-relu-pool-linear, 10 classes, seeded) saved as ``root/tiny.pt``
    and built for its last ReLU at size x size into ``root/art``; ``samples`` random images
    (size x size + width_extra, seeded) packed into ``root/data.h5``. Returns ``root``."""
    import cv2
    import numpy as np
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    torch.save(model, root / "tiny.pt")
    cli("build", root / "tiny.pt", "--layer", "3", "--trust-pickle", "--input-size", size, size,
        "--methods", methods, "--out", root / "art", "-q")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(samples):
        image = rng.integers(0, 256, (size, size + width_extra, 3), np.uint8)
        cv2.imwrite(str(images / f"img{i:03d}.png"), image)
    cli("pack", images, "--out", root / "data.h5", "--size", size, "-q")
    return root
