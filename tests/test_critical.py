"""Critical sharpness λ_c = 2/η_c (curvature.critical) against independent references.

* brute force: a fine geometric scan of L(θ + Δ(η)) where Δ(η) is the *real* update of a deep copy of the model and
  optimizer stepped with lr η, then bisection; for every linear-in-lr torch.optim optimizer, at rtol=1e-3;
* GD on ½θᵀAθ: λ_c = gᵀAg/gᵀg exactly;
* nothing changes (parameters, buffers, .grad, optimizer state, RNG, modes), also when interrupted;
* warm-started forward counts, multi-batch weighting, clear errors.
"""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_same_state, snapshot
from curvature import critical_sharpness

DT = torch.float64

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.3),
    "SGD-momentum-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "RMSprop-centered-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, lr_decay=1e-3),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    "Muon": lambda p: torch.optim.Muon([q for q in p if q.ndim == 2], lr=1e-2),
}


def problem(seed: int = 0, dropout: bool = False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12), nn.Tanh()] + ([nn.Dropout(0.2)] if dropout else []) + [nn.Linear(12, 4)]
    model = nn.Sequential(*layers).to(DT)
    x, y = torch.randn(40, 6, dtype=DT), torch.randint(0, 4, (40,))
    return model, F.cross_entropy, (x, y)


def trained(name: str, steps: int = 3, dropout: bool = False):
    """A model + optimizer with a few real steps behind them (optimizer state exists) and fresh .grad."""
    model, loss_fn, (x, y) = problem(dropout=dropout)
    opt = OPTIMIZERS[name](list(model.parameters()))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    return model, loss_fn, (x, y), opt


def real_step(model, opt, eta: float) -> list[torch.Tensor]:
    """θ₁ − θ of one real step with lr η (all groups scaled together) of deep copies of the model and optimizer."""
    memo: dict = {}
    m2 = copy.deepcopy(model, memo)
    o2 = copy.deepcopy(opt, memo)
    for p, p2 in zip(model.parameters(), m2.parameters()):  # Parameter.__deepcopy__ leaves .grad behind
        p2.grad = None if p.grad is None else p.grad.clone()
    lr0 = float(opt.param_groups[0]["lr"])
    for g, g0 in zip(o2.param_groups, opt.param_groups):
        g["lr"] = eta * float(g0["lr"]) / lr0
    o2.step()
    return [(p2 - p).detach() for p, p2 in zip(model.parameters(), m2.parameters())]


def loss_along(model, loss_fn, batch, delta, s: float) -> float:
    params = {n: p.detach() + s * d for (n, p), d in zip(model.named_parameters(), delta)}
    with torch.no_grad():
        return float(loss_fn(torch.func.functional_call(model, params, (batch[0],)), batch[1]))


def brute_force_lr_c(model, loss_fn, batch, opt, ratio: float = 1.02) -> float:
    """Along the real update Δ of a deep copy (one step at the optimizer's lr η₀): the first s of a geometric scan
    (from 1e-3, ratio 1.02) with L(θ + sΔ) > L(θ), refined by bisection to 1e-9; η_c = s·η₀."""
    lr0 = float(opt.param_groups[0]["lr"])
    delta = real_step(model, opt, lr0)
    loss0 = loss_along(model, loss_fn, batch, delta, 0.0)
    lo, s = 0.0, 1e-3
    while loss_along(model, loss_fn, batch, delta, s) <= loss0:
        lo, s = s, s * ratio
        assert s < 1e5, "no rise found"
    hi = s
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if loss_along(model, loss_fn, batch, delta, mid) <= loss0:
            lo = mid
        else:
            hi = mid
    return hi * lr0


