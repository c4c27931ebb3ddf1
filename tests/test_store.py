"""camexport.store on hand-made arrays (no model): resumable result writing, the live view, the
finished file, input datasets, ResultReader, edit_results, and render/recompute reading through
them."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from camexport import store
from camexport.store import InputData, ResultReader, ResultWriter, StoreError, edit_results, summary

COUNT = 5
SIZE = (4, 4)
CLASSES = 3
FINGERPRINT = {"graph_sha256": "abc", "count": COUNT, "parameters": {"methods": ["gradcam"], "seed": 0}}
MANIFEST = {"preprocessing": {"size": list(SIZE), "mean": [0.5] * 3, "std": [0.25] * 3},
            "layers": [{"name": "conv", "layout": {"kind": "NCHW", "grid": list(SIZE)}}]}


def _arrays(start: int, stop: int) -> dict[str, np.ndarray]:
    """Every array of samples start..stop, each value telling its sample apart."""
    rows = np.arange(start, stop)
    n = len(rows)
    cams = (rows[:, None, None] + np.arange(16, dtype=np.float32).reshape(SIZE)) / 32
    return {"outputs/logits": (rows[:, None] * 10 + np.arange(CLASSES)).astype(np.float32),
            "targets": rows % CLASSES,
            "cams/gradcam": cams.astype(np.float32),
            "metrics/drop-in-confidence/gradcam": (rows / 10).astype(np.float32),
            "invalid": rows == 3,
            "activations/conv": np.full((n, 2, *SIZE), 1, np.float32) * rows[:, None, None, None],
            "gradients/conv": np.ones((n, 2, *SIZE), np.float32)}


def _writer(path, fingerprint=FINGERPRINT, **kwargs) -> ResultWriter:
    attrs = {"camexport_version": "test", "provider": "CPUExecutionProvider", "manifest": MANIFEST,
             "methods": ["gradcam"], "data": "nowhere.h5"}
    return ResultWriter(path, COUNT, fingerprint, attrs, **kwargs)


def _finished(tmp_path, name="out.h5"):
    out = tmp_path / name
    writer = _writer(out)
    writer.write(0, _arrays(0, 3))
    writer.write(3, _arrays(3, 5))
    writer.finish({"labels": np.array([2, 1, 0, -1, 2], np.int64),
                   "names": np.array([f"img{i}.png" for i in range(COUNT)], dtype=h5py.string_dtype())})
    return out


def test_writer_shards_resume_and_fingerprint(tmp_path):
    out = tmp_path / "out.h5"
    writer = _writer(out)
    assert not writer.done().any() and not writer.complete
    writer.write(0, _arrays(0, 2))
    writer.write(3, _arrays(3, 5))
    assert [(start, stop) for start, stop, _ in writer.shards()] == [(0, 2), (3, 5)]
    np.testing.assert_array_equal(writer.done(), [True, True, False, True, True])
    with h5py.File(writer.shards()[1][2]) as shard:  # a shard holds its rows, and done
        np.testing.assert_array_equal(shard["cams/gradcam"][()], _arrays(3, 5)["cams/gradcam"])
        np.testing.assert_array_equal(shard["done"][()], [True, True])
    assert not list(writer.parts.glob(".*.partial"))
    again = _writer(out)  # the same run: resumes
    np.testing.assert_array_equal(again.done(), [True, True, False, True, True])
    other = {**FINGERPRINT, "graph_sha256": "another"}
    with pytest.raises(StoreError, match="--overwrite"):
        _writer(out, fingerprint=other)
    assert len(again.shards()) == 2  # refusing touched nothing
    fresh = _writer(out, fingerprint=other, overwrite=True)
    assert not fresh.done().any() and fresh.shards() == []


def test_shard_write_is_atomic(tmp_path, monkeypatch):
    """A failing shard write raises StoreError and leaves neither the shard nor a temporary."""
    writer = _writer(tmp_path / "out.h5")
    writer.write(0, _arrays(0, 2))

    def full(temporary, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "replace_atomic", full)
    with pytest.raises(StoreError, match="free space"):
        writer.write(2, _arrays(2, 4))
    assert sorted(p.name for p in writer.parts.iterdir()) == ["run.json", "shard-000000000-000000002.h5"]
    np.testing.assert_array_equal(writer.done(), [True, True, False, False, False])


def test_live_view_reads_done_rows_while_incomplete(tmp_path):
    out = tmp_path / "out.h5"
    writer = _writer(out)
    writer.publish()  # before any batch: readable, nothing done
    with ResultReader(out) as results:
        assert not results.complete and results.count == 0 and results.done.shape == (0,)
        assert results.methods == []
    writer.write(0, _arrays(0, 2))
    writer.write(3, _arrays(3, 5))
    writer.publish()
    with ResultReader(out) as results:
        assert not results.complete and results.count == COUNT
        np.testing.assert_array_equal(results.done, [True, True, False, True, True])
        assert results.storage("cams/gradcam").virtual
        rows = np.flatnonzero(results.done)
        written = np.concatenate([_arrays(0, 2)["cams/gradcam"], _arrays(3, 5)["cams/gradcam"]])
        np.testing.assert_array_equal(results.cams("gradcam", rows), written)
        assert np.isnan(results.cams("gradcam", 2)).all()  # not done: the fill value
        assert results.targets(2) == -1
        np.testing.assert_array_equal(results.invalid, [False, False, False, True, False])
    info = summary(out)
    assert (info["samples"], info["done"], info["invalid"], info["complete"]) == (5, 4, 1, False)


def test_finish_gives_one_self_contained_file(tmp_path):
    out = _finished(tmp_path)
    assert not out.with_name("out.h5.parts").exists()
    assert not list(tmp_path.glob(".*.partial"))
    whole = {k: np.concatenate([_arrays(0, 3)[k], _arrays(3, 5)[k]]) for k in _arrays(0, 1)}
    with ResultReader(out) as results:
        assert results.complete and results.done.all() and results.count == COUNT
        cams = results.storage("cams/gradcam")
        assert not cams.virtual and cams.chunks == (1, *SIZE) and cams.compression == "gzip"
        assert cams.shape == (COUNT, *SIZE) and cams.dtype == np.float32
        np.testing.assert_array_equal(results.cams("gradcam"), whole["cams/gradcam"])
    # the file stands alone: readable with the parts folder gone, by plain h5py too
    with h5py.File(out) as h5:
        assert not any(h5[name].is_virtual for name in ("done", "cams/gradcam", "outputs/logits"))


def test_result_reader_api(tmp_path):
    out = _finished(tmp_path)
    whole = {k: np.concatenate([_arrays(0, 3)[k], _arrays(3, 5)[k]]) for k in _arrays(0, 1)}
    with ResultReader(out) as results:
        assert results.attrs["manifest"] == MANIFEST and results.manifest == MANIFEST
        assert results.fingerprint == FINGERPRINT and results.parameters == FINGERPRINT["parameters"]
        assert results.attrs["methods"] == ["gradcam"] and results.attrs["provider"] == "CPUExecutionProvider"
        assert results.attrs["complete"] is True
        assert results.methods == ["gradcam"] and results.output_names == ["logits"]
        assert results.metrics == {"drop-in-confidence": ["gradcam"]}
        assert not results.detector
        np.testing.assert_array_equal(results.outputs(), whole["outputs/logits"])
        np.testing.assert_array_equal(results.outputs("logits", [1, 3]), whole["outputs/logits"][[1, 3]])
        np.testing.assert_array_equal(results.targets(), [0, 1, 2, 0, 1])
        np.testing.assert_array_equal(results.metric("drop-in-confidence", "gradcam"),
                                      np.float32([0, 0.1, 0.2, 0.3, 0.4]))
        np.testing.assert_array_equal(results.cams("gradcam", 4), whole["cams/gradcam"][4])
        np.testing.assert_array_equal(results.activations("conv", slice(1, 3)),
                                      whole["activations/conv"][1:3])
        np.testing.assert_array_equal(results.gradients("conv"), whole["gradients/conv"])
        np.testing.assert_array_equal(results.read("targets", 2), 2)
        np.testing.assert_array_equal(results.labels, [2, 1, 0, -1, 2])
        assert results.names == [f"img{i}.png" for i in range(COUNT)]
        assert results.has("gradients/conv") and not results.has("detections")
        with pytest.raises(KeyError):
            results.cams("layercam")
    info = summary(out)
    valid = np.float32([0, 0.1, 0.2, 0.4])  # sample 3 is invalid
    assert info["metrics"] == {"drop-in-confidence": {"gradcam": pytest.approx(float(valid.mean()))}}
    assert info["methods"] == ["gradcam"] and info["outputs"] == ["logits"] and info["invalid"] == 1


def test_result_reader_refuses_other_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ResultReader(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["done"] = np.ones(2, bool)
    with pytest.raises(StoreError, match="not a camexport result"):
        ResultReader(other)


def _detector_results(tmp_path) -> tuple:
    """A finished detector result: 2 images, up to 3 detections each (NaN / -1 padded)."""
    out = tmp_path / "det.h5"
    boxes = np.full((2, 3, 4), np.nan, np.float32)
    scores = np.full((2, 3), np.nan, np.float32)
    labels = np.full((2, 3), -1, np.int32)
    boxes[0, :2] = [[0, 0, 2, 2], [1, 1, 3, 3]]
    scores[0, :2] = [0.9, 0.4]
    labels[0, :2] = [7, 5]
    boxes[1, :1] = [[2, 0, 4, 2]]
    scores[1, :1] = [0.8]
    labels[1, :1] = [5]
    fingerprint = {**FINGERPRINT, "parameters": {"detection_threshold": 0.5}}
    writer = ResultWriter(out, 2, fingerprint, {"manifest": MANIFEST})
    writer.write(0, {"detections/boxes": boxes, "detections/scores": scores, "detections/labels": labels,
                     "detections/count": np.int32([2, 1]), "targets": np.int64([-1, -1]),
                     "cams/gradcam": np.zeros((2, *SIZE), np.float32), "invalid": np.zeros(2, bool)})
    writer.finish({})
    return out, boxes, scores, labels


def test_result_reader_detections(tmp_path):
    out, boxes, scores, labels = _detector_results(tmp_path)
    with ResultReader(out) as results:
        assert results.detector and results.output_names == []
        first = results.detections(0)
        assert len(first) == 2
        np.testing.assert_array_equal(first.boxes, boxes[0, :2])
        np.testing.assert_array_equal(first.scores, scores[0, :2])
        np.testing.assert_array_equal(first.labels, labels[0, :2])
        np.testing.assert_array_equal(first.labels, [7, 5])
        np.testing.assert_array_equal(first.anchors, [0, 0])
        second = results.detections(1)
        np.testing.assert_array_equal(second.boxes, boxes[1, :1])
        assert np.isnan(results.read("detections/scores", 1)[1:]).all()
        np.testing.assert_array_equal(results.read("detections/labels", 1), [5, -1, -1])
        assert results.storage("detections/boxes").shape == (2, 3, 4)
        with pytest.raises(KeyError, match="no /outputs"):
            results.outputs()


def test_edit_results_is_all_or_nothing(tmp_path):
    out = _finished(tmp_path)
    before = out.read_bytes()
    with pytest.raises(RuntimeError, match="midway"), edit_results(out) as edit:
        edit.replace_cams("gradcam", (COUNT, *SIZE))[0] = 1
        edit.set_attr("recomputed", ["gradcam"])
        raise RuntimeError("midway")
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".*.partial"))
    with edit_results(out) as edit:
        assert edit.reader.methods == ["gradcam"]
        cams = edit.replace_cams("layercam", (COUNT, *SIZE))
        cams[[1, 2]] = np.full((2, *SIZE), 0.5, np.float32)
        edit.set_attr("recomputed", ["layercam"])
        assert edit.reader.attrs["recomputed"] == ["layercam"]
    assert not list(tmp_path.glob(".*.partial"))
    with ResultReader(out) as results:
        assert results.methods == ["gradcam", "layercam"]
        np.testing.assert_array_equal(results.cams("layercam")[:, 0, 0], [0, 0.5, 0.5, 0, 0])
        assert results.storage("cams/layercam").chunks == (1, *SIZE)
        assert results.attrs["recomputed"] == ["layercam"]
    with h5py.File(out) as h5:  # stored as JSON text, as before
        assert json.loads(h5.attrs["recomputed"]) == ["layercam"]


def test_input_data(tmp_path):
    path = tmp_path / "in.h5"
    images = [(f"p{i}.png", np.full((6, 5, 3), i, np.uint8), label) for i, label in enumerate([4, -1, 2])]
    assert store.write_input(path, iter(images), (6, 5)) == 3
    data = InputData.open(path)
    try:
        assert len(data) == 3 and data.image_shape == (6, 5, 3) and not data.preprocessed
        np.testing.assert_array_equal(data.images(1, 3), np.stack([images[1][1], images[2][1]]))
        np.testing.assert_array_equal(data.labels, [4, -1, 2])
        assert data.labels.dtype == np.int64
        assert data.names == ["p0.png", "p1.png", "p2.png"]
        assert data.identity()["shape"] == [3, 6, 5, 3]
    finally:
        data.close()
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as h5:
        h5["images"] = np.zeros((2, 3, 4, 4), np.float32)
    data = InputData.open(bare)
    assert data.preprocessed and data.labels is None and data.names is None
    data.close()
    with h5py.File(bare, "w") as h5:
        h5["pictures"] = np.zeros(3)
    with pytest.raises(StoreError, match="no /images"):
        InputData.open(bare)


def test_render_reads_through_the_reader(tmp_path):
    """render_results on hand-made classifier results: one PNG per valid sample, the metric table."""
    from camexport.render import RenderError, render_results

    data = tmp_path / "in.h5"
    store.write_input(data, iter((f"p{i}.png", np.full((4, 4, 3), 40 * i, np.uint8), -1)
                                 for i in range(COUNT)), SIZE)
    out = tmp_path / "out.h5"
    writer = ResultWriter(out, COUNT, FINGERPRINT, {"manifest": MANIFEST, "data": str(data)})
    writer.write(0, _arrays(0, COUNT))
    writer.finish({})
    written = render_results(out, tmp_path / "pics")
    assert [p.name for p in written] == ["000000.png", "000001.png", "000002.png", "000004.png"]
    page = (tmp_path / "pics" / "index.html").read_text()
    assert "<td>0.4000</td>" in page and "predicted <b>2</b>" in page
    with pytest.raises(RenderError):
        render_results(out, tmp_path / "pics", indices=[7])


def test_recompute_from_saved_tensors(tmp_path):
    """Grad-CAM from hand-made activations (the channel-0 pattern, gradients of one): the
    pattern, min-max normalised; the invalid sample keeps a zero map; the attribute records it."""
    from camexport.recompute import recompute
    from camexport.run import RunError

    out = tmp_path / "out.h5"
    pattern = np.zeros(SIZE, np.float32)
    pattern[1:3, 0:2] = 2
    arrays = _arrays(0, COUNT)
    arrays["activations/conv"] = np.zeros((COUNT, 2, *SIZE), np.float32)
    arrays["activations/conv"][:, 0] = pattern
    writer = _writer(out)
    writer.write(0, arrays)
    writer.publish()
    with pytest.raises(RunError, match="not finished"):
        recompute(out, ["gradcam"])
    writer.finish({})
    with pytest.raises(RunError, match="need the model"):
        recompute(out, ["scorecam"])
    assert recompute(out, ["gradcam"], batch_size=2) == ["gradcam"]
    with ResultReader(out) as results:
        cams = results.cams("gradcam")
        assert results.attrs["recomputed"] == ["gradcam"]
    for i in (0, 1, 2, 4):
        np.testing.assert_allclose(cams[i], pattern / 2, atol=1e-6)
    np.testing.assert_array_equal(cams[3], 0)
    assert not list(tmp_path.glob(".*.partial"))
