"""Figures of tracker rows: sharpness against its stability threshold, and top-k spectra over training.

matplotlib is imported only inside these functions (nothing else in ``curvature`` imports it); with no display
(no ``DISPLAY``/``MPLBACKEND``) the non-interactive Agg backend is selected before pyplot is first imported.

Rows may come straight from :attr:`~curvature.tracking.SharpnessTracker.history`, or be read back from a CSV /
JSON-lines sink (strings, empty cells, ``None``, ``"nan"``): every value is parsed the same way.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["plot_sharpness", "plot_spectrum", "log_scale", "threshold_label"]


def _pyplot() -> Any:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND") and (
            sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(value: Any) -> float | None:
    """A finite-or-NaN float from a row value (number, numeric string, empty/None → None)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensor / numpy scalar
        return float(value.item())
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("none", "null"):
            return None
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _list(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("none", "null"):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None
    out = [_num(v) for v in value]
    return [math.nan if v is None else v for v in out]


def _rows(rows: Any) -> list[Mapping]:
    """Rows as a list of mappings: a list of dicts, a pandas DataFrame, or a path to a CSV / JSON-lines file."""
    if isinstance(rows, (str, os.PathLike)):
        from .tracking import read_rows

        return read_rows(rows)
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        return rows.to_dict("records")
    return [r for r in rows if isinstance(r, Mapping)]


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where both are numbers; step defaults to the row's index."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        x = _num(row.get("step"))
        y = _num(row.get(key))
        if y is None or (not math.isfinite(y)):
            continue
        xs.append(float(i) if x is None else x)
        ys.append(y)
    return xs, ys


def _positive(ys: Iterable[float]) -> bool:
    return any(y > 0 for y in ys)


def _tick_text(value: float, _pos: Any = None) -> str:
    """A tick label as a plain number (``0.5``, ``2``, ``1e+04``), never ``2×10⁰``."""
    if value == 0 or not math.isfinite(value):
        return "0"
    return f"{value:.3g}"


def log_scale(axis: Any, values: Iterable[float], which: str = "y") -> None:
    """Put ``axis`` on a log scale with readable ticks: plain numbers; inside about one decade (where matplotlib
    would label minor ticks as ``2×10⁰``) a few evenly spaced plain ticks instead."""
    from matplotlib import ticker

    vals = [v for v in values if v > 0 and math.isfinite(v)]
    getattr(axis, f"set_{which}scale")("log")
    target = axis.yaxis if which == "y" else axis.xaxis
    ratio = max(vals) / min(vals) if vals else math.inf
    if ratio < 30:  # about a decade or less: ticks at "nice" plain numbers (0.4, 0.5, 0.6, ..., 1, 2)
        subs = tuple(float(i) for i in range(1, 10)) if ratio < 4 else (1.0, 2.0, 3.0, 5.0)
        target.set_major_locator(ticker.LogLocator(base=10, subs=subs, numticks=20))
        target.set_major_formatter(ticker.FuncFormatter(_tick_text))
    else:  # several decades: labels at the powers of ten only (10⁻², 10⁰, 10²)
        target.set_major_locator(ticker.LogLocator(base=10, numticks=12))
        target.set_major_formatter(ticker.LogFormatterSciNotation())
    target.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(float(i) for i in range(2, 10)), numticks=20))
    target.set_minor_formatter(ticker.NullFormatter())


#: Optimizers whose threshold is Adam's (2+2β₁)/((1−β₁)η) (docs/optimizers.md).
ADAM_FAMILY = ("Adam", "AdamW", "GIAdam", "Adamax", "NAdam", "RAdam", "SparseAdam")


