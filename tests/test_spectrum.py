"""Trace estimators, stochastic Lanczos quadrature, per-layer curvature and bottom eigenvalues.

References: dense matrices with an analytic spectrum (``MatrixOperator``) and the dense central-difference
Hessian of a small model (``conftest.dense_hessian_fd``, accurate to ~1e-8 relative).

Statistical bounds. For probes with E[zzᵀ] = I, one Hutchinson sample zᵀAz has variance
σ² = 2(‖A‖_F² − Σ_i A_ii²) (Rademacher) or 2‖A‖_F² (Gaussian), so the mean of m samples has standard deviation
σ/√m; we assert |estimate − tr A| ≤ 4σ/√m (a 4-sigma event; the seeds are fixed, so the tests are
deterministic, and the bound says why they are not tuned to the seed). For Hutch++ the random part is
Hutchinson on (I−QQᵀ)A(I−QQᵀ), whose Frobenius norm is ≤ ‖A‖_F, so its standard deviation is at most
σ(A)/√g with g residual probes.
"""
from __future__ import annotations

import math

import pytest
import torch

import curvature.spectrum as S
from curvature.diagnostics import sharpness
from curvature.operators import HessianOperator, MatrixOperator
from conftest import DT, dense_hessian_fd, mlp_mse, rel_err


def sym(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT)
    return 0.5 * (B + B.T) / math.sqrt(n) + shift * torch.eye(n, dtype=DT)


def hutch_sigma(A, distribution="rademacher"):
    fro2 = float((A * A).sum())
    if distribution == "rademacher":
        fro2 -= float((A.diagonal() ** 2).sum())
    return math.sqrt(2 * fro2)


@pytest.fixture(scope="module")
def mlp():
    model, loss_fn, data = mlp_mse()
    H = dense_hessian_fd(model, loss_fn, data)
    return model, loss_fn, data, 0.5 * (H + H.T)


# ------------------------------------------------------------------------------------------------------------
# Hutchinson
# ------------------------------------------------------------------------------------------------------------
def test_hutchinson_exact_on_diagonal():
    d = torch.linspace(-2.0, 7.0, 40, dtype=DT)
    op = MatrixOperator(torch.diag(d))
    res = S.hutchinson_trace(op)  # Rademacher: zᵀDz = tr D for every probe, zero variance
    assert abs(res.estimate - float(d.sum())) < 1e-12 * float(d.abs().sum())
    assert res.stderr < 1e-12 and res.converged
    assert res.num_hvps == op.num_hvps == 16 == res.num_samples  # stops at the first allowed check


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_on_hessian_within_its_variance(mlp, distribution):
    model, loss_fn, data, H = mlp
    op = HessianOperator(model, loss_fn, data)
    m = 64
    res = S.hutchinson_trace(op, num_samples=m, block=16, seed=3, distribution=distribution)
    sd = hutch_sigma(H, distribution) / math.sqrt(m)
    assert res.num_hvps == m == res.samples.numel() and res.converged
    assert abs(res.estimate - float(H.trace())) <= 4 * sd
    assert 0.5 * sd <= res.stderr <= 1.5 * sd  # the reported stderr estimates the true one


def test_stopping_rule_stops_at_tol_and_uses_abs():
    A = sym(60, 0, shift=0.5)  # tr A = 30 + noise; one-sample σ ≈ √(2·30) ≈ 7.7
    tol, block, min_samples = 0.02, 8, 16
    res = S.hutchinson_trace(MatrixOperator(A), tol=tol, block=block, max_samples=5000, seed=1)
    assert res.converged and res.stderr <= tol * abs(res.estimate)
    m = res.num_samples
    assert m > min_samples  # it needed more than the first check, and stopped at the first check that passed
    prev = res.samples[: m - block]
    assert float(prev.std()) / math.sqrt(prev.numel()) > tol * abs(float(prev.mean()))
    assert abs(res.estimate - float(A.trace())) <= 4 * hutch_sigma(A) / math.sqrt(m)
    # A negative trace must stop just the same (stderr <= tol·|mean|, not tol·mean)
    neg = S.hutchinson_trace(MatrixOperator(-A), tol=tol, block=block, max_samples=5000, seed=1)
    assert neg.converged and neg.num_samples == m and neg.estimate == pytest.approx(-res.estimate, rel=1e-12)
    # An unreachable tol stops at max_samples and says so
    cap = S.hutchinson_trace(MatrixOperator(A), tol=1e-9, block=block, max_samples=50, seed=1)
    assert not cap.converged and cap.num_hvps == 50 == cap.num_samples


