"""Embedding models: explaining the cosine similarity of an embedding to a concept embedding given
at run time (pgc's embeddings tutorial, its SimilarityToConceptTarget), image-to-image
similarity, and CLIP-style text concepts (open_clip's RN50 with random weights: no downloads).

The concept enters at run time: the graph's ``target_weights`` input carries dt/dz of the
similarity (camexport.targets.SimilarityToConceptTarget), so one artifact explains any concept.
Tolerance: max |diff| <= 1e-4 on maps in [0, 1], as the classifier parity tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from zoo import one_model_at_a_time

from camexport.build import build
from camexport.explain import Explainer
from camexport.targets import SimilarityToConceptTarget, TargetError

TOLERANCE = 1e-4
METHODS = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
           "scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}


class TutorialTarget:
    """pgc's embeddings tutorial target, as its notebook defines it."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


@one_model_at_a_time
def prepared(name: str, root: str):
    """(torch embedding model, explainer, layer module, inputs, concept embeddings)."""
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    if name == "resnet18-embedding":
        import torchvision

        model = torchvision.models.resnet18()
        model.fc = torch.nn.Identity()  # a 512-d embedding
        model.eval()
        layer, tensor_layer = model.layer4, "layer4"
        with torch.no_grad():
            concepts = model(torch.tensor(x[2:])).numpy()  # image 2's embedding
    else:  # CLIP RN50 at 64 x 64: the image tower explained against text embeddings
        import open_clip

        clip = open_clip.create_model("RN50", pretrained=None, force_image_size=64).eval()
        tokenizer = open_clip.get_tokenizer("RN50")
        with torch.no_grad():
            concepts = clip.encode_text(tokenizer(["a photo of a dog", "a photo of a cat"])).numpy()
        model, layer, tensor_layer = clip.visual, clip.visual.layer4, "layer4"
    path = f"{root}/{name}.pt"
    torch.save(model, path)
    built = build(path, [tensor_layer], trust_pickle=True, input_size=(64, 64), out_dir=f"{root}/{name}",
                  overwrite=True)  # a model the tests come back to is prepared again
    return model, Explainer(built.directory), layer, x, concepts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embeddings"))


@pytest.mark.xdist_group("resnet18-embedding")
@pytest.mark.parametrize("method", list(METHODS))
def test_image_to_image_similarity_matches_pgc(method, root):
    """Images 0 and 1 explained by their similarity to image 2's embedding."""
    model, explainer, layer, x, concepts = prepared("resnet18-embedding", root)
    n = 1 if method in ("scorecam", "ablationcam") else 2  # 512 model runs per image: one image
    ours = explainer(x[:n], targets=[SimilarityToConceptTarget(concepts[0])] * n, methods=[method])
    with METHODS[method](model=model, target_layers=[layer]) as cam:
        theirs = cam(input_tensor=torch.tensor(x[:n]),
                     targets=[TutorialTarget(torch.tensor(concepts[0]))] * n)
    diff = np.abs(ours.cams[method] - theirs).max()
    print(f"resnet18 embedding {method}: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE, f"{method}: max |diff| {diff:.2e}"


@pytest.mark.xdist_group("clip-rn50")
def test_clip_text_concepts_match_pgc(root):
    """'a photo of a dog' and 'a photo of a cat' on the same images: each text embedding is a
    run-time concept for one artifact of the image tower; the two maps differ. (GradCAM's map
    is all zero on this random-weight tower: every channel-weighted sum is negative; GradCAM++
    and LayerCAM keep positive gradients only.)"""
    model, explainer, layer, x, texts = prepared("clip-rn50", root)
    for name in ("gradcam++", "layercam"):
        maps = {}
        for k, label in enumerate(("dog", "cat")):
            ours = explainer(x, targets=[SimilarityToConceptTarget(texts[k])] * 3, methods=[name])
            with METHODS[name](model=model, target_layers=[layer]) as cam:
                theirs = cam(input_tensor=torch.tensor(x),
                             targets=[TutorialTarget(torch.tensor(texts[k]))] * 3)
            diff = np.abs(ours.cams[name] - theirs).max()
            print(f"clip RN50 '{label}' {name}: max |diff| {diff:.2e}")
            assert diff <= TOLERANCE, f"{label} {name}: max |diff| {diff:.2e}"
            maps[label] = ours.cams[name]
        assert maps["dog"].max() > 0.99 and np.abs(maps["dog"] - maps["cat"]).max() > 0.01


@pytest.mark.xdist_group("resnet18-embedding")
def test_a_concept_of_the_wrong_size_is_a_clear_error(root):
    _, explainer, _, x, _ = prepared("resnet18-embedding", root)
    with pytest.raises(TargetError, match="has 10 values and the model output 512"):
        explainer(x[:1], targets=[SimilarityToConceptTarget(np.ones(10))], methods=["gradcam"])
    with pytest.raises(TargetError, match="not all zero"):
        SimilarityToConceptTarget(np.zeros(512))


@pytest.mark.xdist_group("resnet18-embedding")
def test_run_explains_a_dataset_against_a_concept_file(root):
    """camexport run --targets concept:FILE.npy: stored CAMs equal the API's, /targets is -1 (no
    class), metrics score the similarity itself; a concept of the wrong size is refused."""
    import h5py
    from click.testing import CliRunner

    from camexport.cli import main
    from camexport.metrics import evaluate
    from camexport.store import ResultReader

    _, explainer, _, x, concepts = prepared("resnet18-embedding", root)
    data, out, concept = f"{root}/embed.h5", f"{root}/embed-out.h5", f"{root}/concept.npy"
    with h5py.File(data, "w") as h5:
        h5["images"] = x
    np.save(concept, concepts[0])
    np.save(f"{root}/short.npy", concepts[0][:10])

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    refused = cli("run", f"{root}/resnet18-embedding", "--data", data, "--out", out,
                  "--targets", f"concept:{root}/short.npy", "-q")
    assert refused.exit_code != 0 and "expected (512,) for every sample" in refused.output
    ran = cli("run", f"{root}/resnet18-embedding", "--data", data, "--out", out, "--methods", "gradcam++",
              "--targets", f"concept:{concept}", "--metrics", "drop-in-confidence", "-q")
    assert ran.exit_code == 0, ran.output
    targets = [SimilarityToConceptTarget(concepts[0])] * 3
    expected = explainer(x, targets=targets, methods=["gradcam++"]).cams["gradcam++"]
    with ResultReader(out) as results:
        np.testing.assert_allclose(results.cams("gradcam++"), expected, atol=1e-6)
        assert (results.targets() == -1).all()
        scores = results.metric("drop-in-confidence", "gradcam++")
    np.testing.assert_allclose(
        scores, evaluate("drop-in-confidence", x, expected, targets, explainer.forward), atol=1e-5)
