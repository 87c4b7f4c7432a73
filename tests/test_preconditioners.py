"""#21 part 3: λ(P⁻¹H) beyond Adam (RMSprop, Adagrad, Adamax, NAdam, RAdam, Adafactor, Adadelta).

References, independent of the library's code:
* H: dense float64 central differences of first-order gradients (``dense_hessian_fd``).
* P by hand from the optimizer's state dict with torch 2.13's update rules (RMSprop, Adagrad), and P checked against
  the optimizer's own next step, taken for real on a deep copy: Δ = −η·P⁻¹·(numerator), elementwise.
* Thresholds checked on a one-parameter quadratic with ε so large that P is frozen: the optimizer's own iterates
  contract at 0.97× the threshold and grow at 1.03×.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DT, assert_same_state, dense_hessian_fd, mlp_mse, rel_err, snapshot
from curvature import SharpnessTracker
from curvature.sinks import format_row
from curvature.optim import (PreconditionedHessianOperator, edge_ratio, has_diagonal_preconditioner,
                             preconditioned_sharpness, stability_note, stability_threshold)


def train(model, loss_fn, data, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        opt.step()


def names_of(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flat_grad(model, loss_fn, data):
    model.zero_grad()
    loss_fn(model(data[0]), data[1]).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().clone()
    model.zero_grad(set_to_none=True)
    return g


def hand_P(opt, model, g=None):
    """RMSprop / Adagrad P from the state dict (float64): the next step's with the flat gradient ``g``, else the last
    step's. RMSprop: √(αv + (1−α)g²) [− ḡ'²] + ε; Adagrad: (1 + (t'−1)·lr_decay)·(√(sum + g²) + ε)."""
    parts, offset = [], 0
    for p in model.parameters():
        grp = opt.param_groups[0]
        st = opt.state[p]
        gr = None
        if g is not None:
            gr = g[offset:offset + p.numel()].view_as(p) + grp["weight_decay"] * p.detach()
        offset += p.numel()
        if isinstance(opt, torch.optim.RMSprop):
            a = grp["alpha"]
            v = st["square_avg"] if gr is None else a * st["square_avg"] + (1 - a) * gr ** 2
            if grp["centered"]:
                m = st["grad_avg"] if gr is None else a * st["grad_avg"] + (1 - a) * gr
                v = v - m ** 2
            P = v.sqrt() + grp["eps"]
        else:
            t = float(st["step"]) + (gr is not None)
            s = st["sum"] if gr is None else st["sum"] + gr ** 2
            P = (1 + (t - 1) * grp["lr_decay"]) * (s.sqrt() + grp["eps"])
        parts.append(P.reshape(-1))
    return torch.cat(parts)


def reference_eigs(H, P):
    D = P.rsqrt()
    return torch.linalg.eigvalsh(0.5 * (D[:, None] * H * D[None, :] + (D[:, None] * H * D[None, :]).T)).flip(0)


OPTS = {
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "RMSprop-centered-wd": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True, weight_decay=0.05),
    "RMSprop-momentum": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9),
    "Adagrad-lr_decay-wd": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, lr_decay=0.1, weight_decay=0.05,
                                                          initial_accumulator_value=0.1),
}


@pytest.mark.parametrize("kind", list(OPTS))
def test_dense_reference_rmsprop_adagrad(kind):
    model, loss_fn, data = mlp_mse()
    opt = OPTS[kind](model.parameters())
    train(model, loss_fn, data, opt, 3)
    H = dense_hessian_fd(model, loss_fn, data, names_of(model))
    g = flat_grad(model, loss_fn, data)
    for lookahead in (True, False):
        P_ref = hand_P(opt, model, g if lookahead else None)
        ev_ref = reference_eigs(H, P_ref)
        op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=lookahead)
        torch.testing.assert_close(op.preconditioner, P_ref, rtol=1e-12, atol=0)
        res = preconditioned_sharpness(model, loss_fn, data, opt, k=2, tol=1e-10, lookahead=lookahead)
        assert res.converged and rel_err(res.eigenvalues, ev_ref[:2]) < 1e-8
        assert res.info["preconditioner"] == ("next_step" if lookahead else "last_step")
    if kind.startswith("Adagrad"):
        assert res.info["threshold"] is None and "Adagrad" in res.info["stability_note"]
    else:
        assert res.info["threshold"] == pytest.approx(stability_threshold(opt)) and res.info["stability_note"] is None