def test_fixed_samples_and_seed_reproducible():
    A = MatrixOperator(sym(30, 2))
    a = S.hutchinson_trace(A, num_samples=20, block=6, seed=5)
    b = S.hutchinson_trace(A, num_samples=20, block=6, seed=5)
    assert a.num_hvps == 20 and torch.equal(a.samples, b.samples)
    with pytest.raises(ValueError, match="distribution"):
        S.hutchinson_trace(A, num_samples=4, distribution="uniform")


# ------------------------------------------------------------------------------------------------------------
# Hutch++
# ------------------------------------------------------------------------------------------------------------
def test_hutchpp_exact_for_low_rank():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=DT))
    A = U @ torch.diag(torch.tensor([5.0, -2.0, 1.0, 0.3], dtype=DT)) @ U.T
    op = MatrixOperator(A)
    res = S.hutchpp_trace(op, 15)  # sketch of 5 ≥ rank 4: (I − QQᵀ)A(I − QQᵀ) = 0
    assert res.num_hvps == 15 == op.num_hvps
    assert abs(res.estimate - float(A.trace())) < 1e-10 * float(A.abs().sum())


def test_hutchpp_on_hessian(mlp):
    model, loss_fn, data, H = mlp
    op = HessianOperator(model, loss_fn, data)
    res = S.hutchpp_trace(op, 60, seed=2)
    g = res.info["num_residual_probes"]
    assert res.num_hvps == 60 == op.num_hvps and g == 20
    assert abs(res.estimate - float(H.trace())) <= 4 * hutch_sigma(H) / math.sqrt(g)
    # with a sketch as wide as n it is exact (up to the reference's finite-difference error)
    full = S.hessian_trace(model, loss_fn, data, method="hutchpp", num_hvps=3 * H.shape[0])
    assert full.estimate == pytest.approx(float(H.trace()), rel=1e-6)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DT))
    lam = 1.0 / torch.arange(1, 201, dtype=DT) ** 2
    A = MatrixOperator(Q @ torch.diag(lam) @ Q.T)
    tr = float(lam.sum())
    err_pp = [(S.hutchpp_trace(A, 30, seed=s).estimate - tr) ** 2 for s in range(10)]
    err_h = [(S.hutchinson_trace(A, num_samples=30, seed=s).estimate - tr) ** 2 for s in range(10)]
    assert sum(err_pp) < 0.1 * sum(err_h)


# ------------------------------------------------------------------------------------------------------------
# Spectral density (SLQ)
# ------------------------------------------------------------------------------------------------------------
def _probe_vectors(n, num, seed):
    gen = S._generator(seed)
    op = MatrixOperator(torch.zeros(1, 1, dtype=DT))
    return [S._probes(n, 1, gen, "rademacher", op)[:, 0] / math.sqrt(n) for _ in range(num)]


def test_slq_is_gauss_quadrature_per_probe():
    n, steps = 40, 8
    A = sym(n, 3)
    A = A / torch.linalg.matrix_norm(A, 2)
    dens = S.spectral_density(MatrixOperator(A), num_probes=3, num_steps=steps, seed=7)
    assert dens.num_hvps == 3 * steps
    for v, x, w in zip(_probe_vectors(n, 3, 7), dens.nodes, dens.weights):
        assert w.sum() == pytest.approx(1.0, abs=1e-13)
        Av = v.clone()
        for p in range(1, 2 * steps):  # exact for degree <= 2m − 1
            Av = A @ Av
            assert float((w * x**p).sum()) == pytest.approx(float(v @ Av), abs=1e-12)


