"""#12.5: every numeric option is validated with an error that names it (tol=inf used to return the random start
vector's Rayleigh quotient as a converged λ; tol<=0 or NaN spent the whole budget; a string crashed later)."""
from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import curvature as cv
from curvature import _validate as v
from conftest import mlp_ce

BAD_TOLS = [math.inf, -math.inf, math.nan, 0.0, -1e-3, "1e-4", None, True]


@pytest.mark.parametrize("tol", BAD_TOLS, ids=repr)
def test_check_tol(tol):
    with pytest.raises((ValueError, TypeError), match=r"^tol must be"):
        v.check_tol(tol)


def test_small_checks():
    assert v.check_tol(1e-4) == 1e-4 and v.check_tol(torch.tensor(1e-3)) == pytest.approx(1e-3)
    assert v.check_positive_int(3, "k") == 3 and v.check_positive_int(2.0, "k") == 2
    for bad, exc in ((0, ValueError), (-1, ValueError), (1.5, ValueError), (True, TypeError), ("2", TypeError),
                     (math.inf, ValueError), (None, TypeError)):
        with pytest.raises(exc, match=r"^k must be"):
            v.check_positive_int(bad, "k")
    assert v.check_nonneg_int(0, "n") == 0 and v.check_optional_positive_int(None, "max_iters") is None
    with pytest.raises(ValueError, match=r"^max_iters must be an integer >= 1, got 0"):
        v.check_optional_positive_int(0, "max_iters")
    with pytest.raises(ValueError, match=r"^lr must be a finite number"):
        v.check_positive_float(math.nan, "lr")
    with pytest.raises(ValueError, match=r"^lr must be > 0"):
        v.check_positive_float(0.0, "lr")
    with pytest.raises(TypeError, match=r"^seed must be an integer"):
        v.check_seed("0")
    with pytest.raises(ValueError, match=r"^seed must be an integer in"):
        v.check_seed(2 ** 70)


@pytest.mark.parametrize("tol", [math.inf, math.nan, 0.0, -1.0, "1e-4"], ids=repr)
def test_entry_points_refuse_bad_tol(tol):
    model, loss_fn, data = mlp_ce()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    calls = [lambda: cv.sharpness(model, loss_fn, data, tol=tol),
             lambda: cv.preconditioned_sharpness(model, loss_fn, data, opt, tol=tol),
             lambda: cv.check_hvp(model, loss_fn, data, tol=tol),
             lambda: cv.hessian_trace(model, loss_fn, data, tol=tol),
             lambda: cv.layer_curvature(model, loss_fn, data, tol=tol)]
    for call in calls:
        with pytest.raises((ValueError, TypeError), match=r"tol must be"):
            call()


def test_entry_points_refuse_bad_counts_and_seeds():
    model, loss_fn, data = mlp_ce()
    cases = [(dict(k=0), "k must be"), (dict(k=2.5), "k must be"), (dict(k=True), "k must be"),
             (dict(max_iters=0), "max_iters must be"), (dict(max_iters="10"), "max_iters must be"),
             (dict(solver_seed="a"), "solver_seed must be"), (dict(max_batch_size=0), "max_batch_size must be"),
             (dict(chunk_size=-1), "chunk_size must be"), (dict(seed=1.5), "seed must be"),
             (dict(k=10 ** 6), "eigenpairs asked of an operator of size")]
    for kw, needle in cases:
        with pytest.raises((ValueError, TypeError), match=needle):
            cv.sharpness(model, loss_fn, data, **kw)
    with pytest.raises(ValueError, match=r"num_directions must be >= 2"):
        cv.check_hvp(model, loss_fn, data, num_directions=1)
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        cv.check_hvp(model, loss_fn, data, eps=0.0)
    with pytest.raises(ValueError, match=r"num_probes must be"):
        cv.hessian_spectral_density(model, loss_fn, data, num_probes=0)
    with pytest.raises(ValueError, match=r"num_hvps must be"):
        cv.hessian_trace(model, loss_fn, data, method="hutchpp", num_hvps=0)
    with pytest.raises(ValueError, match=r"weight_fn returned nan"):
        cv.sharpness(model, loss_fn, [data, data], weight_fn=lambda b: math.nan)


FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
''')


@pytest.mark.parametrize("tol", ["inf", "nan", "0"])
def test_cli_check_hvp_refuses_bad_tol(tmp_path, monkeypatch, capsys, tol):
    from curvature.cli import main

    (tmp_path / "valfactories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["check-hvp", "--model", "valfactories:model", "--data", "valfactories:data", "--tol", tol])
    err = capsys.readouterr().err
    assert code != 0 and "tol must be" in err and "Traceback" not in err
    sys.modules.pop("valfactories", None)


@pytest.mark.parametrize("tol", ["inf", "nan"])
def test_cli_analyze_refuses_bad_tol_before_any_work(tmp_path, monkeypatch, capsys, tol):
    from curvature.cli import main

    (tmp_path / "valfactories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import valfactories

    (tmp_path / "ck").mkdir()
    torch.save(valfactories.model().state_dict(), tmp_path / "ck" / "step_1.pt")
    out = tmp_path / "rows.csv"
    code = main(["analyze", str(tmp_path / "ck"), "--model", "valfactories:model", "--data", "valfactories:data",
                 "--tol", tol, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--tol must be a finite number > 0" in err and not out.exists()
    sys.modules.pop("valfactories", None)
