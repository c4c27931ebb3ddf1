"""camexport report: bootstrap intervals and ranks on numbers with known answers, and the report
of a tiny real run opened in headless Chromium (every image loaded, no console error, the plots
not blank), driven over the DevTools protocol on a pipe (no websocket, no network)."""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import h5py
import numpy as np
import pytest
from cli_helper import cli, tiny_workspace

from camexport import report as report_module
from camexport.report import bootstrap_interval, curve_families, rank_methods

if TYPE_CHECKING:
    from typing_extensions import Self

METHODS = "gradcam,eigencam"
#: two metrics of opposite directions, and one family at three percentiles (a curve)
METRICS = "drop-in-confidence,road-combined:20,80,road-morf:20,road-morf:50,road-morf"


# -- numbers with known answers ------------------------------------------------------------------
def test_bootstrap_of_two_values_spans_them():
    """Means of two resampled values of {0, 1}: 0, ½, 1 with probabilities ¼, ½, ¼; the 2.5 % and
    97.5 % quantiles of 2000 such means are 0 and 1. NaN is left out."""
    interval = bootstrap_interval([0.0, 1.0, np.nan, np.inf])
    assert (interval.mean, interval.low, interval.high, interval.count) == (0.5, 0.0, 1.0, 2)


def test_bootstrap_degenerate_and_empty():
    assert bootstrap_interval(np.full(7, 3.25)) == report_module.Interval(3.25, 3.25, 3.25, 7)
    empty = bootstrap_interval([np.nan, np.nan])
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.low)


def test_bootstrap_matches_the_normal_interval_and_is_seeded(monkeypatch):
    """400 standard normal values: the interval is mean ± 1.96 s / √n within the bootstrap's own
    noise (2000 resamples: a few %); the same seed gives the same interval however the draws
    are blocked."""
    values = np.random.default_rng(1).standard_normal(400)
    interval = bootstrap_interval(values, seed=3)
    half = 1.96 * values.std() / math.sqrt(len(values))
    assert interval.mean == pytest.approx(values.mean(), abs=1e-12)
    assert interval.low == pytest.approx(values.mean() - half, abs=0.06 * half)
    assert interval.high == pytest.approx(values.mean() + half, abs=0.06 * half)
    monkeypatch.setattr(report_module, "BOOTSTRAP_BLOCK", 1000)  # two resamples per block
    assert bootstrap_interval(values, seed=3) == interval
    assert bootstrap_interval(values, seed=4) != interval


def test_ranks_follow_each_metrics_direction():
    """drop-in-confidence: lower is better; road-combined: higher is better; ties share their
    mean rank; a NaN mean is not ranked; a metric of unknown direction is not ranked."""
    means = {"drop-in-confidence": {"a": 0.1, "b": 0.3, "c": 0.2, "d": math.nan},
             "road-combined:20,80": {"a": 0.1, "b": 0.3, "c": 0.3, "d": 0.0},
             "my-own-metric": {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}}
    ranking = rank_methods(means, ["a", "b", "c", "d"])
    assert ranking.metrics == ["drop-in-confidence", "road-combined:20,80"]
    assert ranking.unranked == ["my-own-metric"]
    assert ranking.ranks["a"] == {"drop-in-confidence": 1.0, "road-combined:20,80": 3.0}
    assert ranking.ranks["b"] == {"drop-in-confidence": 3.0, "road-combined:20,80": 1.5}
    assert ranking.ranks["c"] == {"drop-in-confidence": 2.0, "road-combined:20,80": 1.5}
    assert math.isnan(ranking.ranks["d"]["drop-in-confidence"])
    assert ranking.mean_rank == {"a": 2.0, "b": 2.25, "c": 1.75, "d": 4.0}
    assert ranking.methods == ["c", "a", "b", "d"]
    assert ranking.as_dict()["ranks"]["d"]["drop-in-confidence"] is None
    # the localisation metrics' table gives theirs
    assert report_module.higher_is_better("pointing-game:15") is True
    assert report_module.higher_is_better("entropy") is False


def test_curve_families_need_two_numeric_percentiles():
    families = curve_families(["road-morf", "road-morf:20", "road-morf:auto", "road-lerf:30",
                               "road-combined:20,80", "drop-in-confidence"])
    assert [(f.name, f.points) for f in families] == [("road-morf", [(20.0, "road-morf"),
                                                                     (80.0, "road-morf:20")])]


# -- a tiny real run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tiny_workspace(tmp_path_factory.mktemp("report"), 32, 10, METHODS)
    cli("run", root / "art", "--data", root / "data.h5", "--out", root / "out.h5", "--methods", METHODS,
        "--metrics", METRICS, "-q")
    return root / "out.h5"


