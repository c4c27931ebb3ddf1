"""Overlays like pytorch-grad-cam's ``show_cam_on_image`` (reference §6)."""

from __future__ import annotations

import cv2
import numpy as np

from camexport.errors import CamexportError


class RenderError(CamexportError, ValueError):
    """A render that cannot be done as asked (a sample not in the results, a bad weight)."""


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5,
            colormap: int = cv2.COLORMAP_JET, use_rgb: bool = True) -> np.ndarray:
    """Float image in [0, 1] (H, W, 3) and a map in [0, 1] (H, W) -> uint8 blend (reference §6).

    heat = OpenCV colormap of uint8(255 cam) (truncation), as RGB (``use_rgb``, the default
    here) or OpenCV's BGR (pgc's ``show_cam_on_image`` default), / 255;
    v = (1 - w) heat + w image; v = v / max(v), then uint8(255 v) by truncation, in pgc's order
    (255 v / max(v) rounds to another integer in about one pixel in 200 000). The image must be in
    the heatmap's channel order.
    """
    image = np.asarray(image)
    if image.max() > 1:
        raise RenderError(f"the image must be float in [0, 1], its maximum is {image.max()}: "
                          f"divide a uint8 image by 255 (np.float32(img) / 255)")
    if not 0 <= image_weight <= 1:
        raise RenderError(f"the image weight (--image-weight, image_weight=) must be in [0, 1], "
                          f"got {image_weight}: it is the image's share of the blend, 0.5 by default")
    heat = cv2.applyColorMap(np.uint8(255 * cam), colormap)
    if use_rgb:
        heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    heat = np.float32(heat) / 255
    blend = (1 - image_weight) * heat + image_weight * image
    return np.uint8(255 * (blend / np.max(blend)))