def test_slq_diagonal_spectrum_exact():
    d = torch.linspace(-1.0, 4.0, 30, dtype=DT) ** 3
    dens = S.spectral_density(MatrixOperator(torch.diag(d)), num_probes=2, num_steps=30, seed=0)
    for x, w in zip(dens.nodes, dens.weights):  # Rademacher probes weight every eigenvector by 1/n
        assert torch.allclose(x, d.sort().values, atol=1e-10 * float(d.abs().max()))
        assert torch.allclose(w, torch.full_like(w, 1 / 30), atol=1e-12)
    assert dens.trace == pytest.approx(float(d.sum()), rel=1e-12)
    sigma = 0.3
    t, rho = dens.density(sigma=sigma, num_points=200)
    exact = torch.exp(-0.5 * ((t[:, None] - d[None, :]) / sigma) ** 2).mean(1) / (sigma * math.sqrt(2 * math.pi))
    assert torch.allclose(rho, exact, atol=1e-10)
    assert float(torch.trapezoid(rho, t)) == pytest.approx(1.0, abs=1e-6)


def test_slq_density_of_hessian_within_variance(mlp):
    """Full-length Lanczos on the dense Hessian makes each probe exact for every f, so the only error is the
    probe average: at each t, ρ̂(t) = mean_l v_lᵀ φ_σ(t − H) v_l with variance 2(‖B‖_F² − ΣB_ii²)/n²/L,
    B = φ_σ(t − H) (Rademacher probes v = z/√n)."""
    *_, H = mlp
    n, L = H.shape[0], 6
    dens = S.spectral_density(MatrixOperator(H), num_probes=L, num_steps=n, seed=1)
    lam, U = torch.linalg.eigh(H)
    sigma = 0.05 * float(lam[-1] - lam[0])
    t, rho = dens.density(sigma=sigma, num_points=41)
    phi = torch.exp(-0.5 * ((t[:, None] - lam[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    exact = phi.mean(1)
    for i in range(t.numel()):
        B = (U * phi[i]) @ U.T
        sd = math.sqrt(2 * (float((B * B).sum()) - float((B.diagonal() ** 2).sum()))) / n / math.sqrt(L)
        assert abs(float(rho[i] - exact[i])) <= 5 * sd + 1e-9 * float(exact.max())
    lo, hi = dens.support
    assert lo == pytest.approx(float(lam[0]), rel=1e-8) and hi == pytest.approx(float(lam[-1]), rel=1e-8)


def test_hessian_spectral_density_wrapper_moments(mlp):
    model, loss_fn, data, H = mlp
    dens = S.hessian_spectral_density(model, loss_fn, data, num_probes=2, num_steps=6, seed=4)
    assert dens.num_hvps == 12 and dens.n == H.shape[0] and "loss" in dens.info
    for v, x, w in zip(_probe_vectors(H.shape[0], 2, 4), dens.nodes, dens.weights):
        Hv = v.clone()
        for p in range(1, 12):
            Hv = H @ Hv
            assert float((w * x**p).sum()) == pytest.approx(float(v @ Hv), rel=1e-6, abs=1e-9)


def test_density_plot(tmp_path):
    pytest.importorskip("matplotlib")
    dens = S.spectral_density(MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=DT))), num_steps=10)
    path = tmp_path / "density.png"
    ax = dens.plot(path=str(path))
    assert path.stat().st_size > 0 and ax is not None
    with pytest.raises(ValueError, match="sigma"):
        dens.density(sigma=0.0)


# ------------------------------------------------------------------------------------------------------------
# Per-layer curvature, bottom eigenvalues, wrappers
# ------------------------------------------------------------------------------------------------------------
def _blocks(model, H, names):
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = dict(zip([n for n, _ in model.named_parameters()], torch.tensor([0, *sizes]).cumsum(0).tolist()))
    idx = torch.cat([torch.arange(offsets[n], offsets[n] + dict(model.named_parameters())[n].numel())
                     for n in names])
    return H[idx][:, idx]


def test_layer_curvature_matches_dense_blocks(mlp):
    model, loss_fn, data, H = mlp
    # module rows; dense_below=0 forces the iterative solver (LOBPCG) on every block
    table = S.layer_curvature(model, loss_fn, data, k=2, lambda_min=True, dense_below=0, trace_method="exact",
                              tol=1e-9)
    assert [r["name"] for r in table] == ["0", "2"] and [r["numel"] for r in table] == [48, 27]
    for row in table:
        B = _blocks(model, H, row["params"])
        ev = torch.linalg.eigvalsh(B)
        scale = float(ev.abs().max())
        assert row["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-6)
        assert row["eigenvalues"][1] == pytest.approx(float(ev[-2]), rel=1e-6)
        assert abs(row["lambda_min"] - float(ev[0])) <= 1e-6 * scale
        assert row["trace"] == pytest.approx(float(B.trace()), rel=1e-6, abs=1e-8 * scale)
    # one row per parameter tensor, formed densely (small blocks)
    table = S.layer_curvature(model, loss_fn, data, group="parameter", lambda_min=True)
    assert [r["name"] for r in table] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for row in table:
        ev = torch.linalg.eigvalsh(_blocks(model, H, row["params"]))
        scale = float(ev.abs().max())
        assert abs(row["lambda_max"] - float(ev[-1])) <= 1e-6 * scale
        assert abs(row["lambda_min"] - float(ev[0])) <= 1e-6 * scale
        assert row["converged"] and row["num_hvps"] == row["numel"]
    assert "lambda_max" in str(table)


def test_layer_groups_tied_and_frozen():
    from conftest import partly_frozen, transformer
    model = transformer()[0]
    groups = dict(S._layer_groups(model, "module"))
    assert "head" not in groups and groups["emb"] == ["emb.weight"] and groups["pos"] == ["pos"]
    model = partly_frozen()[0]
    assert dict(S._layer_groups(model, "module"))["0"] == ["0.bias"]
    with pytest.raises(ValueError, match="group"):
        S._layer_groups(model, "block")


def test_negative_eigenvalues(mlp):
    model, loss_fn, data, H = mlp
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < -1e-3 * ev[-1]  # the model's Hessian is indefinite at this point
    for solver in ("lobpcg", "lanczos"):
        res = sharpness(model, loss_fn, data, k=2, largest=False, solver=solver, tol=1e-8)
        assert res.converged
        assert rel_err(res.eigenvalues, ev[:2]) < 1e-6  # most negative first


def test_hessian_trace_wrapper(mlp):
    model, loss_fn, data, H = mlp
    exact = S.hessian_trace(model, loss_fn, data, method="exact")
    assert exact.estimate == pytest.approx(float(H.trace()), rel=1e-7) and exact.num_hvps == H.shape[0]
    h = S.hessian_trace(model, loss_fn, data, tol=0.2, max_samples=400)
    assert h.method == "hutchinson" and (h.converged or h.num_hvps == 400) and "loss" in h.info
    with pytest.raises(ValueError, match="method"):
        S.hessian_trace(model, loss_fn, data, method="nope")
    with pytest.raises(TypeError, match="unexpected"):
        S.hessian_trace(model, loss_fn, data, bogus=1)


def test_layer_curvature_defaults_converge_quickly_on_a_small_model():
    # issue 14.11: with the README's defaults every layer of a 771-parameter model used 1,000 Hutchinson probes
    # and reported converged=False (the λ_min of a rank-deficient block, ≈ 0, cannot meet a tolerance relative
    # to itself). Now: exact traces where they are no dearer, λ_min relative to the spread of the spectrum.
    from curvature import HessianOperator, layer_curvature

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    loss = torch.nn.functional.cross_entropy
    table = layer_curvature(model, loss, (x, y), lambda_min=True)
    assert sum(r["numel"] for r in table) == 771
    assert all(r["converged"] for r in table), str(table)
    assert sum(r["num_hvps"] for r in table) < 1500
    for row in table:
        H = HessianOperator(model, loss, (x, y), params=list(row["params"]), dtype=torch.float64).to_dense()
        evals = torch.linalg.eigvalsh(0.5 * (H + H.T))
        assert row["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-5)
        assert row["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-4)
        assert abs(row["lambda_min"] - float(evals[0])) <= 1e-4 * float(evals.abs().max())