# --------------------------------------------------------------------------------------------------
# P is what the optimizer's own next step divides by
# --------------------------------------------------------------------------------------------------
def _adafactor(ps):
    return torch.optim.Adafactor(ps, lr=1e-2)


STEP_OPTS = {
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "RMSprop-centered-foreach": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True, foreach=True),
    "RMSprop-momentum-wd": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "Adagrad-lr_decay": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, lr_decay=0.1),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=0.1),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "RAdam-unrectified": lambda ps: torch.optim.RAdam(ps, lr=1e-2),  # ρ_t ≤ 5 for the first steps (β₂ = 0.999)
    "RAdam-rectified": lambda ps: torch.optim.RAdam(ps, lr=1e-2, betas=(0.9, 0.9)),
    "Adafactor": _adafactor,
    "Adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    # the multi-tensor implementations compute the same step
    "Adagrad-foreach": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, lr_decay=0.1, foreach=True),
    "Adamax-foreach": lambda ps: torch.optim.Adamax(ps, lr=1e-2, foreach=True),
    "NAdam-foreach": lambda ps: torch.optim.NAdam(ps, lr=1e-2, foreach=True),
    "RAdam-rectified-foreach": lambda ps: torch.optim.RAdam(ps, lr=1e-2, betas=(0.9, 0.9), foreach=True),
    "Adafactor-foreach": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True),
    "Adadelta-foreach": lambda ps: torch.optim.Adadelta(ps, lr=1.0, foreach=True),
}


@pytest.mark.parametrize("kind", list(STEP_OPTS))
def test_P_is_what_the_next_step_divides_by(kind):
    model, loss_fn, data = mlp_mse()
    opt = STEP_OPTS[kind](model.parameters())
    train(model, loss_fn, data, opt, 2 if kind == "RAdam-unrectified" else 6)  # t' = 3: ρ_t ≤ 5
    before_state = snapshot(model, opt)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt)  # lookahead: the step about to be taken
    assert_same_state(before_state, model, opt)  # parameters, grads, buffers, RNG, optimizer state: bit for bit
    P = op.unflatten(op.preconditioner)
    # the real step, on a copy
    m2, o2 = copy.deepcopy((model, opt))
    before = [p.detach().clone() for p in m2.parameters()]
    old = {k: copy.deepcopy(o2.state[p]) for k, p in enumerate(m2.parameters())}
    o2.zero_grad()
    loss_fn(m2(data[0]), data[1]).backward()
    grads = [p.grad.detach().clone() for p in m2.parameters()]
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), op.gradient, rtol=1e-10, atol=1e-14)
    o2.step()
    grp = o2.param_groups[0]
    lr = grp["lr"]
    for k, (p, p0, g, Pk) in enumerate(zip(m2.parameters(), before, grads, P)):
        delta = p.detach() - p0
        st, st0 = o2.state[p], old[k]
        if grp.get("weight_decay", 0) and not kind.startswith("Adafactor"):
            g = g + grp["weight_decay"] * p0
        t = float(st["step"])
        if kind.startswith("RMSprop-momentum"):  # buf ← μ·buf + g/P, Δ = −η·buf
            expected = -lr * (grp["momentum"] * st0["momentum_buffer"] + g / Pk)
        elif kind.startswith(("Adamax", "RAdam", "Adam")):
            expected = -lr * st["exp_avg"] / Pk  # Δ = −η·P⁻¹·m'
        elif kind.startswith("NAdam"):  # Δ = −η·(a·g + b·m')/D, P = D·(1−β₁)/(a(1+β₁) + b(1−β₁))
            b1, psi = grp["betas"][0], grp["momentum_decay"]
            mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
            mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
            prod = float(st["mu_product"])
            a, b = (1 - mu) / (1 - prod), mu_next / (1 - prod * mu_next)
            D = Pk * (a * (1 + b1) + b * (1 - b1)) / (1 - b1)
            expected = -lr * (a * g + b * st["exp_avg"]) / D
        else:  # RMSprop, Adagrad, Adafactor, Adadelta: Δ = −η·P⁻¹·g
            expected = -lr * g / Pk
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-16)
    if kind.startswith("RAdam"):
        assert op.info["unrectified"] == ([] if "-rectified" in kind else names_of(model))