@pytest.fixture(scope="module")
def written(finished) -> Path:
    out = finished.parent / "report"
    result = cli("report", finished, "--out", out, "--top-classes", 3, "--gallery", 3)
    assert "index.html" in result.output
    return out


def _images(page: str) -> list[str]:
    import re

    return re.findall(r"<img src='([^']+)'", page)


def test_report_contents(finished, written):
    page = (written / "index.html").read_text()
    for heading in ("Ranking", "Means per metric", "Per class", "Curves", "Galleries"):
        assert f"<h2>{heading}</h2>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = _images(page)
    assert len(images) == 5 + 1 + 1 + 2 * 2  # bars per metric, classes, one curve, best/worst × methods
    assert all((written / name).is_file() for name in images)
    assert "lower is better" in page and "higher is better" in page
    assert "cannot be read" not in page
    # show prints the same ranking the page orders its table by
    info = json.loads(cli("show", finished, "--json").output)
    first = info["ranking"]["methods"][0]
    assert page.index(f"<tr><th>{first}</th>") < page.index(f"<tr><th>{info['ranking']['methods'][1]}</th>")
    shown = cli("show", finished).output
    assert "ranking (1 = best" in shown and "lower is better: drop-in-confidence" in shown


def test_report_without_the_input_dataset_shows_cams_alone(finished, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"kind {k}" for k in range(10)))
    cli("report", finished, "--out", tmp_path, "--data", tmp_path / "gone.h5", "--gallery", 2,
        "--class-names", names)
    page = (tmp_path / "index.html").read_text()
    assert "cannot be read" in page and "--data IN.h5" in page
    assert "<th>kind " in page  # the per-class table's columns
    assert all((tmp_path / name).is_file() for name in _images(page))


def test_report_without_metrics(finished, tmp_path):
    out = tmp_path / "plain.h5"
    root = finished.parent
    cli("run", root / "art", "--data", root / "data.h5", "--out", out, "--methods", METHODS, "-q")
    cli("report", out, "--out", tmp_path / "page", "--gallery", 2)
    page = (tmp_path / "page" / "index.html").read_text()
    assert "holds no metrics" in page and "<h2>Ranking</h2>" not in page
    assert _images(page) == ["gallery-eigencam-first.png", "gallery-gradcam-first.png"]
    assert "ranking" not in cli("show", out).output


def test_report_refuses_unfinished_results(finished, tmp_path):
    copy = tmp_path / "unfinished.h5"
    shutil.copy(finished, copy)
    with h5py.File(copy, "r+") as h5:
        h5.attrs["complete"] = False
    refused = cli("report", copy, "--out", tmp_path / "page", ok=False)
    assert refused.exit_code == 1 and "unfinished: rerun the same command to finish" in refused.output
    assert not (tmp_path / "page").exists()
    unknown = cli("report", finished, "--out", tmp_path / "page", "--gallery-metric", "nope", ok=False)
    assert unknown.exit_code == 1 and "drop-in-confidence" in unknown.output


def test_report_of_detector_results(finished, tmp_path):
    """Detector results (no /outputs; /detections, targets -1): no per-class breakdown, the
    galleries draw the explained boxes."""
    copy = tmp_path / "detector.h5"
    shutil.copy(finished, copy)
    with h5py.File(copy, "r+") as h5:
        n = len(h5["done"])
        del h5["outputs"]
        h5["targets"][...] = -1
        h5["detections/boxes"] = np.tile(np.float32([[4, 4, 20, 20], [np.nan] * 4]), (n, 1, 1))
        h5["detections/scores"] = np.tile(np.float32([0.9, np.nan]), (n, 1))
        h5["detections/labels"] = np.tile(np.int32([1, -1]), (n, 1))
        h5["detections/count"] = np.ones(n, np.int32)
        h5["detections/explained"] = np.ones(n, np.int32)
    cli("report", copy, "--out", tmp_path / "page", "--gallery", 2)
    page = (tmp_path / "page" / "index.html").read_text()
    assert "(detector)" in page and "No per-class breakdown" in page
    strip = cv2.imread(str(tmp_path / "page" / "gallery-gradcam-best.png"))[..., ::-1]
    assert (strip == (0, 255, 0)).all(axis=-1).any()  # the box colour of camexport.render


