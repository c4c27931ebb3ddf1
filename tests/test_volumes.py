"""3-D models (5-D input: clips or volumes) against pytorch-grad-cam 1.5.7's 3-D path.

torchvision r3d_18 (random weights, seeded, random batch-norm statistics: zoo.randomise), input
(2, 3, 16, 64, 64), layer4 -> A (2, 512, 2, 4, 4); CAMs are volumes (B, D, H, W) resized as pgc
does (scipy's cubic ``zoom``, reference §2.4 and §2.6). Tolerance: max |diff| <= 1e-4 on maps in
[0, 1], as the 2-D parity tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from zoo import one_model_at_a_time, randomise

from camexport.explain import Explainer

TOLERANCE = 1e-4
SIZE = (16, 64, 64)
CLASSES = (3, 17)
#: every method pgc 1.5.7 runs on 3-D inputs (reference §2.6), but RandomCAM (random weights)
METHODS = {
    "gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcamelementwise": pgc.GradCAMElementWise,
    "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM, "eigengradcam": pgc.EigenGradCAM, "kpcacam": pgc.KPCA_CAM,
    "fem": pgc.FEM,
}

pytestmark = pytest.mark.xdist_group("r3d_18")


@one_model_at_a_time
def prepared(name: str, root: str):
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    model = r3d_18().eval()
    model = randomise(model)
    path = f"{root}/r3d_18.pt"
    torch.save(model, path)
    from click.testing import CliRunner

    from camexport.cli import main

    built = CliRunner().invoke(main, ["build", path, "--layer", "layer4", "--trust-pickle", "--depth",
                                      str(SIZE[0]), "--input-size", *map(str, SIZE[1:]), "--out",
                                      f"{root}/r3d_18", "-q"])
    assert built.exit_code == 0, built.output
    x = np.random.default_rng(0).standard_normal((2, 3, *SIZE)).astype(np.float32)
    explainer = Explainer(f"{root}/r3d_18")
    return model, explainer, explainer.manifest, x


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("volumes"))


def test_manifest_records_a_volume_layer(root):
    _, _, manifest, _ = prepared("r3d_18", root)
    assert manifest["layers"][0]["layout"] == {"kind": "NCDHW"}
    assert manifest["layers"][0]["shape"] == [None, 512, 2, 4, 4]
    assert manifest["preprocessing"]["size"] == list(SIZE)


@pytest.mark.parametrize("targets", ["none", "class"])
@pytest.mark.parametrize("method", list(METHODS))
def test_volume_cams_match_pgc(method, targets, root):
    model, explainer, _, x = prepared("r3d_18", root)
    ours = explainer(x, targets=None if targets == "none" else list(CLASSES), methods=[method])
    theirs_t = None if targets == "none" else [ClassifierOutputTarget(c) for c in CLASSES]
    with METHODS[method](model=model, target_layers=[model.layer4]) as cam:
        theirs = cam(input_tensor=torch.tensor(x), targets=theirs_t)
    assert ours.cams[method].shape == theirs.shape == (2, *SIZE)
    diff = np.abs(ours.cams[method] - theirs).max()
    print(f"r3d_18 {method} targets={targets}: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE, f"{method}: max |diff| {diff:.2e}"


def test_run_writes_volume_cams_to_hdf5(root):
    """camexport run on (N, 3, D, H, W) float32 inputs: /cams/<method> (N, D, H, W), equal to the
    Python API's volumes; render draws the middle slice; metrics (2-D only) are refused clearly."""
    import h5py
    from click.testing import CliRunner

    from camexport.cli import main
    from camexport.store import ResultReader

    _, explainer, _, x = prepared("r3d_18", root)
    data, out = f"{root}/clips.h5", f"{root}/clips-out.h5"
    with h5py.File(data, "w") as h5:
        h5["images"] = np.concatenate([x, x[::-1]])

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    refused = cli("run", f"{root}/r3d_18", "--data", data, "--out", out, "--metrics", "road-combined", "-q")
    assert refused.exit_code != 0 and "run without --metrics" in refused.output
    ran = cli("run", f"{root}/r3d_18", "--data", data, "--out", out, "--methods", "gradcam,eigencam",
              "--batch-size", "3", "-q")
    assert ran.exit_code == 0, ran.output
    expected = explainer(np.concatenate([x, x[::-1]]), methods=["gradcam", "eigencam"])
    with ResultReader(out) as results:
        for name in ("gradcam", "eigencam"):
            assert results.storage(f"cams/{name}").shape == (4, *SIZE)
            np.testing.assert_allclose(results.cams(name), expected.cams[name], atol=1e-6)
        assert results.done.all()
    drawn = cli("render", out, "--out", f"{root}/render", "--index", "0,1")
    assert drawn.exit_code == 0, drawn.output
    assert sorted(p.name for p in Path(f"{root}/render").glob("*.png")) == ["000000.png", "000001.png"]
