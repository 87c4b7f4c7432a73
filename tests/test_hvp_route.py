"""The one-gradient HVP route (issue #22): one-sided gradient differences, their own error estimate, and the tracker's
route choice. References: dense float64 Hessians from central differences of first-order gradients (conftest)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import dense_hessian_fd, mlp_mse, rel_err, snapshot
from curvature import SharpnessTracker
from curvature.operators import HessianOperator
from curvature.optim import PreconditionedHessianOperator
from curvature.route_check import check_one_sided
from curvature.solvers import lanczos


def _gelu_problem(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4)).to(dtype)
    X = torch.randn(48, 6, dtype=dtype)
    y = torch.randint(0, 4, (48,))
    return model, F.cross_entropy, (X, y)


def _dense_top(model, loss_fn, data) -> float:
    m64 = _copy64(model)
    X, y = data
    H = dense_hessian_fd(m64, loss_fn, (X.double(), y))
    return float(torch.linalg.eigvalsh(0.5 * (H + H.T))[-1])


def _dense_top_p(model, loss_fn, data, opt) -> float:
    """λ_max(P^{-1/2} H P^{-1/2}) from the dense float64 H and the P of the step about to be taken."""
    X, y = data
    H = dense_hessian_fd(_copy64(model), loss_fn, (X.double(), y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=True,
                                          method="finite_difference").preconditioner.double()
    s = P.rsqrt()
    return float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1])


def _copy64(model):
    import copy
    return copy.deepcopy(model).double()


def test_one_sided_engine_against_dense_reference():
    """(G(θ+εv) − G(θ))/ε: one gradient per HVP, O(h) off Hv; forward and backward averaged: the central one."""
    model, loss_fn, data = mlp_mse()  # float64
    H = dense_hessian_fd(model, loss_fn, data)
    op = HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=1)
    v = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fwd = op.matmat(v)
    assert op.engine.gradients == 1 + 3  # G(θ) once, then one gradient per HVP
    with op.engine.one_sided_side(-1):
        bwd = op.matmat(v)
    for j in range(3):
        exact = H @ v[:, j]
        assert rel_err(fwd[:, j], exact) < 1e-6
        assert rel_err(0.5 * (fwd[:, j] + bwd[:, j]), exact) < 1e-7  # central: O(h²), rounding-limited here
    with pytest.raises(ValueError, match="order=1"):
        with HessianOperator(model, loss_fn, data, method="finite_difference").engine.one_sided_side(-1):
            pass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_central_check_bound_covers_the_true_error_float32(seed):
    """float32 model: Lanczos on the one-sided operator, then the central check on its Ritz vector. The reported
    λ_c is within its bound of the dense float64 λ_max, and the bound meets eig_tol."""
    model, loss_fn, data = _gelu_problem(seed)
    op = HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=1)
    res = lanczos(op, 1, eig_tol=5e-4, v0=op.gradient)
    chk = check_one_sided(op, op.engine, res.eigenvectors[:, 0], res.info["ritz_gap"])
    lam = _dense_top(model, loss_fn, data)
    err = abs(chk.value - lam) / lam
    print(f"\nseed {seed}: error {err:.1e}, bound {chk.error_bound:.1e}, one-sided bias {chk.route_error:.1e}")
    assert err <= chk.error_bound <= 1e-3
    assert chk.route_error > 0 and chk.gradients == 2


def _train(model, loss_fn, data, opt, steps, tracker=None):
    X, y = data
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        if tracker is not None:
            tracker.step(model, opt, data, step=i)
        opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_tracker_rows_on_the_one_sided_route_within_their_bound(opt_name):
    """The one-sided route on a smooth float32 model: every row's λ(H) (and λ(P⁻¹H) with Adam) is within its error_bound of the dense float64 reference, and the
    bound meets eig_tol; gradients counted: G(θ), one per one-sided HVP, two per check."""
    model, loss_fn, data = _gelu_problem(3)
    opt = (torch.optim.SGD(model.parameters(), lr=0.5) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    tracker = SharpnessTracker(loss_fn, every=3, hvp_route="one_sided")
    checked = []

    def hook_step(i):
        row = tracker.step(model, opt, data, step=i)
        if row is None:
            return
        # λ(P⁻¹H) is checked once against an exact HVP; its bound then covers twice what that measured, and a row
        # whose λ(P⁻¹H) bound misses eig_tol is solved again with exact HVPs (λ(H) stays one-sided)
        assert row["error"] is None and row["hvp_route"] in (
            ("one_sided",) if opt_name == "sgd" else ("one_sided", "one_sided (H), exact (P⁻¹H)")), row
        lam = _dense_top(model, loss_fn, data)
        assert abs(row["sharpness"] - lam) / lam <= row["error_bound"] <= 1e-3
        checks = 2 if opt_name == "sgd" else 4
        if row["hvp_route"] == "one_sided":
            assert row["num_gradients"] == 1 + row["num_hvps"] + checks
        if opt_name == "adam":
            lam_p = _dense_top_p(model, loss_fn, data, opt)
            err_p = abs(row["preconditioned_sharpness"] - lam_p) / lam_p
            assert err_p <= row["preconditioned_error_bound"] <= 1e-3
        checked.append(i)

    X, y = data
    for i in range(7):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        hook_step(i)
        opt.step()
    assert checked == [0, 3, 6]


@pytest.mark.parametrize("route,opt_name", [("one_sided", "sgd"), ("auto", "adam")])
def test_one_sided_route_never_changes_training_with_dropout(monkeypatch, route, opt_name):
    """The one-sided route under dropout: G(θ) and every G(θ + εv) are taken under the row's frozen seed (the same
    masks), and the run is bit-identical to one without the tracker (parameters, optimizer state, RNG); with "auto"
    and Adam also the first row's exact HVPs (λ(H) and λ(P⁻¹H)) and the solve-long RNG hold."""
    if route == "auto":
        _no_timing(monkeypatch)

    def run(with_tracker):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)).train()
        X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
        opt = (torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9) if opt_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-2))
        tracker = SharpnessTracker(F.cross_entropy, every=2, hvp_route=route) if with_tracker else None
        torch.manual_seed(11)
        _train(model, F.cross_entropy, (X, y), opt, 5, tracker)
        return model, opt, torch.get_rng_state(), tracker

    m1, o1, rng1, tr = run(True)
    m0, o0, rng0, _ = run(False)
    assert [r["hvp_route"].split(" ")[0] for r in tr.history] == ["one_sided"] * 3, [r["hvp_route_note"]
                                                                                     for r in tr.history]
    assert all(r["error"] is None for r in tr.history)
    assert torch.equal(rng0, rng1)
    for (n, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), n
    for key, st in o0.state_dict()["state"].items():
        for name, val in st.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(o1.state_dict()["state"][key][name]))


