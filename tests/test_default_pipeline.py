"""The README's main job (pipelines/efficientnet_lite0.sh) on the first photos: the real
pretrained EfficientNet-Lite0, real photos, every default method and ROAD, through the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from camexport.store import ResultReader

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("default-pipeline")
def test_default_pipeline_explains_the_cat(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OUT": str(tmp_path / "results"), "ARTIFACT": str(tmp_path / "art"),
           "CAMEXPORT": str(bin_dir / "camexport")}
    done = subprocess.run(["bash", str(ROOT / "pipelines" / "efficientnet_lite0.sh"), "--limit", "3"],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    methods = [m for line in (ROOT / "pipelines" / "efficientnet_lite0.sh").read_text().splitlines()
               if line.startswith("METHODS=") for m in line.split(":-")[1].rstrip("}").split(",")]
    assert len(methods) >= 14
    with ResultReader(tmp_path / "results" / "default.h5") as results:
        assert results.attrs["complete"] and results.done.all() and len(results.done) == 3
        names = results.names
        assert names == ["astronaut.png", "chelsea_281.png", "coffee_967.png"]
        targets = results.targets()
        assert 281 <= targets[1] <= 285  # a domestic cat class for Chelsea
        assert targets[2] == 967  # espresso
        assert set(results.methods) == set(methods)
        for method in methods:
            cams = results.cams(method)
            assert cams.shape == (3, 224, 224) and cams.dtype == np.float32, method
            assert cams.min() >= 0 and 0.99 <= cams.max() <= 1, method
            road = results.metric("road-combined:20,40,60,80", method)
            assert road.shape == (3,) and np.isfinite(road).all(), method
        # the cat's CAM is on the cat: her face fills the photo's centre
        gradcam = results.cams("gradcam", 1)
        assert gradcam[56:168, 56:168].mean() > 2 * gradcam[:, :28].mean()
    pictures = sorted((tmp_path / "results" / "default").glob("*.png"))
    assert len(pictures) == 3
    page = (tmp_path / "results" / "default" / "index.html").read_text()
    assert "espresso" in page and "road-combined" in page
    assert "3/3 samples done (complete)" in done.stdout
