"""The README's main job, on the first photos: real pretrained EfficientNet-Lite0, real photos."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_default_pipeline_explains_the_cat(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "default.py"), "--artifact", str(tmp_path / "art"),
         "--out", str(tmp_path / "results"), "--limit", "3"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(tmp_path / "results" / "default.h5") as h5:
        names = [n.decode() for n in h5["names"][:]]
        assert names == ["chelsea", "coffee", "astronaut"]
        targets = h5["targets"][:]
        assert 281 <= targets[0] <= 285  # a domestic cat class for Chelsea
        assert targets[1] == 967  # espresso
        for method in ("gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "ablationcam",
                       "fullgrad"):
            cams = h5[f"cams/{method}"][:]
            assert cams.shape == (3, 224, 224) and cams.dtype == np.float32
            assert cams.min() >= 0 and 0.99 <= cams.max() <= 1
        # the cat's CAM is on the cat: its face fills the photo's centre
        gradcam = h5["cams/gradcam"][0]
        assert gradcam[56:168, 56:168].mean() > 2 * gradcam[:, :28].mean()
    pictures = sorted((tmp_path / "results" / "default").glob("*.png"))
    assert [p.name for p in pictures] == ["00_chelsea.png", "01_coffee.png", "02_astronaut.png"]