def threshold_label(rows: Sequence[Mapping]) -> str:
    """The legend text of the rows' ``threshold``, from the optimizer that set it: the ``optimizer`` column and
    c = threshold·η (the median over rows that have both). Adam/AdamW: (2+2β₁)/((1−β₁)η) = c/η with
    β₁ = (c−2)/(c+2) (38/η for β₁ = 0.9); SGD: 2/η, or (2+2μ)/η with μ = c/2 − 1 (momentum). Every row may have
    failed: the threshold is computed before the measurement, so this still names the right formula. RMSprop:
    2/η or (2+2μ)/η; Adamax, NAdam and RAdam share Adam's formula."""
    names = [str(r.get("optimizer")) for r in rows if r.get("optimizer") not in (None, "")]
    name = max(set(names), key=names.count) if names else None
    products = [t * lr for t, lr in ((_num(r.get("threshold")), _num(r.get("lr"))) for r in rows)
                if t is not None and lr is not None and math.isfinite(t * lr) and t * lr > 0]
    c = statistics.median(products) if products else None
    adam = name is not None and (name in ADAM_FAMILY or "adam" in name.lower())
    if name == "RMSprop":  # a pre-conditioned GD step: GD's threshold, or momentum's (docs/optimizers.md)
        if c is not None and abs(c / 2 - 1) > 1e-6:
            return rf"RMSprop threshold $(2+2\mu)/\eta$ = {c:.3g}/η (momentum μ = {c / 2 - 1:.3g})"
        return r"RMSprop threshold $2/\eta$"
    if adam or (name is None and c is not None and c > 4.5):
        text = r"Adam threshold $(2+2\beta_1)/((1-\beta_1)\eta)$"
        return text + (f" = {c:.3g}/η (β₁ = {(c - 2) / (c + 2):.3g}, {name or 'Adam'})" if c is not None
                       else f" ({name})")
    if c is not None and abs(c / 2 - 1) > 1e-6:
        return rf"stability threshold $(2+2\mu)/\eta$ = {c:.3g}/η (momentum μ = {c / 2 - 1:.3g}, {name or 'SGD'})"
    if c is not None or (name is not None and name.upper().startswith("SGD")):
        return rf"stability threshold $2/\eta$ ({name or 'SGD'})"
    return "stability threshold" + (f" ({name})" if name else "")


def _warn_empty(what: str, rows: Sequence[Mapping]) -> str:
    """The text for axes with nothing to draw (and the same as a warning): how many rows failed, and the first
    error."""
    failed = [r for r in rows if r.get("error") not in (None, "")]
    text = f"no finite {what}"
    if failed:
        text += f": {len(failed)} of {len(rows)} measurements failed"
        first = " ".join(str(failed[0]["error"]).split())
        detail = f" (first error: {first[:200]})"
    elif not rows:
        text, detail = f"no {what}: no rows", ""
    else:
        detail = ""
    warnings.warn(f"curvature: the figure shows {text}{detail}", UserWarning, stacklevel=3)
    return text


def _constant(values: Sequence[float]) -> bool:
    return bool(values) and max(values) - min(values) <= 1e-9 * max(abs(v) for v in values)


def _plot_critical(ax: Any, rows: Sequence[Mapping], plain_threshold: bool) -> list[float]:
    """λ_c = 2/η_c (``critical_sharpness``) and, unless the threshold drawn already is 2/η, the line 2/η it meets at
    the edge of stability (for every optimizer: η·λ_c = 2 is where the step about to be taken starts to raise the
    loss). Returns the values drawn."""
    xc, yc = _series(rows, "critical_sharpness")
    if not yc:
        return []
    c_c = "tab:purple"
    ax.plot(xc, yc, "-^", color=c_c, ms=3, lw=1.3, label=r"critical sharpness $\lambda_c = 2/\eta_c$")
    drawn = list(yc)
    if not plain_threshold:
        pairs = [(x, 2.0 / y) for x, y in zip(*_series(rows, "lr")) if y > 0]
        if pairs:
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "-.", color=c_c, lw=1.1,
                    label=r"$\lambda_c$'s threshold $2/\eta$")
            drawn += [p[1] for p in pairs]
    return drawn