def test_one_sided_measure_leaves_state_untouched():
    model, loss_fn, data = _gelu_problem(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, loss_fn, data, opt, 2)
    loss_fn(model(data[0]), data[1]).backward()
    before = snapshot(model, opt)
    row = SharpnessTracker(loss_fn, every=1, hvp_route="one_sided").step(model, opt, data, step=0)
    assert row["hvp_route"] == "one_sided"
    after = snapshot(model, opt)
    for key in ("params", "grads", "buffers"):
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), (key, n)
    assert torch.equal(before["rng"], after["rng"])


class _Kink(nn.Module):
    """L = Σ a_i relu(θ_i)² + ½ Σ b_i θ_i² at θ = 0: autograd's Hessian is diag(b) (relu'(0) = 0), while a one-sided
    difference along a direction with positive entries sees the other side of the kink (+2a_i)."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n))
        self.a = torch.linspace(1.0, 2.0, n)
        self.b = torch.linspace(0.5, 1.0, n)

    def forward(self, x):
        return (self.a * F.relu(self.theta) ** 2).sum() + 0.5 * (self.b * self.theta ** 2).sum() + 0 * x.sum()


def test_kink_falls_back_to_exact_hvps_and_says_so():
    model = _Kink()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.zeros(2, 1), torch.zeros(2))
    tracker = SharpnessTracker(lambda out, t: out, every=1)
    row = tracker.step(model, opt, batch, step=0)
    assert row["hvp_route"] == "exact" and row["hvp_route_note"]
    assert row["error"] is None and row["sharpness"] == pytest.approx(1.0, rel=1e-3)
    assert row["error_bound"] <= 1e-3


def test_low_precision_and_residual_tol_use_exact_hvps():
    model, loss_fn, data = _gelu_problem(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    row = SharpnessTracker(loss_fn, every=1, tol=1e-6).step(model, opt, data, step=0)
    assert row["hvp_route"] == "exact" and "tol" in row["hvp_route_note"]
    bf = _gelu_problem(6, dtype=torch.bfloat16)
    with warnings.catch_warnings():  # bf16 rounding may keep the exact solve from eig_tol: not the point here
        warnings.simplefilter("ignore")
        row = SharpnessTracker(bf[1], every=1).step(bf[0], torch.optim.SGD(bf[0].parameters(), lr=0.1), bf[2],
                                                    step=0)
    assert row["hvp_route"] == "exact" and "bfloat16" in row["hvp_route_note"]
    row = SharpnessTracker(loss_fn, every=1, hvp_route="exact").step(model, opt, data, step=0)
    assert row["hvp_route"] == "exact" and row["hvp_route_note"] is None
    with pytest.raises(ValueError, match="hvp_route"):
        SharpnessTracker(loss_fn, hvp_route="fast")


def test_auto_route_decides_on_the_first_row_and_keeps_it():
    """hvp_route="auto": the first row checks the one-sided value against two exact HVPs on its Ritz vector and
    times both routes; the route (and, when exact, the reason) holds for the later rows; every row within 1e-3."""
    model, loss_fn, data = _gelu_problem(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = SharpnessTracker(loss_fn, every=2)
    _train(model, loss_fn, data, opt, 5, tracker)
    routes = {r["hvp_route"] for r in tracker.history}
    assert len(routes) == 1 and routes <= {"one_sided", "exact"}
    first = tracker.history[0]
    assert first["error"] is None and first["error_bound"] <= 1e-3
    if routes == {"exact"}:
        assert "cheaper" in first["hvp_route_note"] or "off an exact HVP" in first["hvp_route_note"]


@pytest.mark.parametrize("k", [1, 2])
def test_sharpness_on_the_one_sided_route_reports_a_bound_that_covers_its_error(k):
    """sharpness(..., method="finite_difference", fd_order=1) used to return the Ritz values of the one-sided
    operator, O(ε) off, with the solver's bound (which knows nothing of the route's error): 1.3e-2 off under a
    bound of 1e-4 here (a large fd_epsilon makes the bias plain). Now each Ritz vector gets the central check:
    the values are the central Rayleigh quotients and the bound adds the route's error."""
    from curvature import sharpness

    model, loss_fn, data = _gelu_problem(0, torch.float64)
    m64 = _copy64(model)
    H = dense_hessian_fd(m64, loss_fn, data)
    top = torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)[:k]
    res = sharpness(model, loss_fn, data, k=k, method="finite_difference", fd_order=1, fd_epsilon=0.05, eig_tol=1e-4)
    errs = [abs(float(a) - float(b)) / float(b) for a, b in zip(res.eigenvalues, top)]
    print(f"\nk={k}: errors {errs}, bound {res.info['error_bound']:.1e}, checks {res.info.get('one_sided_checks')}")
    assert max(errs) <= res.info["error_bound"]
    assert res.info["hvp_route"] == "one_sided"
    assert res.info["num_gradients"] == 1 + res.num_hvps  # G(θ), one per HVP (the check's 2 per vector included)
    # where the bound misses eig_tol the result says so instead of claiming convergence
    assert res.converged == (res.info["error_bound"] <= 1e-4)