@pytest.mark.parametrize("name", sorted(set(OPTIMIZERS) - {"Adafactor"}))
def test_the_real_step_scales_with_the_lr(name):
    """The premise Δ(η) = (η/η₀)·Δ(η₀) for the real steps (torch's Adafactor caps its step at 1/√t: excluded)."""
    model, _, _, opt = trained(name)
    lr0 = float(opt.param_groups[0]["lr"])
    for a, b in zip(real_step(model, opt, lr0), real_step(model, opt, 2.5 * lr0)):
        torch.testing.assert_close(b, 2.5 * a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_brute_force_scan_of_the_real_update(name):
    model, loss_fn, batch, opt = trained(name)
    ref = brute_force_lr_c(model, loss_fn, batch, opt)
    res = critical_sharpness(model, loss_fn, batch, opt, rtol=1e-3)
    assert res.converged, res.note
    assert abs(res.critical_lr - ref) <= 1e-3 * ref, (name, res.critical_lr, ref)
    assert res.critical_sharpness == pytest.approx(2 / res.critical_lr)
    assert res.update == ("closed_form" if name.split("-")[0] in ("SGD", "Adam", "AdamW") else "virtual_step")
    lo, hi = res.bracket
    assert lo < ref * (1 + 1e-9) and hi >= ref * (1 - 1e-9)  # the bracket holds the true crossing
    assert res.edge_ratio == pytest.approx(float(opt.param_groups[0]["lr"]) / res.critical_lr)


@pytest.mark.parametrize("search", ["model", "bisection"])
def test_gd_on_a_quadratic_gives_gAg_over_gg(search):
    torch.manual_seed(3)
    Q = torch.randn(7, 7, dtype=DT)
    A = Q @ Q.T + 0.1 * torch.eye(7, dtype=DT)

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.randn(7, dtype=DT))

        def forward(self, x):
            return 0.5 * self.theta @ A @ self.theta + 0.0 * x.sum()

    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = (torch.zeros(1, 1, dtype=DT), None)
    model(batch[0]).backward()
    g = model.theta.grad.detach()
    expected = float(g @ A @ g / (g @ g))
    res = critical_sharpness(model, lambda out, y: out, batch, opt, rtol=1e-6, search=search)
    assert res.converged and res.critical_sharpness == pytest.approx(expected, rel=1e-6)
    assert res.directional_derivative == pytest.approx(-float(g @ g))  # gᵀu with u = Δ/η = −g


@pytest.mark.parametrize("name", ["SGD-momentum-nesterov-wd", "AdamW-amsgrad", "NAdam", "Adafactor", "Muon",
                                  "RMSprop-centered-momentum"])
def test_nothing_changes(name):
    model, loss_fn, batch, opt = trained(name, dropout=True)
    model.train()
    for g in opt.param_groups:  # a tensor lr must come back as the same object
        g["lr"] = torch.tensor(float(g["lr"]), dtype=DT) if name == "Adafactor" else g["lr"]
    lr_objects = [g["lr"] for g in opt.param_groups]
    grads = [p.grad for p in model.parameters()]
    before = snapshot(model, opt)
    res = critical_sharpness(model, loss_fn, batch, opt)
    assert res.converged
    assert_same_state(before, model, opt)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, lr_objects))
    # dropout: one fixed mask for every forward of a call, so the same seed gives the same answer
    a, b = (critical_sharpness(model, loss_fn, batch, opt, seed=7) for _ in range(2))
    assert a.history == b.history
    assert_same_state(before, model, opt)


@pytest.mark.parametrize("name", ["Adam", "NAdam"])
@pytest.mark.parametrize("at_call", [1, 3])
def test_state_restored_when_interrupted(name, at_call):
    model, loss_fn, batch, opt = trained(name)
    before = snapshot(model, opt)
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt

    handle = model[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        critical_sharpness(model, loss_fn, batch, opt)
    handle.remove()
    assert_same_state(before, model, opt)


class _InterruptedNAdam(torch.optim.NAdam):
    """A step that is interrupted after it has moved the parameters and the state."""

    def step(self, closure=None):
        super().step(closure)
        raise KeyboardInterrupt


def test_state_restored_when_the_virtual_step_is_interrupted():
    model, loss_fn, batch = problem()
    opt = _InterruptedNAdam(model.parameters(), lr=1e-2)
    loss_fn(model(batch[0]), batch[1]).backward()
    before = snapshot(model, opt)
    with pytest.raises(KeyboardInterrupt):
        critical_sharpness(model, loss_fn, batch, opt)
    assert_same_state(before, model, opt)
    assert not opt.state  # the state the step created is gone again


def test_batchnorm_running_stats_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).to(DT).train()
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    before = snapshot(model, opt)
    assert critical_sharpness(model, F.cross_entropy, (x, y), opt).converged
    assert_same_state(before, model, opt)