# --------------------------------------------------------------------------------------------------
# thresholds: the optimizer's own iterates on a frozen-P quadratic
# --------------------------------------------------------------------------------------------------
class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=DT))

    def forward(self, x):
        return self.w * x


THRESHOLD_OPTS = {
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-12, eps=1e8),
    "RMSprop-momentum": lambda ps: torch.optim.RMSprop(ps, lr=1e-12, eps=1e8, momentum=0.8),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-12, eps=1e8),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-12, eps=1e8),  # μ_t ≈ β₁/2 early: 10× Adam's edge ratio
    "NAdam-late": lambda ps: torch.optim.NAdam(ps, lr=1e-12, eps=1e8, momentum_decay=1e3),  # μ_t = β₁
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-12, eps=1e8, betas=(0.9, 0.9)),
}


@pytest.mark.parametrize("kind", list(THRESHOLD_OPTS))
def test_threshold_is_the_edge_of_the_optimizers_own_iteration(kind):
    """L = ½λw²; with ε = 1e8 P is frozen. After 50 warm-up steps at a negligible lr, the lr is set so that
    edge_ratio = λ(P⁻¹H)/threshold is 0.97 or 1.03: |w| must shrink, resp. grow, over the optimizer's own steps
    (grow: its largest value; far out, v would grow into P and stabilise it again)."""
    x, lam = torch.ones(1, dtype=DT), 4.0

    def loss_fn(out, y):  # one sample: mean = sum
        return 0.5 * lam * (out ** 2).mean()

    seen = {}
    for target in (0.97, 1.03):
        model = Scalar()
        opt = THRESHOLD_OPTS[kind](model.parameters())
        train(model, loss_fn, (x, None), opt, 50)
        opt.param_groups[0]["lr"] = 1.0
        ratio = edge_ratio(opt, preconditioned_sharpness(model, loss_fn, (x, None), opt, tol=1e-12))
        opt.param_groups[0]["lr"] = target / ratio
        w0, path = abs(float(model.w.detach())), []
        for _ in range(8):
            train(model, loss_fn, (x, None), opt, 100)
            path.append(abs(float(model.w.detach())) / w0)
        seen[target] = path
    assert seen[0.97][-1] < 0.3 and max(seen[1.03]) > 3.0, seen


def test_threshold_formulas_beyond_adam():
    p = [nn.Parameter(torch.zeros(2, 2))]
    assert stability_threshold(torch.optim.RMSprop(p, lr=0.1)) == pytest.approx(20.0)
    rms = torch.optim.RMSprop(p, lr=0.1, momentum=0.9)
    assert stability_threshold(rms) == pytest.approx(20.0)  # the buffer starts at 0: the first step is plain
    p[0].grad = torch.zeros_like(p[0])
    rms.step()
    assert stability_threshold(rms) == pytest.approx(38.0)
    for cls in (torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam):
        assert stability_threshold(cls(p, lr=1e-3)) == pytest.approx(38_000.0)
    for opt in (torch.optim.Adagrad(p), torch.optim.Adafactor(p), torch.optim.Adadelta(p), torch.optim.Muon(p)):
        assert stability_threshold(opt) is None
        note = stability_note(opt)
        assert note.startswith(f"no stability threshold derived for {type(opt).__name__}") and "λ_c·η" in note
    assert "no diagonal pre-conditioner" in stability_note(torch.optim.Muon(p))
    assert stability_note(torch.optim.SGD(p, lr=0.1)) is None and stability_note(rms) is None
    from curvature.warmup.feedback import threshold_numerator

    assert threshold_numerator(torch.optim.RMSprop(p, lr=0.1)) == pytest.approx(2.0)
    with pytest.raises(TypeError, match=r"warm-up needs a stability threshold: no stability threshold derived for "
                                        r"Adagrad"):
        threshold_numerator(torch.optim.Adagrad(p))


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_optimizers_without_a_diagonal_P_say_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).to(DT)  # Muon takes 2-d parameters only
    data = (torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT))
    muon = torch.optim.Muon(model.parameters(), lr=1e-2)
    assert not has_diagonal_preconditioner(muon)
    with pytest.raises(TypeError, match=r"got Muon: Muon has no diagonal pre-conditioner \(it orthogonalises .*"
                                        r"use λ_c·η \(critical_sharpness"):
        preconditioned_sharpness(model, F.mse_loss, data, muon)
    with pytest.raises(TypeError, match=r"got SGD: SGD has no pre-conditioner \(P = I.*use sharpness\(\)"):
        preconditioned_sharpness(model, F.mse_loss, data, torch.optim.SGD(model.parameters(), lr=0.1))
    for opt in (torch.optim.Adafactor(model.parameters()), torch.optim.Adadelta(model.parameters())):
        train(model, F.mse_loss, data, opt, 1)
        with pytest.raises(ValueError, match=rf"{type(opt).__name__}'s P of the last step cannot be rebuilt.*pass "
                                             r"lookahead=True"):
            preconditioned_sharpness(model, F.mse_loss, data, opt, lookahead=False)
    ada = torch.optim.Adagrad(model.parameters())  # Adagrad's state exists before its first step (step = 0)
    with pytest.raises(ValueError, match=r"step = 0 for 0\.weight.*pass lookahead=True"):
        preconditioned_sharpness(model, F.mse_loss, data, ada, lookahead=False)
    assert preconditioned_sharpness(model, F.mse_loss, data, ada).eigenvalue > 0


