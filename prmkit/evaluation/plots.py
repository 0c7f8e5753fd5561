"""PNG plots of an evaluation report (matplotlib, the ``plot`` extra): accuracy by step position, reliability,
score histograms by label and Best-of-N curves. :func:`prmkit.evaluation.write.write_report` calls :func:`write_plots`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prmkit.core.atomic import write_atomic
from prmkit.evaluation.report import _get, _model_reports, _subset_names, _subsets
from prmkit.metrics import AGGREGATES, expected_calibration_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["write_plots"]


def _figure(n_panels: int, title: str, ncols: int | None = None) -> tuple[Figure, list[Axes]]:
    # The object-oriented API with an explicit Agg canvas never touches
    # pyplot's global state or the user's configured backend, so this works
    # headless and does not disturb a caller that uses pyplot itself.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.8 * nrows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _grid(
    entries: list[tuple[str | None, Mapping[str, Any]]], value: Callable[[str | None, str, Mapping[str, Any]], Any]
) -> tuple[list[tuple[str, Any] | None], int | None]:
    """One panel per (subset, model) pair that has data.

    With several models the grid has a row per subset and a column per
    model, so a subset's panels sit side by side; ``None`` marks a hole.
    """
    subsets = _subset_names(rep for _, rep in entries)
    if len(entries) == 1:
        model, rep = entries[0]
        cells = [(s, value(model, s, _subsets(rep)[s])) for s in subsets]
        return [(t, v) for t, v in cells if v is not None], None
    grid: list[tuple[str, Any] | None] = []
    for s in subsets:
        row = []
        for model, rep in entries:
            sub = _subsets(rep).get(s)
            v = value(model, s, sub) if sub is not None else None
            row.append(None if v is None else (f"{s} - {model}", v))
        if any(c is not None for c in row):
            grid.extend(row)
    return grid, len(entries)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
    return path


def _accuracy_axes(ax: Any, title: str, xlabel: str) -> None:
    """The finish of a panel whose y axis is an accuracy in [0, 1]."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _position_key(label: str) -> int:
    return int(str(label).rstrip("+"))