def test_sharpness_one_sided_float32_default_step_meets_eig_tol():
    from curvature import sharpness

    model, loss_fn, data = _gelu_problem(1)
    lam = _dense_top(model, loss_fn, data)
    res = sharpness(model, loss_fn, data, method="finite_difference", fd_order=1, eig_tol=1e-3)
    err = abs(res.eigenvalue - lam) / lam
    print(f"\nfloat32, default ε: error {err:.1e}, bound {res.info['error_bound']:.1e}, {res.num_hvps} HVPs")
    assert res.converged and err <= res.info["error_bound"] <= 1e-3
    exact = sharpness(model, loss_fn, data, eig_tol=1e-3)
    assert "hvp_route" not in exact.info and "one_sided_checks" not in exact.info


def test_preconditioned_sharpness_on_the_one_sided_route_is_checked_too():
    """λ(P⁻¹H) for Adam through one-sided HVPs: the central check runs through the pre-conditioner; the value is
    within its bound of the exact route's tight float64 solve."""
    from curvature import preconditioned_sharpness

    model, loss_fn, data = _gelu_problem(2, torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, loss_fn, data, opt, 3)
    opt.zero_grad()
    ref = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-10).eigenvalue
    res = preconditioned_sharpness(model, loss_fn, data, opt, method="finite_difference", fd_order=1,
                                   fd_epsilon=0.02, eig_tol=1e-3)
    err = abs(res.eigenvalue - ref) / ref
    print(f"\nλ(P⁻¹H) one-sided: error {err:.1e}, bound {res.info['error_bound']:.1e}")
    assert res.info["hvp_route"] == "one_sided" and len(res.info["one_sided_checks"]) == 1
    assert err <= res.info["error_bound"]
    one_sided_value = res.info["one_sided_checks"][0].one_sided_value
    assert abs(one_sided_value - ref) / ref > err  # the raw one-sided value is further off than the checked one


