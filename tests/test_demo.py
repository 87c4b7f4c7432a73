"""`curvature demo --quick` end to end: files written, the edge of stability reached, offline = online."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvature.checkpoints import read_rows
from curvature.demo import digits_data, digits_loss, digits_model

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "curvature.cli", "demo", "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("sharpness.csv", "sharpness.png", "checkpoints.csv"):
        assert (out / name).stat().st_size > 0, name
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) >= 3
    assert "η·λ/2" in proc.stdout and "curvature analyze" in proc.stdout

    history = read_rows(out / "sharpness.csv")
    assert len(history) >= 10 and all(not r["error"] for r in history)
    ratios = [r["edge_ratio"] for r in history]
    assert ratios[0] < 0.2          # far below the edge at the start of warm-up
    assert max(ratios) > 0.9        # warm-up brings it to the edge of stability (2/η ≈ λ_max)
    for r in history:
        assert r["threshold"] == pytest.approx(2.0 / r["lr"])

    # the offline analysis of each checkpoint equals the tracker's measurement at that step
    analysis = read_rows(out / "checkpoints.csv")
    assert [r["step"] for r in analysis] == [int(p.stem.split("_")[1]) for p in ckpts]
    online = {r["step"]: r for r in history}
    for row in analysis:
        assert row["error"] is None and row["converged"]
        if row["step"] in online:
            assert row["sharpness"] == pytest.approx(online[row["step"]]["sharpness"], rel=1e-3)
            assert row["lr"] == pytest.approx(online[row["step"]]["lr"], rel=1e-12)


def test_factories_fit_the_checkpoints():
    X, Y = digits_data()
    assert X.shape == (1437, 64) and Y.shape == (1437, 10)
    assert torch.allclose(Y.sum(1), torch.ones(1437))
    Xt, yt = digits_data("test", one_hot=False)
    assert Xt.shape == (360, 64) and yt.dtype == torch.long
    state = torch.random.get_rng_state()
    model = digits_model()
    assert torch.equal(state, torch.random.get_rng_state())  # building the model leaves the global RNG alone
    assert sum(p.numel() for p in model.parameters()) == 3466
    assert digits_loss(model(X), Y).ndim == 0
    with pytest.raises(ValueError, match="split"):
        digits_data("valid")
