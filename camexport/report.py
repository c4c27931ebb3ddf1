"""An evaluation report of a result file, read as pictures: ``camexport report OUT.h5 --out DIR``.

``report(results, out_dir)`` writes ``index.html`` (inline CSS, no script, nothing fetched from
a network) and PNGs beside it:

- per metric, a bar chart of each method's mean score with its 95 % bootstrap interval;
- a methods × metrics table: mean, interval and rank per metric, the mean rank (the ranking
  ``camexport show`` prints: both call :func:`rank_methods`);
- per-class breakdown of the most frequent target classes (/targets);
- curves of a metric family stored at several percentiles (``road-morf:10``, ``road-morf:30``,
  ...), the mean per method against the share of pixels removed;
- galleries of the best and worst images of each method for one metric (overlays of
  :mod:`camexport.render`; the CAM alone when the input dataset cannot be read).

Which way a metric is better is the ``higher_is_better`` of its entry in the table of metrics
that names it (:data:`camexport.metrics.METRICS`, :data:`camexport.localisation.METRICS`); the
sources are in docs/report.md. A metric name in neither table is shown but not ranked.

Intervals: the percentile bootstrap of the mean, ``RESAMPLES`` resamples of the finite scores
(NaN, i.e. invalid or unexplained samples, left out), drawn by ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camexport.errors import CamexportError

#: Confidence level of the intervals, and bootstrap resamples drawn for each.
LEVEL = 0.95
RESAMPLES = 2000
#: Most resampled values the bootstrap holds at once (resamples × samples): 4 M, 32 MB of float64.
BOOTSTRAP_BLOCK = 1 << 22
#: Gallery tiles are scaled up (nearest neighbour) to at least this many pixels high.
TILE = 128
#: Colours of the methods, the same in every plot (matplotlib's tab10, cycled).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


class ReportError(CamexportError, ValueError):
    """A report that cannot be made as asked (an unfinished result, an unknown metric)."""


# -- numbers: directions, intervals, ranks ------------------------------------------------------
def higher_is_better(metric: str) -> bool | None:
    """Whether a higher score is better for a stored metric name (``road-morf:30``), from the
    registry that names it: :data:`camexport.metrics.METRICS` first (as ``camexport evaluate``
    resolves names), then :data:`camexport.localisation.METRICS`; None for a name neither
    holds (not ranked)."""
    from camexport import localisation, metrics

    base = metric.partition(":")[0]
    entry = metrics.METRICS.get(base) or localisation.METRICS.get(base)
    return None if entry is None else entry.higher_is_better


@dataclass(frozen=True)
class Interval:
    """The mean of ``count`` finite scores and its bootstrap interval [low, high] (NaN: none)."""

    mean: float
    low: float
    high: float
    count: int


def bootstrap_interval(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of the finite ``values`` (NaN/Inf left out):
    ``resamples`` means of n values drawn with replacement, their (1 − level)/2 and
    (1 + level)/2 quantiles (numpy's linear percentile). Vectorised in blocks of at most
    BOOTSTRAP_BLOCK drawn values; the same seed gives the same interval."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, BOOTSTRAP_BLOCK // n)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        means[start:stop] = values[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high), n)


@dataclass(frozen=True)
class Ranking:
    """Methods ranked per metric (1 = best, ties share the mean of their ranks) and by their mean
    rank over the ranked metrics. ``methods``: best mean rank first (no rank: last)."""

    methods: list[str]
    metrics: list[str]  # ranked: their direction is known
    unranked: list[str]  # stored metrics of unknown direction
    means: dict[str, dict[str, float]]  # metric -> method -> mean score
    ranks: dict[str, dict[str, float]]  # method -> ranked metric -> rank (NaN: no score)
    mean_rank: dict[str, float]  # method -> mean of its ranks (NaN: none)

    def as_dict(self) -> dict:
        """JSON-ready (NaN as None)."""
        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"methods": self.methods, "metrics": self.metrics, "unranked": self.unranked,
                "higher_is_better": {m: higher_is_better(m) for m in self.metrics},
                "ranks": {method: {m: number(r) for m, r in ranks.items()}
                          for method, ranks in self.ranks.items()},
                "mean_rank": {method: number(r) for method, r in self.mean_rank.items()}}


def rank_methods(means: dict[str, dict[str, float]], methods: list[str] | None = None) -> Ranking:
    """Rank methods by metric means ``{metric: {method: mean}}`` (NaN: no score, no rank).
    ``methods``: those to list (default: every method with a mean), e.g. with ones lacking
    metrics. The mean rank averages a method's ranks over the metrics that rank it."""
    methods = list(methods) if methods is not None else sorted({m for per in means.values() for m in per})
    ranked = [metric for metric in means if higher_is_better(metric) is not None]
    ranks: dict[str, dict[str, float]] = {method: {} for method in methods}
    for metric in ranked:
        sign = -1.0 if higher_is_better(metric) else 1.0
        scored = [m for m in methods if math.isfinite(means[metric].get(m, math.nan))]
        order = _average_ranks(np.array([sign * means[metric][m] for m in scored]))
        for method in methods:
            ranks[method][metric] = math.nan
        for method, rank in zip(scored, order):
            ranks[method][metric] = float(rank)
    mean_rank = {}
    for method in methods:
        finite = [r for r in ranks[method].values() if not math.isnan(r)]
        mean_rank[method] = float(np.mean(finite)) if finite else math.nan
    order = sorted(methods, key=lambda m: (math.isnan(mean_rank[m]), mean_rank[m], m))
    return Ranking(order, ranked, [m for m in means if m not in ranked], means, ranks, mean_rank)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, smallest first; tied values share the mean of their ranks (as
    scipy.stats.rankdata's 'average', whose import would slow `camexport show` by a second)."""
    order = np.argsort(values, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(values[order]) != 0])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks


def ranking_lines(ranking: Ranking) -> list[str]:
    """The ranking as text lines (``camexport show``): a methods × metrics table of ranks."""
    if not ranking.metrics:
        return []
    width = max(len(m) for m in ranking.methods)
    columns = [max(len(metric), 5) for metric in ranking.metrics]
    header = "  ".join(f"{m:>{c}}" for m, c in zip(ranking.metrics, columns))
    lines = ["ranking (1 = best; ties share their mean rank):", f"  {'method':<{width}}  {header}  mean rank"]
    for method in ranking.methods:
        ranks = ranking.ranks[method]
        cells = "  ".join(f"{_rank_text(ranks[m]):>{c}}" for m, c in zip(ranking.metrics, columns))
        lines.append(f"  {method:<{width}}  {cells}  {_rank_text(ranking.mean_rank[method]):>9}")
    for better in (True, False):
        names = [m for m in ranking.metrics if higher_is_better(m) is better]
        if names:
            lines.append(f"  {'higher' if better else 'lower'} is better: {', '.join(names)}")
    if ranking.unranked:
        lines.append(f"  not ranked (direction unknown): {', '.join(ranking.unranked)}")
    return lines


def _rank_text(rank: float) -> str:
    return "-" if math.isnan(rank) else f"{rank:.2f}".rstrip("0").rstrip(".")


# -- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One metric stored at several percentiles: a curve. ``points``: (pixels removed %, stored
    metric name), in increasing removal."""

    name: str
    points: list[tuple[float, str]]


def curve_families(metrics: list[str]) -> list[Family]:
    """Families of the stored metric names with a single percentile parameter (road-morf,
    road-lerf, remove-*) found at two or more numeric percentiles ('auto' is left out)."""
    from camexport.metrics import METRICS

    found: dict[str, dict[float, str]] = {}
    for metric in metrics:
        base, _, param = metric.partition(":")
        entry = METRICS.get(base)
        if entry is None or entry.param != "percentile":
            continue
        try:
            percentile = float(param) if param else float(entry.default)
        except ValueError:  # 'auto': no place on the axis
            continue
        found.setdefault(base, {})[100 - percentile] = metric
    return [Family(base, sorted(points.items())) for base, points in found.items() if len(points) >= 2]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


@dataclass
class _Page:
    """The page's sections as HTML, and the files written so far."""

    sections: list[str]
    written: list[Path]


