"""Plot helpers: PNGs from tracker rows, from rows read back from CSV (strings, empty cells), and spectra."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("matplotlib")

from curvature.plotting import plot_sharpness, plot_spectrum  # noqa: E402
from curvature.tracking import SharpnessTracker  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def adam_rows(tmp_path_factory):
    torch.manual_seed(0)
    X, Y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 6))
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    tracker = SharpnessTracker(F.cross_entropy, every=2, k=3, tol=1e-3, sinks=[path])
    for i in range(10):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        tracker.step(model, opt, (X, Y), step=i)
        opt.step()
        sched.step()
    tracker.close()
    return tracker.history, path


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == PNG


def test_plot_sharpness_from_history(adam_rows, tmp_path):
    rows, _ = adam_rows
    fig = plot_sharpness(rows, tmp_path / "a" / "sharp.png", title="tiny Adam run")
    assert _is_png(tmp_path / "a" / "sharp.png")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("P^{-1}H" in lab for lab in labels) and any("threshold" in lab for lab in labels)
    assert ax.get_yscale() == "log"
    assert len(fig.axes) == 3  # sharpness, loss, lr twin


def test_plot_sharpness_from_csv_strings_and_gaps(adam_rows, tmp_path):
    _, path = adam_rows
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))  # all strings
    raw[1]["sharpness"] = ""          # an empty cell
    raw[2]["error"] = "FloatingPointError: the loss is nan"
    raw[2]["loss"] = "nan"
    raw.append({"step": "20", "sharpness": None, "threshold": "", "lr": "0.01", "loss": ""})
    plot_sharpness(raw, tmp_path / "csv.png")
    assert _is_png(tmp_path / "csv.png")
    plot_sharpness(str(path), tmp_path / "path.png")  # a path is read back too
    assert _is_png(tmp_path / "path.png")


def test_plot_sharpness_sgd_rows_into_given_axes(tmp_path):
    import matplotlib.pyplot as plt

    rows = [{"step": i, "lr": 0.1, "loss": 1.0 / (i + 1), "sharpness": 5.0 + i, "threshold": 20.0,
             "preconditioned_sharpness": None} for i in range(5)]
    fig, ax = plt.subplots()
    out = plot_sharpness(rows, ax=ax)
    assert out is fig
    assert any("threshold" in line.get_label() for line in ax.get_lines())
    plt.close(fig)
    plot_sharpness([], tmp_path / "empty.png")  # nothing to draw still gives a figure
    assert _is_png(tmp_path / "empty.png")


def test_plot_spectrum(adam_rows, tmp_path):
    rows, path = adam_rows
    fig = plot_spectrum(rows, tmp_path / "spec.png")
    assert _is_png(tmp_path / "spec.png") and len(fig.axes[0].get_lines()) == 3
    fig = plot_spectrum(str(path), tmp_path / "spec_pre.png", key="preconditioned_eigenvalues")
    assert len(fig.axes[0].get_lines()) == 3
    fig = plot_spectrum(torch.tensor([[3.0, 2.0], [4.0, 1.0], [5.0, 0.5]]), steps=[0, 10, 20])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 10, 20]
    plot_spectrum([[1.0, -0.5], [2.0, -0.1]], tmp_path / "neg.png")  # negative eigenvalues: linear scale
    assert _is_png(tmp_path / "neg.png")


# --- figures one would put in a paper (issue 14.9) ---------------------------------------------------------
def _rows(lrs, lams, thr_num=2.0, pre=None):
    out = []
    for i, (lr, lam) in enumerate(zip(lrs, lams)):
        out.append({"step": i, "lr": lr, "sharpness": lam, "threshold": thr_num / lr, "loss": 1.0 / (i + 1),
                    "preconditioned_sharpness": None if pre is None else pre[i]})
    return out


def _lines(fig):
    return [ln for ax in fig.axes for ln in ax.get_lines()]


def test_legend_is_outside_the_data_and_never_covers_a_line():
    import matplotlib.pyplot as plt

    fig = plot_sharpness(_rows([0.1 * (i + 1) for i in range(20)], [0.5 + 0.1 * i for i in range(20)]))
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent().shrunk(0.99, 0.99)), "the legend sits on the data"
    assert legend.y0 >= ax.get_window_extent().y1 - 1  # above the sharpness panel
    plt.close(fig)


def test_constant_lr_gets_no_twin_axis_and_is_named_in_the_legend():
    import matplotlib.pyplot as plt

    fig = plot_sharpness(_rows([0.003] * 10, [1.0 + 0.01 * i for i in range(10)]))
    assert len(fig.axes) == 2  # sharpness + loss, no learning-rate axis of 0.00285–0.00315
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("constant learning rate" in t and "0.003" in t for t in labels)
    plt.close(fig)


def test_log_ticks_inside_one_decade_are_plain_numbers():
    import matplotlib.pyplot as plt

    fig = plot_sharpness(_rows([1.0] * 10, [2.0 + 0.2 * i for i in range(10)], thr_num=4.0))  # 2 … 4
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    labels += [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    assert labels and not any("times" in t or "×" in t or "^" in t for t in labels), labels
    assert {"2", "3", "4"} <= set(labels)
    plt.close(fig)


def test_adam_draws_the_preconditioned_sharpness_against_its_threshold(tmp_path):
    # analyze --plot on Adam checkpoints: λ(P⁻¹H) and the dashed 38/η line in the same colour, λ(H) too
    import matplotlib.pyplot as plt

    from curvature.cli import _plot

    rows = _rows([0.01] * 5, [1.0] * 5, thr_num=38.0, pre=[1000.0, 1500.0, 2500.0, 3000.0, 3500.0])
    _plot(rows, str(tmp_path / "a.png"), k=1)
    fig = plot_sharpness(rows)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert any("P^{-1}H" in lb for lb in labels) and any("Adam threshold" in lb for lb in labels)
    pre = next(ln for ln in fig.axes[0].get_lines() if "P^{-1}H" in ln.get_label())
    thr = next(ln for ln in fig.axes[0].get_lines() if "Adam threshold" in ln.get_label())
    assert pre.get_color() == thr.get_color() and list(thr.get_ydata()) == pytest.approx([3800.0] * 5)
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)
    plt.close("all")


def test_schedule_comparison_figure_has_the_threshold_line(tmp_path):
    import matplotlib.pyplot as plt

    from curvature.compare import compare_schedules

    torch.manual_seed(0)
    data = (torch.randn(64, 4), torch.randn(64, 2))
    make = lambda seed=0: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))  # noqa: E731
    res = compare_schedules(make, data, {"none": "constant", "linear": "linear"}, steps=6, lr_target=0.5,
                            track_every=3)
    fig = res.plot(tmp_path / "c.png", title="tiny")
    lines = fig.axes[1].get_lines()
    thr = [ln for ln in lines if "threshold" in ln.get_label()]
    assert thr and list(thr[0].get_ydata()) == pytest.approx([2 / 0.5, 2 / 0.5])
    assert fig.axes[1].get_yscale() == "log"
    plt.close(fig)