def _panels(
    entries: list[tuple[str | None, Mapping[str, Any]]], value: Callable[[str | None, str, Mapping[str, Any]], Any]
) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Group series into panels: a single model gets one panel with a series
    per subset; several models get a panel per subset with a series per model."""
    reps = [rep for _, rep in entries]
    subsets = _subset_names(reps)
    if len(entries) == 1:
        model, rep = entries[0]
        series = []
        for s in subsets:
            v = value(model, s, _subsets(rep)[s])
            if v is not None:
                series.append((s, v))
        return [("", series)] if series else []
    panels = []
    for s in subsets:
        series = []
        for model, rep in entries:
            sub = _subsets(rep).get(s)
            v = value(model, s, sub) if sub is not None else None
            if v is not None:
                series.append((str(model), v))
        if series:
            panels.append((s, series))
    return panels


def write_plots(
    report: Mapping[str, Any],
    out_dir: Path,
    raw_models: Mapping[str | None, Mapping[str, Mapping[str, Sequence[float]]]],
) -> list[Path]:
    """Write each plot the report has data for into ``out_dir``; return the files written, in this order."""
    entries = _model_reports(report)

    def raw_leaf(model: str | None, subset: str) -> Mapping[str, Sequence[float]] | None:
        leaf = raw_models.get(model, {}).get(subset)
        return leaf if leaf is not None and len(leaf["scores"]) else None

    written = [
        _accuracy_by_position(entries, out_dir / "accuracy_by_position.png"),
        _reliability(entries, raw_leaf, out_dir / "reliability.png"),
        _score_histogram(entries, raw_leaf, out_dir / "score_histogram.png"),
        _best_of_n(entries, out_dir / "best_of_n.png"),
    ]
    return [path for path in written if path is not None]


Entries = list[tuple[str | None, Mapping[str, Any]]]
RawLeaf = Callable[[str | None, str], Mapping[str, Sequence[float]] | None]


def _accuracy_by_position(entries: Entries, path: Path) -> Path | None:
    panels = _panels(entries, lambda m, s, sub: sub.get("by_position") or None)
    if not panels:
        return None
    fig, axes = _figure(len(panels), "Step accuracy by position")
    for ax, (title, series) in zip(axes, panels):
        labels = sorted({r["position"] for _, rows in series for r in rows}, key=_position_key)
        x = {lab: i for i, lab in enumerate(labels)}
        for name, rows in series:
            ax.plot([x[r["position"]] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels)
        _accuracy_axes(ax, title, "step")
    return _save(fig, path)


def _reliability(entries: Entries, raw_leaf: RawLeaf, path: Path) -> Path | None:
    def curve(model: str | None, subset: str, _sub: Mapping[str, Any]) -> list[dict] | None:
        leaf = raw_leaf(model, subset)
        if leaf is None:
            return None
        return [b for b in expected_calibration_curve(leaf["scores"], leaf["targets"]) if b["n"]]

    panels = _panels(entries, curve)
    if not panels:
        return None
    fig, axes = _figure(len(panels), "Reliability (10 equal-width bins)")
    for ax, (title, series) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
        for name, bins in series:
            ax.plot([b["mean_score"] for b in bins], [b["mean_target"] for b in bins], marker="o", label=name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted p(correct)")
        ax.set_ylabel("observed share correct")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _score_histogram(entries: Entries, raw_leaf: RawLeaf, path: Path) -> Path | None:
    thresholds = {model: rep.get("threshold") for model, rep in entries}

    def hist_data(model: str | None, subset: str, _sub: Mapping[str, Any]) -> Any:
        leaf = raw_leaf(model, subset)
        return None if leaf is None else (leaf, thresholds[model])

    panels, ncols = _grid(entries, hist_data)
    if not any(panels):
        return None
    import numpy as np

    fig, axes = _figure(len(panels), "Step scores by label", ncols)
    # k/20 rather than linspace: linspace's 0.30000000000000004 would put
    # a score of exactly 0.3 into the bin below.
    bins = np.arange(21) / 20
    for ax, panel in zip(axes, panels):
        if panel is None:
            ax.set_visible(False)
            continue
        title, (leaf, threshold) = panel
        scores = np.asarray(leaf["scores"], dtype=float)
        good = np.asarray(leaf["targets"], dtype=float) >= 0.5
        # density, because wrong steps are usually far fewer than correct
        # ones and would be invisible on a count scale.
        for mask, label, color in ((good, "correct steps", "tab:green"), (~good, "wrong steps", "tab:red")):
            if mask.any():
                ax.hist(
                    scores[mask],
                    bins=list(bins),
                    density=True,
                    alpha=0.5,
                    color=color,
                    label=f"{label} ({int(mask.sum())})",
                )
        if threshold is not None:
            ax.axvline(float(threshold), color="black", linestyle=":", label="threshold")
        ax.set_xlim(0, 1)
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _best_of_n(entries: Entries, path: Path) -> Path | None:
    panels, ncols = _grid(entries, lambda m, s, sub: _get(sub, "best_of_n", "curve") or None)
    if not any(panels):
        return None
    fig, axes = _figure(len(panels), "Best-of-N accuracy", ncols)
    for ax, panel in zip(axes, panels):
        if panel is None:
            ax.set_visible(False)
            continue
        title, rows = panel
        ks = [r["k"] for r in rows]
        for a in AGGREGATES:
            ax.plot(ks, [r.get(a) for r in rows], marker="o", label=f"PRM {a}")
        if any(r.get("majority_vote") is not None for r in rows):
            ax.plot(ks, [r.get("majority_vote") for r in rows], marker="s", color="grey", label="majority vote")
        ax.plot(ks, [r.get("random") for r in rows], linestyle="--", color="black", label="random pick")
        ax.plot(ks, [r.get("pass") for r in rows], linestyle=":", color="black", label="pass@k")
        if len(ks) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        _accuracy_axes(ax, title, "candidates per problem (k)")
    return _save(fig, path)