def grid(tiles: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """Tiles side by side, each with its label written above."""
    height = tiles[0].shape[0]
    framed = []
    for tile, label in zip(tiles, labels):
        band = np.full((22, tile.shape[1], 3), 255, np.uint8)
        cv2.putText(band, label[:28], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        framed.append(np.concatenate([band, tile[:height]], axis=0))
    return np.concatenate(framed, axis=1)


def _display_image(raw: np.ndarray, preprocessing: dict) -> np.ndarray:
    """An input sample as RGB float in [0, 1] at the model's input size (volumes and clips
    (3, D, H, W): their middle slice, as :func:`_middle` picks it from the CAM)."""
    height, width = preprocessing["size"][-2:]
    if raw.ndim == 4:
        raw = raw[:, _middle(preprocessing)]
    if raw.dtype == np.uint8:
        return cv2.resize(raw, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    mean, std = (np.asarray(preprocessing[k], np.float32) for k in ("mean", "std"))
    return np.clip(raw.transpose(1, 2, 0) * std + mean, 0, 1).astype(np.float32)


def _middle(preprocessing: dict) -> int | slice:
    """The depth slice rendered for 3-D inputs (the middle one); everything for images."""
    size = preprocessing["size"]
    return size[0] // 2 if len(size) == 3 else slice(None)


#: The colour (RGB) of the detection boxes drawn on detector results.
BOX_COLOUR = (0, 255, 0)


def draw_boxes(tile: np.ndarray, boxes: np.ndarray, names: list[str]) -> np.ndarray:
    """A copy of an RGB uint8 tile with each box (x1, y1, x2, y2 in input pixels) outlined and
    named above its top-left corner."""
    tile = tile.copy()
    for (x1, y1, x2, y2), name in zip(np.round(boxes).astype(int), names):
        cv2.rectangle(tile, (int(x1), int(y1)), (int(x2), int(y2)), BOX_COLOUR, 1)
        cv2.putText(tile, name[:16], (int(x1) + 1, max(int(y1) - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.3, BOX_COLOUR, 1, cv2.LINE_AA)
    return tile


def draw_masks(tile: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A copy of an RGB uint8 tile with each (H, W) mask's pixels of probability at least 0.5
    tinted in the box colour, half opaque."""
    covered = (np.asarray(masks) >= 0.5).any(axis=0) if len(masks) else np.zeros(tile.shape[:2], bool)
    tile = tile.copy()
    tile[covered] = (tile[covered] * 0.5 + np.asarray(BOX_COLOUR) * 0.5).astype(np.uint8)
    return tile


def draw_keypoints(tile: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """A copy of an RGB uint8 tile with each keypoint (x, y[, visibility]) of ``keypoints``
    (n, K, D) drawn as a dot in the box colour, those of visibility under 0.5 left out (as
    Ultralytics' plotting does)."""
    tile = tile.copy()
    for point in np.asarray(keypoints, np.float32).reshape(-1, keypoints.shape[-1]):
        if len(point) > 2 and point[2] < 0.5 or not np.isfinite(point[:2]).all():
            continue
        centre = np.rint(point[:2]).astype(int)
        cv2.circle(tile, (int(centre[0]), int(centre[1])), 2, BOX_COLOUR, -1, cv2.LINE_AA)
    return tile


def _explained_detections(results, i: int):
    """The detections sample ``i``'s CAMs explain: those scoring at least the run's
    --detection-threshold (of the --targets class, if one). ``results``: a
    :class:`camexport.store.ResultReader`."""
    from camexport.detection import explained

    threshold = results.parameters["detection_threshold"]
    found = results.detections(i)
    target = int(results.targets(i))
    return found.select(explained(found, threshold, target if target >= 0 else None))


def read_class_names(path) -> list[str]:
    """One class name per line (ImageNet order for ImageNet models)."""
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def _metric_table(stored, i: int, methods: list[str], metrics: list[str]) -> str:
    """An HTML table of sample i's metric scores per method ('' without metrics)."""
    import html

    if not metrics:
        return ""
    header = "<tr><th>method</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in metrics) + "</tr>"
    table = "".join("<tr><td>" + html.escape(m) + "</td>" +
                    "".join(f"<td>{stored.metric(k, m, i):.4f}</td>" for k in metrics) + "</tr>"
                    for m in methods)
    return "<table>" + header + table + "</table>"


def _caption(i: int, name: str, headline: str, detector: bool, target: int, label: int | None,
             label_of) -> str:
    """Sample i's caption: what the model said, what was explained, the dataset's label."""
    import html

    caption = (f"#{i} {html.escape(name)} — " + (
        f"<b>{html.escape(headline)}</b> (boxes drawn)" + (
            f", class {html.escape(label_of(target))}" if target >= 0 else "")
        if detector else
        f"predicted <b>{html.escape(headline)}</b>, explained for {html.escape(label_of(target))}"))
    if label is not None:
        caption += f", label {html.escape(label_of(label))}"
    return caption


def render_results(results, out_dir, indices=None, data=None, class_names=None,
                   image_weight: float = 0.5, inputs=()) -> list:
    """PNG grids (the image, then one overlay per method) and an index.html for a result file.

    ``data`` overrides the input dataset recorded in the results; ``class_names`` is a list;
    ``inputs``: other files read (e.g. the class names file). A file to write that is one of
    the inputs (the results, the data, ``inputs``) is refused before anything is written."""
    import html
    from pathlib import Path

    from camexport.store import InputData, ResultReader, refuse_inputs

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RenderError(f"--out {out_dir} is a file; --out takes a folder for the PNGs and "
                          f"index.html: choose another --out")
    written = []
    with ResultReader(results) as stored:
        manifest = stored.manifest
        source = InputData.open(data or stored.attrs["data"])
        done = stored.done
        invalid = stored.invalid
        if not done.any():
            raise RenderError(f"no sample of {results} is done yet (unfinished: rerun the same "
                              f"`camexport run` command to finish, then render)")
        chosen = np.flatnonzero(done & ~invalid) if indices is None else np.asarray(indices)
        planned = [out_dir / "index.html"] + [out_dir / f"{int(i):06d}.png" for i in chosen]
        refuse_inputs([(path, "--out") for path in planned],
                      [("result file", results), ("--data input dataset", source.path),
                       *(("input", path) for path in inputs)])
        out_dir.mkdir(parents=True, exist_ok=True)
        methods = stored.methods
        detector = stored.detector
        output = None if detector else stored.output_names[0]
        metrics = sorted(stored.metrics)
        names = source.names
        labels = source.labels

        def label_of(k):
            return class_names[k] if class_names and 0 <= k < len(class_names) else str(k)

        rows = []
        for i in chosen:
            if not 0 <= i < len(done) or not done[i]:
                raise RenderError(f"sample {i} is not in the results (0..{len(done) - 1}, done only): give "
                                  f"--index with finished samples (`camexport show` counts them)")
            image = _display_image(source.images(i, i + 1)[0], manifest["preprocessing"])
            depth = _middle(manifest["preprocessing"])
            tiles = [np.uint8(image * 255)] + [overlay(image, stored.cams(m, i)[depth].astype(np.float32),
                                                       image_weight) for m in methods]
            if detector:
                shown = _explained_detections(stored, i)
                masks = shown.image_masks(image.shape[:2])
                if masks is not None:  # on the image tile only: the CAMs stay clear
                    tiles[0] = draw_masks(tiles[0], masks)
                if shown.keypoints is not None:
                    tiles[0] = draw_keypoints(tiles[0], shown.keypoints)
                tiles = [draw_boxes(t, shown.boxes, [label_of(int(k)) for k in shown.labels]) for t in tiles]
                headline = f"{len(shown)} detections explained"
            else:
                predicted = int(np.argmax(stored.outputs(output, i)))
                headline = label_of(predicted)
            picture = grid(tiles, [headline] + methods)
            name = f"{i:06d}.png"
            cv2.imwrite(str(out_dir / name), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            written.append(out_dir / name)
            target = int(stored.targets(i))
            label = int(labels[i]) if labels is not None and labels[i] >= 0 else None
            caption = _caption(i, names[i] if names else "", headline, detector, target, label, label_of)
            rows.append(f"<section><p>{caption}</p><img src='{name}'>"
                        f"{_metric_table(stored, i, methods, metrics)}</section>")
        source.close()
    page = ("<!doctype html><meta charset='utf-8'><title>camexport results</title>"
            "<style>body{font-family:sans-serif}img{max-width:100%}td,th{padding:0 8px}</style>"
            f"<h1>{html.escape(str(results))}</h1>" + "".join(rows))
    (out_dir / "index.html").write_text(page)
    return written