def _no_timing(monkeypatch):
    """hvp_route='auto' decides on the first row by timing too; tests take the accuracy decision alone."""
    from curvature import tracking

    orig = tracking.SharpnessTracker._first_row_check
    monkeypatch.setattr(tracking.SharpnessTracker, "_first_row_check",
                        lambda self, exact_H, chk, row, t_grad=0.0, t_build=0.0: orig(self, exact_H, chk, row))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_auto_route_calibrated_on_the_first_row_keeps_every_bound_above_its_error(monkeypatch, opt_name):
    """hvp_route='auto': the first row measures the route's errors on one exact HVP (λ(H) and λ(P⁻¹H)), scales the
    bound's route terms to twice what it measured (the residual term down from the one-sided spread, which is
    10–70× the central difference's error where measured); every row stays within its bound of the dense float64
    reference."""
    _no_timing(monkeypatch)
    model, loss_fn, data = _gelu_problem(4)
    opt = (torch.optim.SGD(model.parameters(), lr=0.5) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    tracker = SharpnessTracker(loss_fn, every=2)
    X, y = data
    rows = []
    for i in range(9):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        row = tracker.step(model, opt, data, step=i)
        if row is not None:
            assert row["error"] is None, row
            lam = _dense_top(model, loss_fn, data)
            assert abs(row["sharpness"] - lam) / lam <= row["error_bound"] <= 1e-3, row
            if opt_name == "adam" and row["hvp_route"] == "one_sided":
                lam_p = _dense_top_p(model, loss_fn, data, opt)
                assert abs(row["preconditioned_sharpness"] - lam_p) / lam_p <= row["preconditioned_error_bound"]
            rows.append(row)
        opt.step()
    h_routes = [r["hvp_route"].split(" ")[0] for r in rows]  # λ(H)'s route ("one_sided (H), exact (P⁻¹H)")
    assert h_routes[0] == "one_sided" and h_routes.count("one_sided") >= 4, [(r["hvp_route"], r["hvp_route_note"])
                                                                              for r in rows]
    scale, residual_scale = tracker._route_scales[""]
    assert scale >= 1.0 and residual_scale >= 0.05  # 2× what the exact HVP measured, floored
    print("\nroutes", [r["hvp_route"] for r in rows], "scales", tracker._route_scales)


def test_auto_route_gives_up_lambda_p_when_its_first_row_exact_hvp_disagrees(monkeypatch):
    """Where one exact HVP on the first row finds the one-sided λ(P⁻¹H) off by more than eig_tol/4, λ(P⁻¹H) is solved
    with exact HVPs from then on (its bound's error estimates are not to be trusted), λ(H) stays one-sided."""
    from curvature import tracking

    _no_timing(monkeypatch)
    orig = tracking.rayleigh_product

    def off_for_p(op, x):
        value, y = orig(op, x)
        return (value * 1.01, y) if isinstance(op, PreconditionedHessianOperator) else (value, y)

    monkeypatch.setattr(tracking, "rayleigh_product", off_for_p)
    model, loss_fn, data = _gelu_problem(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(loss_fn, every=2)
    X, y = data
    for i in range(5):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        tracker.step(model, opt, data, step=i)
        opt.step()
    routes = [r["hvp_route"] for r in tracker.history]
    # (λ(H) may miss on a row and be solved again exactly: "exact"; λ(P⁻¹H) is never one-sided after the first row)
    assert routes[0] == "one_sided (H), exact (P⁻¹H)" and set(routes) <= {routes[0], "exact"}, routes
    assert tracker._p_route_note is not None  # λ(P⁻¹H) exact from the first row on
    assert all(r["error"] is None and r["preconditioned_error_bound"] <= 1e-3 for r in tracker.history)
    later = [r for r in tracker.history[1:] if r["hvp_route"] == routes[0]]
    assert later and all(r["num_gradients"] < tracker.history[0]["num_gradients"] for r in later)  # no one-sided P
    assert "off an exact HVP" in tracker.history[-1]["hvp_route_note"], tracker.history[-1]["hvp_route_note"]


def test_auto_route_goes_exact_after_repeated_misses(monkeypatch):
    """Each later row whose one-sided bound misses eig_tol is solved again with exact HVPs; after
    ROUTE_MISSES_BEFORE_EXACT such rows 'auto' stops trying the one-sided route (and the row says why)."""
    from curvature import tracking

    _no_timing(monkeypatch)
    model, loss_fn, data = _gelu_problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = SharpnessTracker(loss_fn, every=1)
    orig = tracking.check_one_sided
    calls = {"n": 0}

    def loose_after_first(*args, **kwargs):
        chk = orig(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 1:
            chk.error_bound = 1.0
        return chk

    monkeypatch.setattr(tracking, "check_one_sided", loose_after_first)
    X, y = data
    for i in range(5):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        tracker.step(model, opt, data, step=i)
        lam = _dense_top(model, loss_fn, data)  # at the point the row measured
        opt.step()
    routes = [r["hvp_route"] for r in tracker.history]
    assert routes == ["one_sided", "exact", "exact", "exact", "exact"], routes
    assert tracking.ROUTE_MISSES_BEFORE_EXACT == 2
    assert calls["n"] == 1 + tracking.ROUTE_MISSES_BEFORE_EXACT  # no one-sided solve after the second miss
    assert "missed eig_tol on 2 rows" in tracker.history[2]["hvp_route_note"]
    assert abs(tracker.history[-1]["sharpness"] - lam) / lam <= tracker.history[-1]["error_bound"] <= 1e-3


def test_one_sided_route_on_a_sharded_operator_is_refused_not_left_unchecked(monkeypatch):
    """A sharded operator (it has a ``dot`` hook: each rank holds a slice of every vector) on fd_order=1 would get the
    central check with local norms and dots: wrong values under a wrong bound. It is refused with what to use."""
    from curvature.diagnostics import solve_checked

    model, loss_fn, data = _gelu_problem(0, torch.float64)
    op = HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=1)
    monkeypatch.setattr(op, "dot", lambda X, Y: X.T @ Y, raising=False)
    with pytest.raises(ValueError, match="fd_order=2"):
        solve_checked(op, 1, "lanczos", None, None, None, True, 0, 1e-3)