def plot_sharpness(rows: Any, path: str | os.PathLike | None = None, ax: Any = None, title: str | None = None,
                   *, show_loss: bool = True, dpi: int = 120) -> Any:
    """Sharpness against its stability threshold over training.

    Top panel (log scale): λ_max(H) and, when the rows have it (Adam/AdamW, RMSprop, Adagrad, ...), λ_max(P⁻¹H);
    the threshold (``row["threshold"]``: 2/η for SGD, (2+2μ)/η with momentum, 38/η for Adam with β₁ = 0.9, 2/η for
    RMSprop, labelled by :func:`threshold_label` from the optimizer that set it) drawn dashed in the colour of the
    quantity it bounds (λ^{P⁻¹H} where the rows have it, λ^H otherwise), or a legend entry saying that no threshold
    is derived (Adagrad, Adafactor, Adadelta: the rows' ``stability_note``); with a ``critical_sharpness`` column,
    λ_c = 2/η_c against its own threshold 2/η; the learning rate on a twin axis. Bottom panel: the loss on the
    measured data. Rows with an ``error`` are drawn as gaps (their values are skipped when missing). A figure
    without a single finite sharpness says so on the axes and in a warning (how many rows failed, the first error).

    Args:
        rows: tracker rows (``tracker.history``), a DataFrame, or a CSV / JSON-lines path written by a sink.
        path: save a PNG there (parent folders are created).
        ax: draw the sharpness panel into this axes (no loss panel then); default: a new figure.
        title: figure title.

    Returns the matplotlib ``Figure``.
    """
    plt = _pyplot()
    rows = _rows(rows)
    if ax is None:
        if show_loss:
            fig, (ax, ax_loss) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 6.0),
                                              gridspec_kw={"height_ratios": [2.2, 1.0]})
        else:
            fig, ax = plt.subplots(figsize=(7.5, 4.2))
            ax_loss = None
    else:
        fig, ax_loss = ax.figure, None

    has_pre = any(_num(r.get("preconditioned_sharpness")) is not None for r in rows)
    label = threshold_label(rows)
    adam_threshold = label.startswith("Adam threshold")
    c_h, c_p, c_lr, c_loss = "tab:blue", "tab:red", "tab:gray", "tab:green"
    drawn: list[float] = []
    xs, ys = _series(rows, "sharpness")
    if ys:
        ax.plot(xs, ys, "-o", color=c_h, ms=3, lw=1.4, label=r"$\lambda_{\max}(H)$")
        drawn += ys
    xt, yt = _series(rows, "threshold")
    values = list(ys)
    if has_pre:
        xp, yp = _series(rows, "preconditioned_sharpness")
        ax.plot(xp, yp, "-s", color=c_p, ms=3, lw=1.4, label=r"$\lambda_{\max}(P^{-1}H)$")
        drawn += yp
        values += yp
    if yt:
        ax.plot(xt, yt, "--", color=c_p if (has_pre or adam_threshold) else c_h, lw=1.2, label=label)
    elif has_pre:  # Adagrad, Adafactor, Adadelta: no derived threshold (the rows' stability_note says why)
        ax.plot([], [], " ", label="no threshold derived (see stability_note)")
    drawn += yt
    values += _series(rows, "critical_sharpness")[1]
    drawn += _plot_critical(ax, rows, plain_threshold=bool(yt) and r"$2/\eta$" in label)
    if _positive(drawn) and all(y > 0 for y in drawn):
        log_scale(ax, drawn)
    ax.set_ylabel("sharpness")
    ax.grid(True, which="major", alpha=0.3)

    handles, labels = ax.get_legend_handles_labels()
    xl, yl = _series(rows, "lr")
    if yl and _constant(yl):  # a constant lr needs no axis of its own: say it in the legend
        handles.append(plt.Line2D([], [], color="none"))
        labels.append(rf"constant learning rate $\eta$ = {yl[0]:.3g}")
    elif yl:
        ax_lr = ax.twinx()
        ax_lr.plot(xl, yl, ":", color=c_lr, lw=1.4, label=r"learning rate $\eta$ (right axis)")
        ax_lr.set_ylabel(r"learning rate $\eta$", color=c_lr)
        ax_lr.tick_params(axis="y", colors=c_lr, which="both")
        if all(y > 0 for y in yl) and max(yl) / min(yl) > 20:
            log_scale(ax_lr, yl)
        else:
            ax_lr.set_ylim(0, max(yl) * 1.08)
        h2, l2 = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    errors = [_num(r.get("step")) for r in rows if r.get("error") not in (None, "")]
    errors = [e for e in errors if e is not None]
    if errors:
        for e in errors:
            ax.axvline(e, color="black", alpha=0.25, lw=0.8)
        handles.append(plt.Line2D([], [], color="black", alpha=0.4, lw=0.8))
        labels.append("failed measurement")
    if handles:  # above the panel, outside the data: it never covers a line
        ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.01, 1.0, 0.1), mode="expand",
                  ncol=2, fontsize=8, frameon=False, borderaxespad=0.0)
    if not values:
        ax.text(0.5, 0.5, _warn_empty("sharpness values", rows), ha="center", va="center", transform=ax.transAxes,
                wrap=True)

    if ax_loss is not None:
        xo, yo = _series(rows, "loss")
        ax_loss.plot(xo, yo, "-", color=c_loss, lw=1.4)
        if yo and all(y > 0 for y in yo) and max(yo) / min(yo) > 50:
            log_scale(ax_loss, yo)
        ax_loss.set_ylabel("loss (measured batch)")
        ax_loss.set_xlabel("step")
        ax_loss.grid(True, alpha=0.3)
    else:
        ax.set_xlabel("step")
    if title:
        if ax_loss is not None or len(fig.axes) <= 2:
            fig.suptitle(title)
        else:
            ax.set_title(title, pad=34)
    return _finish(fig, path, dpi)