# --------------------------------------------------------------------------------------------------
# the tracker: never an empty stability column without a word
# --------------------------------------------------------------------------------------------------
def _tracked(make, steps=3, **kw):
    model, loss_fn, data = mlp_mse()
    opt = make(model.parameters())
    tracker = SharpnessTracker(loss_fn, every=2, tol=1e-8, dtype=torch.float64, **kw)
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        tracker.step(model, opt, data, step=i)
        opt.step()
    return tracker.history, model, loss_fn, data, opt


def test_tracker_rows_beyond_adam():
    rows, model, loss_fn, data, opt = _tracked(lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9))
    assert [r["step"] for r in rows] == [0, 2] and all(r["error"] is None for r in rows)
    for r in rows:
        assert r["preconditioned_sharpness"] > 0 and r["stability_note"] is None
        assert r["edge_ratio"] == pytest.approx(r["preconditioned_sharpness"] / r["threshold"])
    assert [r["preconditioner"] for r in rows] == ["next_step", "next_step"]  # the tracker's default
    assert rows[0]["threshold"] == pytest.approx(2 / 1e-2) and rows[1]["threshold"] == pytest.approx(3.8 / 1e-2)

    rows, *_ = _tracked(lambda ps: torch.optim.RMSprop(ps, lr=1e-2), lookahead="auto")
    assert [r["preconditioner"] for r in rows] == ["next_step", "last_step"]

    rows, *_ = _tracked(lambda ps: torch.optim.Adagrad(ps, lr=1e-1), lookahead="auto")
    for r in rows:
        assert r["error"] is None and r["preconditioned_sharpness"] > 0
        assert r["threshold"] is None and r["edge_ratio"] is None
        assert r["stability_note"].startswith("no stability threshold derived for Adagrad") and "λ_c·η" in r["stability_note"]
    assert rows[0]["preconditioner"] == "next_step"  # Adagrad's state exists at construction, with step = 0
    assert "note: no stability threshold derived for Adagrad" in format_row(rows[0])  # the LoggingSink line

    rows, *_ = _tracked(lambda ps: torch.optim.Adafactor(ps, lr=1e-2), lookahead="auto")
    assert all(r["preconditioned_sharpness"] > 0 and r["preconditioner"] == "next_step" for r in rows)

    rows, *_ = _tracked(lambda ps: torch.optim.Adam(ps, lr=1e-2), preconditioned=False)
    assert rows[1]["threshold"] == pytest.approx(3800) and rows[1]["edge_ratio"] is None
    assert "edge_ratio needs λ(P⁻¹H) for Adam" in rows[1]["stability_note"]