def test_multi_batch_data_is_sample_weighted():
    model, loss_fn, (x, y), opt = trained("Adam")
    whole = critical_sharpness(model, loss_fn, (x, y), opt, rtol=1e-4)
    parts = critical_sharpness(model, loss_fn, [(x[:7], y[:7]), (x[7:], y[7:])], opt, rtol=1e-4)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-12)
    assert parts.critical_lr == pytest.approx(whole.critical_lr, rel=1e-4)


def test_reused_loss_saves_the_forward_at_theta():
    model, loss_fn, (x, y), opt = trained("SGD")
    with torch.no_grad():
        loss = loss_fn(model(x), y)
    a = critical_sharpness(model, loss_fn, (x, y), opt)
    b = critical_sharpness(model, loss_fn, (x, y), opt, loss=loss)
    assert b.loss_reused and not a.loss_reused
    assert b.forward_passes == a.forward_passes - 1 and b.critical_lr == a.critical_lr


def test_reference_data_measures_the_loss_elsewhere():
    model, loss_fn, (x, y), opt = trained("SGD")
    other = (x.flip(0)[:20] * 0.5, y.flip(0)[:20])
    res = critical_sharpness(model, loss_fn, (x, y), opt, reference_data=other, rtol=1e-4)
    with torch.no_grad():
        assert res.loss == pytest.approx(float(loss_fn(model(other[0]), other[1])))
    lo, hi = res.bracket
    delta = real_step(model, opt, float(opt.param_groups[0]["lr"]))
    lr0 = float(opt.param_groups[0]["lr"])
    assert loss_along(model, loss_fn, other, delta, lo / lr0) <= res.loss < loss_along(model, loss_fn, other, delta,
                                                                                         hi / lr0)