def report(results: str | Path, out_dir: str | Path, data: str | Path | None = None, top_classes: int = 5,
           gallery: int = 4, gallery_metric: str | None = None, class_names: list[str] | None = None,
           seed: int = 0, image_weight: float = 0.5, inputs=()) -> list[Path]:
    """Write ``out_dir/index.html`` and its PNGs for the complete result file ``results``;
    returns the files written, index.html first.

    ``data``: the input dataset (default: the one recorded in the result) for the galleries'
    photos; ``top_classes``: classes in the per-class breakdown; ``gallery``: images in each
    best / worst gallery; ``gallery_metric``: the metric choosing them (default: road-combined
    if stored, else the first ranked metric); ``class_names``: a name per class index;
    ``seed``: the bootstrap's; ``inputs``: other files read (e.g. the class names file): a file
    to write that is one of the inputs is refused before anything is written."""
    from camexport.store import ResultReader, refuse_inputs
    from camexport.store.reader import describe_state, summary

    results, out_dir = Path(results), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir} is a file; --out takes a folder for index.html and its "
                          f"PNGs: choose another --out")
    if top_classes < 0 or gallery < 0:
        raise ReportError("--top-classes and --gallery take a count ≥ 0")
    info = summary(results)
    if info["state"] != "complete":
        raise ReportError(f"{results} is {describe_state(info)}; a report needs a complete result")
    ranking = rank_methods(info["metrics"], info["methods"])
    metrics = list(info["metrics"])
    if gallery_metric is not None and gallery_metric not in metrics:
        raise ReportError(f"--gallery-metric {gallery_metric} is not in {results}; it holds "
                          f"{', '.join(metrics) or 'no metrics'}")
    chosen = gallery_metric or _default_gallery_metric(ranking)

    with ResultReader(results) as stored:
        ok = stored.done & ~stored.invalid
        scores = {metric: {method: _per_sample(stored.metric(metric, method))
                           for method in info["metrics"][metric]} for metric in metrics}
        for per_method in scores.values():
            for values in per_method.values():
                values[~ok] = np.nan
        intervals = {metric: {method: bootstrap_interval(values, seed=seed) for method, values in per.items()}
                     for metric, per in scores.items()}
        families = curve_families(metrics)
        planned = (["index.html", "classes.png"] + [_bars_name(k, m) for k, m in enumerate(metrics)]
                   + [f"curve-{_slug(f.name)}.png" for f in families]
                   + [_gallery_name(m, kind) for m in info["methods"] for kind in ("best", "worst", "first")])
        recorded = data if data is not None else stored.attrs.get("data")
        source_path = Path(recorded) if recorded else None
        refuse_inputs([(out_dir / name, "--out") for name in planned],
                      [("result file", results), ("--data input dataset", source_path),
                       *(("input", path) for path in inputs)])
        out_dir.mkdir(parents=True, exist_ok=True)
        colours = {method: PALETTE[k % len(PALETTE)] for k, method in enumerate(info["methods"])}
        page = _Page([], [out_dir / "index.html"])
        page.sections.append(_header(results, info, stored))
        if not metrics:
            page.sections.append("<section><h2>Metrics</h2><p class='note'>This result holds no metrics: "
                                 "the report shows its CAMs only. Run with <code>--metrics</code> (e.g. "
                                 "<code>--metrics road-combined,drop-in-confidence</code>) for ranks, "
                                 "intervals, curves and best / worst galleries.</p></section>")
        else:
            page.sections.append(_ranking_section(ranking, intervals))
            page.sections.append(_bars_section(page, out_dir, metrics, intervals, ranking, colours))
            page.sections.append(_classes_section(page, out_dir, stored, ok, scores, ranking, top_classes,
                                                  class_names or [], colours))
            page.sections.append(_curves_section(page, out_dir, families, scores, seed, colours))
        page.sections.append(_gallery_section(page, out_dir, stored, ok, scores, chosen, gallery, source_path,
                                              image_weight))
    page.sections.append(_method_notes())
    (out_dir / "index.html").write_text(_document(results, page.sections), encoding="utf-8")
    return page.written


def _per_sample(scores: np.ndarray) -> np.ndarray:
    """(N,) float64 scores; a metric storing several per sample (N, T), e.g. IoU per threshold:
    their mean (NaN where any is NaN)."""
    return scores.astype(np.float64).reshape(len(scores), -1).mean(axis=1)