def test_tracker_row_with_muon_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).to(DT)
    data = (torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT))
    opt = torch.optim.Muon(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(F.mse_loss, every=1, tol=1e-8, dtype=torch.float64)
    opt.zero_grad()
    F.mse_loss(model(data[0]), data[1]).backward()
    row = tracker.step(model, opt, data, step=0) or tracker.history[-1]
    assert row["error"] is None and row["sharpness"] > 0
    assert row["preconditioned_sharpness"] is None and row["threshold"] is None and row["edge_ratio"] is None
    assert "Muon has no diagonal pre-conditioner" in row["stability_note"]
    # preconditioned=True with Muon is a set-up mistake: the first measurement says so (issue #25's policy)
    from curvature import TrackingSetupError

    with pytest.raises(TrackingSetupError, match=r"got Muon: Muon has no diagonal"):
        SharpnessTracker(F.mse_loss, every=1, preconditioned=True).step(model, opt, data, step=0)


def test_tracker_on_a_sharded_model_with_rmsprop_says_why(monkeypatch):
    """λ(P⁻¹H) of a fully-sharded model is read shard by shard for Adam/AdamW only: with another optimizer the
    tracker measures λ(H), keeps the threshold and says why edge_ratio is empty (instead of an error row)."""
    import curvature.tracking

    monkeypatch.setattr(curvature.tracking, "is_sharded_model", lambda model: True)  # the operator itself is dense
    rows, *_ = _tracked(lambda ps: torch.optim.RMSprop(ps, lr=1e-2), steps=1)
    r = rows[0]
    assert r["error"] is None and r["sharpness"] > 0 and r["threshold"] == pytest.approx(200.0)
    assert r["preconditioned_sharpness"] is None and r["edge_ratio"] is None
    assert "fully-sharded (FSDP2) model is implemented for Adam/AdamW only" in r["stability_note"]


def test_checkpoint_analysis_beyond_adam(tmp_path):
    """analyze_checkpoints: an RMSprop checkpoint gets λ(P⁻¹H) and the edge ratio against it (not λ(H) against
    RMSprop's P⁻¹H threshold); an Adagrad one says why threshold and edge_ratio are empty."""
    from curvature.checkpoints import analyze_checkpoints

    for name, make in (("rmsprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-2)),
                       ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-1))):
        model, loss_fn, data = mlp_mse()
        opt = make(model.parameters())
        train(model, loss_fn, data, opt, 3)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}, tmp_path / f"{name}.pt")
        fresh = lambda: mlp_mse()[0]  # noqa: E731 - the architecture (its parameters come from the checkpoint)
        row, = analyze_checkpoints(tmp_path / f"{name}.pt", fresh, data, loss_fn, optimizer_factory=make, tol=1e-10)
        want = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-10).eigenvalue
        assert row["error"] is None and row["preconditioned_sharpness"] == pytest.approx(want, rel=1e-8)
        if name == "rmsprop":
            assert row["edge_ratio"] == pytest.approx(want / 200.0, rel=1e-8) and row["stability_note"] is None
        else:
            assert row["threshold"] is None and row["edge_ratio"] is None
            assert row["stability_note"].startswith("no stability threshold derived for Adagrad")


def test_gi_adam_moments_count_as_used_and_adagrad_initial_state_does_not():
    """Left out (P = inf) is for parameters no data has reached: no state, or Adagrad's state at construction. A
    parameter with GI-Adam's initialised moments (step 0) keeps its P even on a zero gradient."""
    from test_preconditioned import UnusedHead

    torch.manual_seed(12)
    model = UnusedHead().to(DT)
    data = (torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,)))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():  # as gi_adam_init leaves it: v₀ = g₀², m₀ = 0, step = 0
        adam.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.ones_like(p))
    assert preconditioned_sharpness(model, F.cross_entropy, data, adam).info["left_out"] == []
    ada = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    assert preconditioned_sharpness(model, F.cross_entropy, data, ada).info["left_out"] == ["aux.weight", "aux.bias"]


def test_plot_labels_the_threshold_of_the_optimizer():
    import matplotlib
    from matplotlib.text import Text

    from curvature import plot_sharpness

    matplotlib.use("Agg")
    for make, want, wrong in ((lambda ps: torch.optim.RMSprop(ps, lr=1e-2), "RMSprop threshold", "Adam threshold"),
                              (lambda ps: torch.optim.Adagrad(ps, lr=1e-1), "no threshold derived", "threshold $")):
        rows, *_ = _tracked(make, steps=1)
        fig = plot_sharpness(rows)
        texts = " | ".join(t.get_text() for t in fig.findobj(Text))
        assert want in texts and wrong not in texts, texts
        matplotlib.pyplot.close(fig)