# -- the page in a real browser ------------------------------------------------------------------
def _install_chromium() -> tuple[str | None, str]:
    """Chromium's path, installing Debian's package as scripts/setup.sh does when it is missing
    (as root, with apt-get); (None, why) when neither works."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "installing it needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode:
            return None, f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}"
    return shutil.which("chromium"), "apt-get installed no chromium command"


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = _install_chromium()
    if path is None:
        reason = f"Chromium is not installed and could not be installed ({why}): run scripts/setup.sh as root"
        print(reason)
        pytest.skip(reason)
    return path


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
    messages ending in NUL, on its fds 3 and 4). ``open(url)`` loads a page in a fresh tab and
    returns its session; ``events`` keeps every event received."""

    def __init__(self, binary: str, profile: Path, width: int = 1280):
        to_browser, self._to = os.pipe()
        self._from, from_browser = os.pipe()
        # the child's ends moved above 9 so that 3</4> cannot clobber one (bash: dash takes fds 0-9 only)
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", "about:blank"]
        redirect = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", redirect, binary, *flags], pass_fds=ends, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self.width = width
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to)
        os.close(self._from)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self._id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def _until(self, match, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if match(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk

    def open(self, url: str) -> str:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=self.width, height=900,
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", session, url=url)
        self._until(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session, 30)
        return session

    def problems(self, session: str) -> list[str]:
        """The page's console errors and warnings, uncaught exceptions and failed loads."""
        found = []
        for event in self.events:
            if event.get("sessionId") != session:
                continue
            method, params = event["method"], event["params"]
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
                found.append(f"console.{params['type']}: {[a.get('value') for a in params['args']]}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                found.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}")
        return found

    def images(self, session: str) -> list[dict]:
        """Every <img>: src, complete, naturalWidth and its box in page pixels."""
        script = ("JSON.stringify([...document.images].map(i => { const r = i.getBoundingClientRect(); "
                  "return {src: i.getAttribute('src'), complete: i.complete, naturalWidth: i.naturalWidth, "
                  "x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; }))")
        reply = self.send("Runtime.evaluate", session, expression=script, returnByValue=True)
        return json.loads(reply["result"]["value"])

    def screenshot(self, session: str) -> np.ndarray:
        """The whole page (beyond the viewport) as RGB uint8."""
        data = self.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)["data"]
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        return picture[..., ::-1]


def _blank(pixels: np.ndarray) -> bool:
    """A picture with few colours, or one colour covering nearly all of it (a plot's white
    background covers at most about 80 %)."""
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return len(colours) <= 8 or counts.max() >= 0.95 * counts.sum()


def _region(shot: np.ndarray, image: dict) -> np.ndarray:
    x, y = round(image["x"]), round(image["y"])
    return shot[y:y + round(image["height"]), x:x + round(image["width"])]


def test_the_browser_check_sees_broken_pages(chromium, tmp_path):
    """The harness itself: a missing image, a console error and an exception are all reported,
    and a blank picture is seen as blank."""
    cv2.imwrite(str(tmp_path / "white.png"), np.full((60, 80, 3), 255, np.uint8))
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>x</title><img src='missing.png'><img src='white.png'>"
                    "<script>console.error('deliberate'); undefined_function();</script>")
    with Browser(chromium, tmp_path / "profile") as browser:
        session = browser.open(page.as_uri())
        problems = browser.problems(session)
        images = browser.images(session)
        shot = browser.screenshot(session)
    assert any("ERR_FILE_NOT_FOUND" in p for p in problems), problems
    assert any("deliberate" in p for p in problems) and any("exception" in p for p in problems), problems
    assert images[0]["naturalWidth"] == 0 and images[1]["naturalWidth"] == 80
    assert _region(shot, images[1]).shape == (60, 80, 3) and _blank(_region(shot, images[1]))


def test_report_in_headless_chromium(chromium, written, tmp_path):
    """The acceptance check: the report opens with no console error or failed load, every image
    is loaded, and the screenshot's plot regions are not blank."""
    with Browser(chromium, tmp_path / "profile") as browser:
        session = browser.open((written / "index.html").as_uri())
        images = browser.images(session)
        shot = browser.screenshot(session)
        problems = browser.problems(session)
    assert problems == []
    assert len(images) == len(_images((written / "index.html").read_text()))
    for image in images:
        assert image["complete"] and image["naturalWidth"] > 0, image
        region = _region(shot, image)
        assert region.shape[0] > 20 and region.shape[1] > 20, image
        assert not _blank(region), image["src"]
        # what the screenshot shows there is the plot (scaled to the page's width if wider)
        plot = cv2.imread(str(written / image["src"]))[..., ::-1]
        shown = cv2.resize(region, plot.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(shown.astype(float) - plot).mean() < 6, image["src"]  # measured: 0, 3.1 scaled