def test_warm_start_forward_counts():
    """Along a GD trajectory near the edge of stability, warm-started from the previous η_c: the model-placed search
    needs fewer forwards than the published one (6 + 1), which itself stays within its published 5–6 + 1."""
    model, loss_fn, (x, y) = problem(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    counts: dict[str, list[int]] = {"model": [], "bisection": []}
    prev: dict[str, float | None] = {"model": None, "bisection": None}
    for _ in range(12):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        for search in counts:
            r = critical_sharpness(model, loss_fn, (x, y), opt, lr_start=prev[search], search=search)
            assert r.converged
            if prev[search] is not None:
                counts[search].append(r.forward_passes)
            prev[search] = r.critical_lr
        opt.step()
    assert statistics.median(counts["bisection"]) <= 7
    assert statistics.median(counts["model"]) < statistics.median(counts["bisection"])


@pytest.mark.parametrize("make, what", [
    (lambda p: torch.optim.LBFGS(p), "LBFGS"),
    (lambda p: torch.optim.Rprop(p), "Rprop"),
])
def test_nonlinear_optimizers_are_refused(make, what):
    model, loss_fn, batch = problem()
    opt = make(list(model.parameters()))
    loss_fn(model(batch[0]), batch[1]).backward()
    with pytest.raises(TypeError, match=what):
        critical_sharpness(model, loss_fn, batch, opt)


def test_bad_input_is_named():
    model, loss_fn, batch = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss.backward"):
        critical_sharpness(model, loss_fn, batch, opt)
    loss_fn(model(batch[0]), batch[1]).backward()
    with pytest.raises(ValueError, match="rtol"):
        critical_sharpness(model, loss_fn, batch, opt, rtol=0)
    with pytest.raises(ValueError, match="search"):
        critical_sharpness(model, loss_fn, batch, opt, search="golden")
    with pytest.raises(TypeError, match="optimizer"):
        critical_sharpness(model, loss_fn, batch, "sgd")


def test_uphill_update_says_so():
    model, loss_fn, batch = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    loss_fn(model(batch[0]), batch[1]).backward()
    res = critical_sharpness(model, loss_fn, batch, opt)
    assert not res.converged and math.isnan(res.critical_sharpness) and "rose at every lr" in res.note


def test_zero_lr_warmup_start():
    model, loss_fn, batch, opt = trained("Adam")
    ref = critical_sharpness(model, loss_fn, batch, opt, rtol=1e-4)
    for g in opt.param_groups:
        g["lr"] = 0.0
    res = critical_sharpness(model, loss_fn, batch, opt, rtol=1e-4)
    assert res.lr == 0.0 and res.edge_ratio == 0.0
    assert res.critical_lr == pytest.approx(ref.critical_lr, rel=2e-4)


def test_bf16_autocast_is_reported():
    model, loss_fn, batch, opt = trained("AdamW-amsgrad")
    model.float()
    batch = (batch[0].float(), batch[1])
    with torch.no_grad():
        for p in model.parameters():
            p.grad = p.grad.float()
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = critical_sharpness(model, loss_fn, batch, opt2)
    plain = critical_sharpness(model, loss_fn, batch, opt2)
    assert res.autocast == "cpu:bfloat16" and plain.autocast is None
    assert res.converged and abs(res.critical_lr / plain.critical_lr - 1) < 0.25


# ---------------------------------------------------------------------------------------------------
# The tracker's critical_every cadence
# ---------------------------------------------------------------------------------------------------
def _loop(name: str, tracker=None, steps: int = 6, loss_to_tracker: bool = False):
    model, loss_fn, (x, y) = problem(seed=2)
    opt = OPTIMIZERS[name](list(model.parameters()))
    for i in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if tracker is not None:
            tracker.step(model, opt, (x, y), step=i, **({"loss": loss.detach()} if loss_to_tracker else {}))
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", ["SGD", "RMSprop-centered-momentum", "Adam"])
def test_tracker_writes_critical_columns_on_its_own_cadence(name, tmp_path):
    from curvature.tracking import SharpnessTracker, read_rows
    tracker = SharpnessTracker(F.cross_entropy, every=4, critical_every=2, sinks=[tmp_path / "rows.csv"])
    _loop(name, tracker)
    rows = tracker.history
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert [r["sharpness"] is not None for r in rows] == [True, False, True]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["critical_sharpness"] > 0 and r["critical_forward_passes"] >= 2
        assert r["critical_edge_ratio"] == pytest.approx(r["lr"] * r["critical_sharpness"] / 2)
        assert r["critical_lr"] == pytest.approx(2 / r["critical_sharpness"])
    back = read_rows(tmp_path / "rows.csv")
    assert [r["critical_forward_passes"] for r in back] == [r["critical_forward_passes"] for r in rows]
    assert back[1]["critical_sharpness"] == pytest.approx(rows[1]["critical_sharpness"])


def test_tracker_rows_equal_direct_warm_started_calls():
    from curvature.tracking import SharpnessTracker
    tracker = SharpnessTracker(F.cross_entropy, every=None, critical_every=1)
    _loop("NAdam", tracker, steps=3)
    model, loss_fn, (x, y) = problem(seed=2)
    opt = OPTIMIZERS["NAdam"](list(model.parameters()))
    prev = None
    for i in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        res = critical_sharpness(model, loss_fn, (x, y), opt, lr_start=prev)
        prev = res.critical_lr
        assert tracker.history[i]["critical_sharpness"] == res.critical_sharpness
        assert tracker.history[i]["critical_forward_passes"] == res.forward_passes
        opt.step()


def test_tracked_training_is_bit_identical():
    from curvature.tracking import SharpnessTracker
    plain, plain_opt = _loop("Adafactor", None)
    tracked, tracked_opt = _loop("Adafactor", SharpnessTracker(F.cross_entropy, every=None, critical_every=1))
    for a, b in zip(plain.parameters(), tracked.parameters()):
        assert torch.equal(a, b)
    assert str(plain_opt.state_dict()) == str(tracked_opt.state_dict())


def test_tracker_reuses_the_training_loss():
    from curvature.tracking import SharpnessTracker
    with_loss = SharpnessTracker(F.cross_entropy, every=None, critical_every=1)
    without = SharpnessTracker(F.cross_entropy, every=None, critical_every=1)
    _loop("SGD", with_loss, steps=3, loss_to_tracker=True)
    _loop("SGD", without, steps=3)
    for a, b in zip(with_loss.history, without.history):
        assert a["critical_forward_passes"] == b["critical_forward_passes"] - 1
        assert a["critical_sharpness"] == b["critical_sharpness"]


def test_tracker_after_step_says_why_there_is_no_critical_value():
    from curvature.tracking import SharpnessTracker
    with pytest.raises(ValueError, match="when='before_step'"):  # a set-up mistake: said at construction
        SharpnessTracker(F.cross_entropy, every=None, critical_every=1, when="after_step")


def test_plot_shows_critical_sharpness_beside_lambda_max(tmp_path):
    from curvature.plotting import plot_sharpness
    from curvature.tracking import SharpnessTracker
    tracker = SharpnessTracker(F.cross_entropy, every=2, critical_every=1)
    _loop("Adam", tracker, steps=4)
    fig = plot_sharpness(tracker.history, tmp_path / "fig.png")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any("lambda_c" in lab for lab in labels) and any("lambda_c" in lab and "2/\\eta" in lab for lab in labels)
    assert any("lambda_{\\max}(H)" in lab for lab in labels)


def test_lightning_callback_passes_critical_every_through():
    pytest.importorskip("lightning.pytorch")
    from test_lightning import fit
    from curvature.integrations.lightning import SharpnessCallback
    cb = SharpnessCallback(F.cross_entropy, every=None, critical_every=2)
    fit("adam", [cb], max_steps=5)
    rows = cb.history
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(r["critical_sharpness"] > 0 and r["error"] is None for r in rows)


def test_hf_callback_passes_critical_every_through(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_transformers_callback import train
    from curvature.integrations.transformers import SharpnessCallback
    cb = SharpnessCallback(every=None, critical_every=2)
    train(tmp_path, [cb], steps=3)
    rows = cb.tracker.history
    assert [r["step"] for r in rows] == [0, 2]
    assert all(r["critical_sharpness"] > 0 and r["error"] is None for r in rows), rows


# ---------------------------------------------------------------------------------------------------
# 2 gloo processes: DDP (replicated parameters) and FSDP2 (sharded), the same λ_c as one process on all the data
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_outs(tmp_path_factory):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    import _critical_worker as W
    from test_distributed import _spawn
    return _spawn(tmp_path_factory.mktemp("critical"), timeout=300, fn=W.run)


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_ddp_every_rank_gets_the_single_process_result(dist_outs, name):
    a, b = (o[f"ddp_{name}"] for o in dist_outs)
    assert a == b  # bitwise the same decisions and values on both ranks
    ref = dist_outs[0][f"ref_{name}"]
    assert a["world_size"] == 2 and a["converged"]
    assert a["forward_passes"] == ref["forward_passes"]
    assert a["critical_lr"] == pytest.approx(ref["critical_lr"], rel=1e-12)
    assert a["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    assert all(o[f"untouched_{name}"] for o in dist_outs)


def test_ddp_failure_on_one_rank_raises_on_every_rank(dist_outs):
    assert dist_outs[1]["fail_together"].startswith("own: injected failure")
    assert dist_outs[0]["fail_together"].startswith("remote:") and "injected failure" in dist_outs[0]["fail_together"]


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
def test_fsdp2_sharded_parameters_give_the_single_process_result(dist_outs, name):
    a, b = (o[f"fsdp_{name}"] for o in dist_outs)
    assert a == b
    ref = dist_outs[0][f"fsdp_ref_{name}"]
    assert a["converged"] and a["forward_passes"] == ref["forward_passes"]
    assert a["critical_lr"] == pytest.approx(ref["critical_lr"], rel=1e-10)
    assert all(o[f"fsdp_untouched_{name}"] for o in dist_outs)


@pytest.mark.parametrize("start", [3.0, 0.1])
def test_model_search_falls_back_to_bisection_when_the_model_is_poor(start):
    """L(θ + w) − L(θ) = w·(−1000 + 1020·(1 − e^{−w/0.05})) along the update (the shape of the small GPT's AdamW step
    at step 10: a steep descent, then a saturating rise): the slope at 0 dwarfs h past the root, so the secant
    root always lands just below hi. A warm start 3× too large once took 28 forwards (bisection: 9); the
    model-placed search must stay within 2 of the published one."""
    w_c = 0.05 * math.log(51.0)

    class Profile(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros((), dtype=DT))

        def forward(self, x):
            w = self.w
            return w * (-1000 + 1020 * (1 - torch.exp(-w / 0.05))) + 0.0 * x.sum()

    counts = {}
    for search in ("model", "bisection"):
        model = Profile()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        batch = (torch.zeros(1, 1, dtype=DT), None)
        model(batch[0]).backward()  # g = −1000: Δ(η) = 1000·η
        eta_c = w_c / 1000
        res = critical_sharpness(model, lambda out, y: out, batch, opt, lr_start=start * eta_c, search=search)
        assert res.converged and res.critical_lr == pytest.approx(eta_c, rel=1 / 32)
        counts[search] = res.forward_passes
    assert counts["model"] <= counts["bisection"] + 2, counts