def plot_spectrum(rows_or_eigenvalues: Any, path: str | os.PathLike | None = None, ax: Any = None,
                  title: str | None = None, *, key: str = "eigenvalues", steps: Sequence[float] | None = None,
                  log: bool | None = None, dpi: int = 120) -> Any:
    """The top-k eigenvalues against step (one line per index i = 1..k).

    ``rows_or_eigenvalues``: tracker rows (uses ``row[key]``, ``key="preconditioned_eigenvalues"`` for P⁻¹H), a
    DataFrame or CSV/JSON-lines path, or a plain sequence of eigenvalue lists / a 2-D array ``(steps, k)`` (then
    ``steps`` gives the x values, default 0, 1, ...). ``log``: log scale (default: when every value is positive).
    Saves a PNG at ``path`` when given; returns the ``Figure``.
    """
    plt = _pyplot()
    data = rows_or_eigenvalues
    if hasattr(data, "tolist") and not hasattr(data, "columns"):
        data = data.tolist()
    xs: list[float] = []
    series: list[list[float]] = []
    is_rows = isinstance(data, (str, os.PathLike)) or hasattr(data, "columns") or (
        isinstance(data, (list, tuple)) and data and isinstance(data[0], Mapping))
    if is_rows:
        rows = _rows(data)
        for i, row in enumerate(rows):
            vals = _list(row.get(key))
            if vals is None and key == "eigenvalues":
                one = _num(row.get("sharpness"))
                vals = None if one is None else [one]
            if not vals:
                continue
            step = _num(row.get("step"))
            xs.append(float(i) if step is None else step)
            series.append(vals)
    else:
        for i, vals in enumerate(data):
            vals = _list(vals)
            if not vals:
                continue
            xs.append(float(steps[i]) if steps is not None else float(i))
            series.append(vals)
    own_figure = ax is None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
    else:
        fig = ax.figure
    k = max((len(v) for v in series), default=0)
    cmap = plt.get_cmap("viridis")
    flat = [v for vals in series for v in vals if math.isfinite(v)]
    for i in range(k):
        px = [x for x, vals in zip(xs, series) if len(vals) > i and math.isfinite(vals[i])]
        py = [vals[i] for vals in series if len(vals) > i and math.isfinite(vals[i])]
        ax.plot(px, py, "-o", ms=2.5, lw=1.2, color=cmap(i / max(k - 1, 1)), label=rf"$\lambda_{{{i + 1}}}$")
    if log is None:
        log = bool(flat) and all(v > 0 for v in flat)
    if log:
        log_scale(ax, flat)
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue" + (" of $P^{-1}H$" if key.startswith("preconditioned") else " of $H$"))
    ax.grid(True, which="major", alpha=0.3)
    if k:
        ax.legend(fontsize=8, ncol=min(k, 8), loc="lower left", bbox_to_anchor=(0.0, 1.01), frameon=False,
                  borderaxespad=0.0)
    if not flat:
        ax.text(0.5, 0.5, _warn_empty("eigenvalues", rows if is_rows else []), ha="center", va="center",
                transform=ax.transAxes, wrap=True)
    if title:
        if own_figure:
            fig.suptitle(title)
        else:
            ax.set_title(title, pad=34)
    return _finish(fig, path, dpi)


def _finish(fig: Any, path: str | os.PathLike | None, dpi: int) -> Any:
    """Lay out the figure, save it as ``path`` (folders created) when given, and return it."""
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig
