"""The benchmark scripts run end to end on tiny workloads (so they cannot rot).

Peer libraries are optional (``pip install --no-deps``, see benchmarks/README.md): their rows are
"skipped" when missing, and the peer-specific checks below skip.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("sklearn")

from benchmarks import models as M  # noqa: E402
from curvature import peers as P  # noqa: E402
from benchmarks._timing import markdown_table, pin_threads, time_fn  # noqa: E402


@pytest.mark.parametrize("name", sorted(M.WORKLOADS))
def test_workloads_build_and_run(name):
    wl = M.make(name, "tiny", seed=0)
    model, loss_fn, (x, y) = wl.as_tuple()
    loss = loss_fn(model(x), y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # seeded: same parameters and data twice
    wl2 = M.make(name, "tiny", seed=0)
    assert torch.equal(torch.nn.utils.parameters_to_vector(M.trainable_params(wl.model)),
                       torch.nn.utils.parameters_to_vector(M.trainable_params(wl2.model)))
    assert torch.equal(wl.batch[0], wl2.batch[0])


def test_gpt_ties_embeddings_once():
    wl = M.make("gpt", "tiny")
    names = [n for n, _ in wl.model.named_parameters()]
    assert "wte.weight" in names and "head.weight" not in names


def test_reference_hvp_is_symmetric():
    wl = M.make("ln_transformer", "tiny", dtype=torch.float64)
    hvp = P.reference_hvp_fn(*wl.as_tuple())
    g = torch.Generator().manual_seed(0)
    u, v = (torch.randn(wl.num_params, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(u @ hvp(v), v @ hvp(u), rtol=1e-9)


def test_time_fn_and_table():
    t = time_fn(lambda: torch.ones(10).sum(), warmup=1, repeat=3)
    assert t.ok and len(t.times) == 3 and t.median > 0
    bad = time_fn(lambda: 1 / 0, warmup=0, repeat=1)
    assert not bad.ok and "ZeroDivisionError" in bad.error
    with pin_threads(1):
        assert torch.get_num_threads() == 1
    assert "| a |" in markdown_table([{"a": 1}])


@pytest.mark.skipif(importlib.util.find_spec("curvlinops") is None, reason="curvlinops not installed")
def test_curvlinops_is_wrong_on_layernorm():
    """The trap the LN workload exists for: jvp(jacrev) through affine layer_norm is not the Hessian."""
    wl = M.make("ln_transformer", "tiny", dtype=torch.float64)
    v = torch.randn(wl.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = P.reference_hvp_fn(*wl.as_tuple())(v)
    theirs = P.hvp_fn("curvlinops", *wl.as_tuple())(v)
    assert (theirs - ref).norm() / ref.norm() > 1e-4


@pytest.mark.parametrize("peer", P.PEERS)
def test_peer_adapters_on_mlp(peer):
    if not P.available(peer):
        pytest.skip(f"{peer} not installed")
    wl = M.make("mlp", "tiny", dtype=torch.float64)
    v = torch.randn(wl.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = P.reference_hvp_fn(*wl.as_tuple())(v)
    assert torch.allclose(P.hvp_fn(peer, *wl.as_tuple())(v), ref, rtol=1e-8, atol=1e-10)
    r = P.top_eigenvalue(peer, *wl.as_tuple(), tol=1e-3)
    assert r.num_hvps > 0 and r.eigenvalue > 0
    assert wl.model.training  # PyHessian's forced eval() is undone
    assert all(p.grad is None for p in wl.model.parameters())


def test_hvp_script_quick(tmp_path):
    from benchmarks import hvp
    out = tmp_path / "hvp.md"
    report = hvp.main(["--quick", "--models", "mlp", "gpt", "--ks", "1", "2", "--repeat", "1", "--warmup", "0",
                       "--threads", "1", "--out", str(out)])
    assert out.exists() and "HVP cost" in report and "torch double backward" in report
    assert "### gpt" in report and "### mlp" in report


def test_hvp_compile_script_quick(tmp_path):
    from benchmarks import hvp_compile
    out = tmp_path / "hvp_compile.md"
    report = hvp_compile.main(["--quick", "--models", "mlp", "--rounds", "3", "--out", str(out)])
    assert out.exists() and "raw kept graph" in report and "ours auto" in report
    assert "compile=True" not in report.split("### mlp")[1]  # --quick leaves the compile row out


def test_eigensolvers_script_quick(tmp_path):
    from benchmarks import eigensolvers
    out = tmp_path / "eig.md"
    report = eigensolvers.main(["--quick", "--models", "mlp", "--tols", "1e-3", "--power-max-iters", "30",
                                "--k-scaling", "--threads", "1", "--out", str(out)])
    assert out.exists() and "Reference λ_max" in report and "Scaling with k" in report


def test_tracker_benchmark_quick(capsys):
    from benchmarks import tracker
    assert tracker.main(["--quick", "--models", "mlp", "--steps", "10", "--warm-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "every=10" in out and "warm / cold" in out and "fixed probe" in out


# ---------------------------------------------------------------------------------------------------
# curvature bench / benchmark_solvers: solvers side by side on the user's own model
# ---------------------------------------------------------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.nn.functional.cross_entropy, (torch.randn(40, 6, generator=g),
                                                      torch.randint(0, 3, (40,), generator=g))


def test_benchmark_solvers_on_a_small_model():
    from curvature.bench import benchmark_solvers, format_table

    model, loss_fn, data = _tiny()
    rows = benchmark_solvers(model, loss_fn, data, eig_tol=1e-3, seeds=2)
    by = {r["solver"]: r for r in rows}
    ref = torch.linalg.eigvalsh(__import__("conftest").dense_hessian_fd(
        model.double(), loss_fn, (data[0].double(), data[1])))[-1]
    model.float()
    assert by["reference (lanczos, float64)"]["eigenvalue"] == pytest.approx(float(ref), rel=1e-6)
    for name in ("lanczos", "lobpcg", "power_iteration", 'scipy eigsh(which="LA")'):
        assert by[name]["max_rel_error"] <= 1e-3 and by[name]["hvps"] > 0 and by[name]["seconds"] > 0
    for peer in ("pyhessian", "hessian_eigenthings", "curvlinops"):
        assert peer in by
    assert "| lanczos |" in format_table(rows)
    with pytest.raises(ValueError, match="eig_tol"):
        benchmark_solvers(model, loss_fn, data, eig_tol=float("inf"))


def test_cli_bench(tmp_path, monkeypatch, capsys):
    from curvature.cli import main

    (tmp_path / "tinybench_mod.py").write_text(
        "import torch\n"
        "def model():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))\n"
        "def data():\n    g = torch.Generator().manual_seed(1)\n"
        "    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["bench", "--model", "tinybench_mod:model", "--data", "tinybench_mod:data", "--seeds", "1",
                 "--no-peers"]) == 0
    out = capsys.readouterr().out
    assert "| lanczos |" in out and "scipy eigsh" in out and "reference" in out
    assert main(["bench", "--model", "tinybench_mod:model", "--data", "tinybench_mod:data", "--eig-tol", "inf"]) == 2


def test_critical_benchmark_quick(tmp_path):
    from benchmarks import critical
    out, fig = tmp_path / "critical.md", tmp_path / "critical.png"
    assert critical.main(["--quick", "--mlp-steps", "4", "--gpt-steps", "4", "--out", str(out),
                          "--figure", str(fig)]) == 0
    text = out.read_text()
    assert "λ_c·η/2" in text and "forwards model warm" in text and fig.exists()


def test_warm_start_benchmark_quick(tmp_path):
    from benchmarks import warm_start
    out = tmp_path / "warm.md"
    assert warm_start.main(["--quick", "--only", "mlp", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Warm starts with and without a random direction" in text and "bound below the error" in text