def _default_gallery_metric(ranking: Ranking) -> str | None:
    for metric in ranking.metrics:
        if metric.partition(":")[0] == "road-combined":
            return metric
    return ranking.metrics[0] if ranking.metrics else None


def _bars_name(k: int, metric: str) -> str:
    return f"metric{k:02d}-{_slug(metric)}.png"


def _gallery_name(method: str, kind: str) -> str:
    return f"gallery-{_slug(method)}-{kind}.png"


def _direction_text(metric: str) -> str:
    better = higher_is_better(metric)
    if better is None:
        return "direction unknown, not ranked"
    return f"{'higher' if better else 'lower'} is better"


def _number(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.4f}"


# -- sections ------------------------------------------------------------------------------------
def _header(results: Path, info: dict, stored) -> str:
    source = stored.manifest.get("source", {})
    kind = "detector" if stored.detector else f"outputs {', '.join(info['outputs'])}"
    samples = (f"{info['done']} done, {info['invalid']} invalid (NaN/Inf pixels: not explained, left out "
               "of every number)")
    model = f"{source.get('name', '')} ({kind}); artifact {stored.attrs.get('artifact', '')}"
    rows = [("result", str(results)), ("samples", samples), ("methods", ", ".join(info["methods"])),
            ("model", model), ("input dataset", str(stored.attrs.get("data", ""))),
            ("provider", info["provider"]), ("camexport", info["camexport_version"])]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<section><table class='facts'>{table}</table></section>"


def _ranking_section(ranking: Ranking, intervals: dict) -> str:
    head = "".join(f"<th>{html.escape(m)}<br><small>{_direction_text(m)}</small></th>"
                   for m in ranking.metrics + ranking.unranked)
    top = {metric: np.nanmin([ranks[metric] for ranks in ranking.ranks.values()] + [math.inf])
           for metric in ranking.metrics}  # the best rank given (1, or 1.5 for a tie)
    rows = []
    for method in ranking.methods:
        cells = []
        for metric in ranking.metrics + ranking.unranked:
            interval = intervals[metric].get(method)
            rank = ranking.ranks[method].get(metric, math.nan)
            value = "–" if interval is None else (
                f"{_number(interval.mean)}<br><small>[{_number(interval.low)}, {_number(interval.high)}]"
                "</small>")
            rank_text = "" if math.isnan(rank) else f"<span class='rank'>#{_rank_text(rank)}</span> "
            cells.append(f"<td class='{'best' if rank == top.get(metric) else ''}'>{rank_text}{value}</td>")
        rows.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}"
                    f"<td class='mean'>{_rank_text(ranking.mean_rank[method])}</td></tr>")
    return ("<section><h2>Ranking</h2><p>Each cell: the method's rank for the metric (#1 = best, ties "
            "share their mean rank), its mean score and 95&nbsp;% bootstrap interval. Methods are "
            "ordered by their mean rank over the ranked metrics.</p>"
            f"<table class='grid'><tr><th>method</th>{head}<th>mean rank</th></tr>{''.join(rows)}</table>"
            "</section>")


def _bars_section(page: _Page, out_dir: Path, metrics: list[str], intervals: dict, ranking: Ranking,
                  colours: dict) -> str:
    figures = []
    for k, metric in enumerate(metrics):
        name = _bars_name(k, metric)
        methods = [m for m in ranking.methods if m in intervals[metric]]
        _bar_chart(out_dir / name, metric, [intervals[metric][m] for m in methods], methods, colours)
        page.written.append(out_dir / name)
        figures.append(_figure(name, f"{metric}: mean per method ({_direction_text(metric)})", caption=False))
    return ("<section><h2>Means per metric</h2><p>Bars: the mean over the explained samples; whiskers: the "
            "95&nbsp;% bootstrap interval of the mean.</p><div class='plots'>" + "".join(figures)
            + "</div></section>")


