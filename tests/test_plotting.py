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