def _classes_section(page: _Page, out_dir: Path, stored, ok: np.ndarray, scores: dict, ranking: Ranking,
                     top: int, class_names: list[str], colours: dict) -> str:
    title = "<h2>Per class</h2>"
    targets = stored.targets()
    explained = ok & (targets >= 0)
    if top == 0:
        return f"<section>{title}<p class='note'>Left out (--top-classes 0).</p></section>"
    if not explained.any() or not ranking.metrics:
        why = ("no sample was explained for one class (a detector's own detections, or concepts)"
               if not explained.any() else "no ranked metric")
        return f"<section>{title}<p class='note'>No per-class breakdown: {why}.</p></section>"
    classes, counts = np.unique(targets[explained], return_counts=True)
    order = np.lexsort((classes, -counts))[:top]
    classes, counts = classes[order], counts[order]
    names = [class_names[c] if c < len(class_names) else f"class {c}" for c in classes]
    means = {metric: {method: [float(np.nanmean(values[explained & (targets == c)]))
                               if np.isfinite(values[explained & (targets == c)]).any() else math.nan
                               for c in classes] for method, values in scores[metric].items()}
             for metric in ranking.metrics}
    _class_chart(out_dir / "classes.png", names, counts, means, ranking, colours)
    page.written.append(out_dir / "classes.png")
    head = "".join(f"<th>{html.escape(name)}<br><small>{n} sample{'s' if n > 1 else ''}</small></th>"
                   for name, n in zip(names, counts))
    rows = []
    for metric in ranking.metrics:
        methods = [m for m in ranking.methods if m in means[metric]]
        for k, method in enumerate(methods):
            cells = "".join(f"<td>{_number(v)}</td>" for v in means[metric][method])
            first = f"<th rowspan='{len(methods)}'>{html.escape(metric)}</th>" if k == 0 else ""
            rows.append(f"<tr>{first}<th>{html.escape(method)}</th>{cells}</tr>")
    return (f"<section>{title}<p>The {len(classes)} most frequent target classes (/targets: the class "
            "each sample was explained for), the mean score of each method per class.</p>"
            + _figure("classes.png", "mean score per class and method", caption=False)
            + f"<table class='grid'><tr><th>metric</th><th>method</th>{head}</tr>{''.join(rows)}</table>"
            "</section>")


def _curves_section(page: _Page, out_dir: Path, families: list[Family], scores: dict, seed: int,
                    colours: dict) -> str:
    title = "<h2>Curves</h2>"
    if not families:
        return (f"<section>{title}<p class='note'>No curves: the result holds no metric family at several "
                "percentiles (deletion-auc / insertion-auc store their area only). Run with e.g. "
                "<code>--metrics road-morf:10,road-morf:30,road-morf:50,road-morf:70,road-morf:90</code> "
                "(or road-lerf, remove-morf, remove-lerf) for a deletion / insertion-style curve."
                "</p></section>")
    figures = []
    for family in families:
        name = f"curve-{_slug(family.name)}.png"
        _curve_chart(out_dir / name, family, scores, seed, colours)
        page.written.append(out_dir / name)
        figures.append(_figure(name, f"{family.name}: mean change of the target's score against the pixels "
                                     f"removed ({_direction_text(family.name)})", caption=False))
    return (f"<section>{title}<p>Each metric family stored at several percentiles: the mean per method "
            "(band: 95&nbsp;% bootstrap interval) against the share of pixels removed, most relevant "
            "first (MoRF, deletion-like) or least relevant first (LeRF, insertion-like).</p>"
            "<div class='plots'>" + "".join(figures) + "</div></section>")


def _gallery_section(page: _Page, out_dir: Path, stored, ok: np.ndarray, scores: dict, metric: str | None,
                     count: int, source_path: Path | None, image_weight: float) -> str:
    from camexport.store import InputData, StoreError

    title = "<h2>Galleries</h2>"
    rows = np.flatnonzero(ok)
    if count == 0 or not len(rows):
        why = "--gallery 0" if count == 0 else "no sample was explained"
        return f"<section>{title}<p class='note'>No gallery: {why}.</p></section>"
    source, note = None, ""
    try:
        if source_path is None:
            raise StoreError("the result records no input dataset")
        source = InputData.open(source_path)
        if len(source) != stored.count:
            raise StoreError(f"it holds {len(source)} samples, the result {stored.count}")
    except (StoreError, OSError) as err:
        if source is not None:
            source.close()
            source = None
        note = (f"<p class='note'>The input dataset {html.escape(str(source_path or ''))} cannot be read ("
                f"{html.escape(str(err))}): the galleries show the CAMs alone. Pass "
                "<code>--data IN.h5</code>.</p>")
    parts = [title, note]
    if metric is None:
        parts.append(f"<p class='note'>No metric to order the samples by: the first {count} explained "
                     "samples per method.</p>")
    else:
        parts.append(f"<p>Per method, the {count} best and worst explained samples by {html.escape(metric)} "
                     f"({_direction_text(metric)}); each tile: sample index and score.</p>")
    try:
        for method in stored.methods:
            parts.append(f"<h3>{html.escape(method)}</h3>")
            if metric is None:
                picks = [("first", rows[:count])]
            else:
                values = scores[metric].get(method)
                if values is None:
                    parts.append(f"<p class='note'>{html.escape(method)} has no {html.escape(metric)} "
                                 "scores.</p>")
                    continue
                scored = np.flatnonzero(np.isfinite(values))
                ascending = scored[np.argsort(values[scored], kind="stable")]
                best_first = ascending[::-1] if higher_is_better(metric) is not False else ascending
                picks = [("best", best_first[:count]), ("worst", best_first[::-1][:count])]
            for kind, chosen in picks:
                name = _gallery_name(method, kind)
                labels = [f"#{i}" + ("" if metric is None else f" {values[i]:.3g}") for i in chosen]
                _gallery_strip(out_dir / name, stored, method, chosen, labels, source, image_weight)
                page.written.append(out_dir / name)
                parts.append(_figure(name, f"{method}: {kind} samples"))
    finally:
        if source is not None:
            source.close()
    return "<section>" + "".join(parts) + "</section>"


def _method_notes() -> str:
    return ("<section><h2>How the numbers are made</h2><p>Scores of invalid samples (NaN/Inf pixels) and "
            f"NaN scores are left out. Intervals: percentile bootstrap of the mean, {RESAMPLES} resamples, "
            "seeded (the same report twice gives the same intervals). Which way a metric is better comes "
            "from camexport's metric registry; see docs/report.md for each metric's source.</p></section>")


def _figure(name: str, text: str, caption: bool = True) -> str:
    """An <img> of a PNG beside the page, ``text`` its alt text and caption (``caption`` False:
    the picture has it as its title)."""
    text = html.escape(text)
    shown = f"<figcaption>{text}</figcaption>" if caption else ""
    return f"<figure><img src='{html.escape(name)}' alt='{text}'>{shown}</figure>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.4em;word-break:break-all}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 8px;text-align:left;vertical-align:top}
table.grid td,table.grid th{border:1px solid #ddd}table.grid td.best{background:#e6f4e6}
td small,th small{color:#666;font-weight:normal}.rank{font-weight:bold}td.mean{font-weight:bold}
table.facts th{color:#555;font-weight:normal}
.note{background:#fff7e0;padding:6px 10px;border-left:3px solid #e0b000}
.plots{display:flex;flex-wrap:wrap;gap:16px}figure{margin:8px 0}figcaption{color:#555;font-size:.9em}
img{max-width:100%;height:auto;display:block}code{background:#f2f2f2;padding:0 3px}
"""


def _document(results: Path, sections: list[str]) -> str:
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>camexport report: {html.escape(results.name)}</title><style>{_STYLE}</style></head>"
            "<body>"
            f"<h1>camexport report: {html.escape(str(results))}</h1>" + "".join(sections) + "</body></html>")


# -- pictures ------------------------------------------------------------------------------------
def _figure_of(width: float, height: float):
    """A matplotlib Figure drawn by Agg (no pyplot: no global state, no display)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _bar_chart(path: Path, metric: str, intervals: list[Interval], methods: list[str], colours: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    figure = _figure_of(6.0, 1.2 + 0.4 * len(methods))
    axes = figure.subplots()
    means = np.array([i.mean for i in intervals])
    errors = np.array([[i.mean - i.low, i.high - i.mean] for i in intervals]).T
    y = np.arange(len(methods))
    axes.barh(y, np.nan_to_num(means), xerr=np.nan_to_num(errors), capsize=4,
              color=[colours[m] for m in methods], edgecolor="#333", linewidth=0.5)
    axes.set_yticks(y, methods)
    axes.xaxis.set_major_locator(MaxNLocator(5))
    axes.invert_yaxis()
    axes.axvline(0, color="#888", linewidth=0.8)
    axes.set_title(f"{metric} ({_direction_text(metric)})", fontsize=10)
    axes.set_xlabel("mean score, 95 % bootstrap interval")
    figure.savefig(path)


def _class_chart(path: Path, names: list[str], counts: np.ndarray, means: dict, ranking: Ranking,
                 colours: dict) -> None:
    columns = min(3, len(ranking.metrics))
    rows = -(-len(ranking.metrics) // columns)
    figure = _figure_of(4.2 * columns, 2.8 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    x = np.arange(len(names))
    for ax, metric in zip(axes, ranking.metrics):
        methods = [m for m in ranking.methods if m in means[metric]]
        width = 0.8 / max(len(methods), 1)
        for k, method in enumerate(methods):
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, np.nan_to_num(means[metric][method]), width,
                   color=colours[method], label=method)
        ax.set_xticks(x, [f"{name[:14]}\n(n={n})" for name, n in zip(names, counts)], fontsize=8)
        ax.set_xlim(-0.5 - 0.5 / len(x), len(x) - 0.5 + 0.5 / len(x))
        ax.axhline(0, color="#888", linewidth=0.8)
        ax.set_title(f"{metric} ({_direction_text(metric)})", fontsize=9)
    for ax in axes[len(ranking.metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 6), fontsize=8)
    figure.savefig(path)


def _curve_chart(path: Path, family: Family, scores: dict, seed: int, colours: dict) -> None:
    figure = _figure_of(6.0, 3.6)
    axes = figure.subplots()
    removed = [share for share, _ in family.points]
    methods = sorted({m for _, metric in family.points for m in scores[metric]})
    for method in methods:
        intervals = [bootstrap_interval(scores[metric][method], seed=seed) if method in scores[metric]
                     else Interval(math.nan, math.nan, math.nan, 0) for _, metric in family.points]
        axes.plot(removed, [i.mean for i in intervals], marker="o", color=colours[method], label=method)
        axes.fill_between(removed, [i.low for i in intervals], [i.high for i in intervals],
                          color=colours[method], alpha=0.2, linewidth=0)
    axes.axhline(0, color="#888", linewidth=0.8)
    axes.set_xlabel("pixels removed (%)")
    axes.set_ylabel("mean change of the target's score")
    axes.set_title(f"{family.name} ({_direction_text(family.name)})", fontsize=10)
    axes.legend(fontsize=8)
    figure.savefig(path)


def _gallery_strip(path: Path, stored, method: str, chosen, labels: list[str], source,
                   image_weight: float) -> None:
    """One PNG: a tile per chosen sample, the overlay on the photo (the CAM alone without one)."""
    import cv2

    from camexport.render import _display_image, _explained_detections, _middle, draw_boxes, grid, overlay

    preprocessing = stored.manifest["preprocessing"]
    depth = _middle(preprocessing)
    tiles = []
    for i in chosen:
        cam = np.nan_to_num(stored.cams(method, int(i))[depth].astype(np.float32))
        if source is not None:
            image = _display_image(source.images(int(i), int(i) + 1)[0], preprocessing)
            tile = overlay(image, cam, image_weight)
        else:
            tile = overlay(np.zeros((*cam.shape, 3), np.float32), cam, 0.0)
        if stored.detector:
            shown = _explained_detections(stored, int(i))
            tile = draw_boxes(tile, shown.boxes, [str(int(k)) for k in shown.labels])
        scale = max(1, -(-TILE // tile.shape[0]))
        tiles.append(cv2.resize(tile, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST))
    if not tiles:
        tiles, labels = [np.full((TILE, TILE, 3), 255, np.uint8)], ["no scored sample"]
    cv2.imwrite(str(path), cv2.cvtColor(grid(tiles, labels), cv2.COLOR_RGB2BGR))
