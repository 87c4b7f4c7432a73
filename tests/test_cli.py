"""The `curvature` command end to end: `python -m curvature.cli` in a subprocess, on checkpoints written here,
with the model/data factories in a module this test writes and puts on PYTHONPATH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from curvature.cli import build_parser, main
from curvature.diagnostics import sharpness
from curvature.optim import preconditioned_sharpness, stability_threshold

REPO = Path(__file__).resolve().parents[1]
TOL = "1e-10"

FACTORIES = textwrap.dedent('''
    import os
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)

    def other_model():
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(torch.float64)

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)

    def batches():  # an iterable of batches: the Hessian of their sample-weighted mean loss
        x, y = data()
        return [(x[:20], y[:20]), (x[20:], y[20:])]

    def adam(params):
        return torch.optim.Adam(params, lr=1.0)

    class Evil:
        """Unpickling this runs code: it creates the folder named by `target`."""

        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (os.makedirs, (self.target, 0o777, True))
''')


def _load_factories(root: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckfactories", root / "ckfactories.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(fac, steps, opt_cls, **kw):
    model = fac.model()
    opt = opt_cls(model.parameters(), **kw)
    x, y = fac.data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A folder of checkpoints in every format, and the factories module."""
    root = tmp_path_factory.mktemp("cli")
    (root / "ckfactories.py").write_text(FACTORIES)
    fac = _load_factories(root)
    from safetensors.torch import save_file

    d = root / "ckpts"
    d.mkdir()
    models, opts = {}, {}
    m, o = _train(fac, 2, torch.optim.SGD, lr=0.1)
    torch.save(m.state_dict(), d / "plain_step_10.pt")
    models[10] = m
    m, o = _train(fac, 4, torch.optim.SGD, lr=0.1, momentum=0.9)
    torch.save({"model": m.state_dict(), "optimizer": o.state_dict(), "step": 20}, d / "sgd.pt")
    models[20], opts[20] = m, o
    m, _ = _train(fac, 6, torch.optim.SGD, lr=0.1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "weights-30.safetensors"))
    models[30] = m
    m, o = _train(fac, 5, torch.optim.Adam, lr=0.01)
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "optimizer_states": [o.state_dict()], "global_step": 40, "epoch": 1,
                "pytorch-lightning_version": "2.4.0"}, d / "epoch=1-step=40.ckpt")
    models[40], opts[40] = m, o
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return {"root": root, "dir": d, "fac": fac, "models": models, "opts": opts, "env": environ}


def run(env, *args, check=None):
    proc = subprocess.run([sys.executable, "-m", "curvature.cli", *map(str, args)], cwd=env["root"],
                          env=env["env"], capture_output=True, text=True, timeout=300)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("curvature: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------
def test_analyze_every_format_matches_direct_calls_then_resume_with_a_bad_file(env):
    out = env["root"] / "results.csv"
    d = env["dir"]
    proc = run(env, "analyze", d, "--model", "ckfactories:model", "--data", "ckfactories:data", "--tol", TOL,
               "--out", out, "--plot", env["root"] / "sharpness.png", "--no-progress", check=0)
    assert "λ_max(P⁻¹H)" in proc.stdout  # the table has the Adam column
    assert (env["root"] / "sharpness.png").stat().st_size > 1000
    from curvature.checkpoints import read_rows

    rows = read_rows(out)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    data = env["fac"].data()
    for row in rows:
        model = env["models"][row["step"]]
        assert row["error"] is None and row["converged"] is True
        want = sharpness(model, F.cross_entropy, data, tol=float(TOL)).eigenvalue
        assert row["sharpness"] == pytest.approx(want, rel=1e-6)
    sgd, adam = rows[1], rows[3]
    assert sgd["threshold"] == pytest.approx(stability_threshold(env["opts"][20])) == pytest.approx(38.0)
    assert sgd["lr"] == 0.1 and sgd["preconditioned_sharpness"] is None
    want = preconditioned_sharpness(env["models"][40], F.cross_entropy, data, env["opts"][40], tol=float(TOL),
                                    lookahead=True)  # rows use the P of the step about to be taken
    assert adam["preconditioned_sharpness"] == pytest.approx(want.eigenvalue, rel=1e-6)
    assert adam["threshold"] == pytest.approx(3800.0)  # (2 + 2·0.9) / (0.1 · 0.01)
    assert rows[0]["threshold"] is None  # a plain state_dict has no optimizer: no lr, no threshold

    # A corrupt file joins the folder: resume analyses only it, reports it in its row, exit status 1.
    before = out.read_text()
    (d / "zz_step_50.pt").write_bytes((d / "sgd.pt").read_bytes()[:300])
    try:
        proc = run(env, "analyze", d, "--model", "ckfactories:model", "--data", "ckfactories:data", "--tol", TOL,
                   "--out", out, check=1)
    finally:
        (d / "zz_step_50.pt").unlink()
    assert "4 checkpoint(s) already in" in proc.stderr and "1 analysed now" in proc.stderr
    assert "zz_step_50.pt" in proc.stderr and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    text = out.read_text()
    assert text.startswith(before) and len(text.splitlines()) == len(before.splitlines()) + 1
    bad = read_rows(out)[-1]
    assert bad["step"] == 50 and "truncated" in bad["error"] and bad["sharpness"] is None


def test_analyze_json_lines_iterable_data_and_optimizer_factory(env):
    proc = run(env, "analyze", env["dir"] / "epoch=1-step=40.ckpt", "--model", "ckfactories:model", "--data",
               "ckfactories:batches", "--tol", TOL, "--json", "--k", "2", "--optimizer", "ckfactories:adam",
               "--loss", "torch.nn.functional:cross_entropy", check=0)
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    x, y = env["fac"].data()
    res = sharpness(env["models"][40], F.cross_entropy, [(x[:20], y[:20]), (x[20:], y[20:])], k=2, tol=float(TOL))
    assert row["eigenvalues"] == pytest.approx(res.eigenvalues.tolist(), rel=1e-6)
    assert row["lr"] == 0.01 and len(row["preconditioned_eigenvalues"]) == 2


def test_bad_inputs_exit_2_with_one_line(env):
    root = env["root"]
    args = ["--model", "ckfactories:model", "--data", "ckfactories:data", "--no-progress"]
    assert_one_line_error(run(env, "analyze", root / "missing", *args), "does not exist", "missing")
    # a checkpoint that does not fit the model: the error names the keys; nothing analysed -> exit 2
    sd = env["fac"].model().state_dict()
    sd["extra.weight"] = sd.pop("2.bias")
    torch.save(sd, root / "mismatch.pt")
    proc = run(env, "analyze", root / "mismatch.pt", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing keys: 2.bias" in proc.stderr and "unexpected keys: extra.weight" in proc.stderr


def test_more_bad_inputs_in_process(env, capsys, monkeypatch):
    """The same entry point, in this process (no interpreter start-up per case)."""
    monkeypatch.syspath_prepend(str(env["root"]))
    root = env["root"]
    args = ["--model", "ckfactories:model", "--data", "ckfactories:data", "--no-progress"]

    def check(argv, *needles, code=2):
        assert main(argv) == code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines and all(ln.startswith("curvature: error: ") for ln in lines), err
        if code == 2 and needles and "shapes differ" not in needles[0]:
            assert len(lines) == 1, err
        for needle in needles:
            assert needle in err, err

    (root / "empty").mkdir(exist_ok=True)
    (root / "empty" / "readme.txt").write_text("x")
    check(["analyze", str(root / "empty"), *args], "no checkpoint files", "readme.txt")
    check(["analyze", str(env["dir"]), "--model", "nosuchpkg.models:build", "--data", "ckfactories:data"],
          "--model", "cannot import module 'nosuchpkg.models'")
    check(["analyze", str(env["dir"]), "--model", "ckfactories:modle", "--data", "ckfactories:data"],
          "has no attribute 'modle'")
    check(["analyze", str(env["dir"]), "--model", "ckfactories:model", "--data", "nodots"],
          "--data", "expected 'package.module:function'")
    check(["analyze", str(env["dir"]), *args, "--loss", "hinge"], "--loss 'hinge'")
    check(["analyze", str(env["dir"] / "plain_step_10.pt"), "--model", "ckfactories:other_model", "--data",
           "ckfactories:data"], "shapes differ", "0.weight (8, 5) vs model (4, 5)")
    check(["analyze", str(env["dir"]), *args, "--k", "0"], "--k must be at least 1")
    if not torch.cuda.is_available():
        check(["analyze", str(env["dir"]), *args, "--device", "cuda"], "CUDA is not available")
    check(["check-hvp", "--model", "ckfactories:data", "--data", "ckfactories:data"], "expected a torch.nn.Module")


def test_max_iters_and_max_batch_size_refused_before_any_checkpoint_is_read(env, capsys, monkeypatch):
    """#26.5: like ``--tol -1``: one line, exit 2, nothing loaded (before: an error row per checkpoint)."""
    monkeypatch.syspath_prepend(str(env["root"]))
    args = ["analyze", str(env["dir"]), "--model", "ckfactories:model", "--data", "ckfactories:data",
            "--no-progress"]
    for flag, value in (("--max-iters", "0"), ("--max-iters", "-3"), ("--max-batch-size", "0")):
        assert main([*args, flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"curvature: error: {flag} must be at least 1, got {value}", err


def test_pickled_code_refused_unless_trusted(env):
    root = env["root"]
    marker = root / "code-ran"
    fac = env["fac"]
    evil_dir = root / "evil"
    evil_dir.mkdir()
    torch.save({"model": fac.model().state_dict(), "step": 3, "note": fac.Evil(str(marker))}, evil_dir / "e.pt")
    args = ["--model", "ckfactories:model", "--data", "ckfactories:data", "--tol", TOL]
    proc = run(env, "analyze", evil_dir, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--trust-checkpoints" in proc.stderr and "refused" in proc.stderr and "os.makedirs" in proc.stderr
    assert not marker.exists()
    proc = run(env, "analyze", evil_dir, *args, "--trust-checkpoints", "--json", check=0)
    assert marker.exists()
    row = json.loads(proc.stdout.splitlines()[0])
    want = sharpness(fac.model(), F.cross_entropy, fac.data(), tol=float(TOL)).eigenvalue
    assert row["step"] == 3 and row["sharpness"] == pytest.approx(want, rel=1e-6)


def test_check_hvp(env):
    proc = run(env, "check-hvp", "--model", "ckfactories:model", "--data", "ckfactories:data", "--directions", "3",
               check=0)
    assert "PASSED" in proc.stdout and "direction 2" in proc.stdout


def test_help_is_there_for_newcomers(capsys):
    for argv, needles in ((["--help"], ["demo", "analyze", "check-hvp", "examples:", "curvature demo --out demo-out"]),
                          (["analyze", "--help"], ["--trust-checkpoints", "curvature analyze demo-out/checkpoints --model",
                                                   "--model", "weights_only=True"]),
                          (["check-hvp", "--help"], ["central differences", "curvature check-hvp --model"]),
                          (["demo", "--help"], ["--quick", "edge of stability", "curvature demo --out"])):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal
        for needle in needles:
            assert needle in text, (argv, needle)
    assert build_parser().parse_args(["demo"]).out == "demo-out"
    assert main([]) == 2


def test_compare_and_python_dash_m_curvature(tmp_path):
    # `python -m curvature` is the console script; `compare --quick` runs the harness end to end
    proc = subprocess.run([sys.executable, "-m", "curvature", "compare", "--setup", "digits", "--quick",
                           "--steps", "12", "--track-every", "6", "--schedules", "none,linear,curvature_aware",
                           "--threads", "1", "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp" / "comparison.csv").exists() and (tmp_path / "cmp" / "comparison.png").exists()
    from curvature import read_rows
    rows = read_rows(tmp_path / "cmp" / "comparison.csv")
    assert {"linear", "curvature_aware"} <= {str(r.get("schedule")) for r in rows}


# --- issue 14.1/14.8/14.11: name, help text that matches the code, instant --help/--version, --quiet ----------
@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["demo", "--help"], ["compare", "--help"],
                                  ["analyze", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    code = ("import sys, runpy; sys.argv = ['curvature'] + %r\n"
            "try:\n    runpy.run_module('curvature', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % (argv,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    if argv == ["--version"]:
        from curvature import __version__
        assert proc.stdout.strip() == f"curvature {__version__} (distribution torch-curvature)"


def test_demo_help_shows_the_code_defaults_once(capsys):
    from curvature.demo import DEMO_DEFAULTS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sgd, adam = DEMO_DEFAULTS["sgd"], DEMO_DEFAULTS["adam"]
    assert f"(default: {sgd['steps']};" in text and f"(default: {sgd['lr']:g} for sgd, {adam['lr']:g} for adam)" in text
    assert "400" not in text and "4.0" not in text and "(default: None)" not in text and "--quiet" in text
    for sub in ("analyze", "check-hvp", "compare"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        out = capsys.readouterr().out
        assert "(default: None)" not in out and ") (default:" not in " ".join(out.split()), sub


def test_demo_quiet_prints_nothing(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--steps", "12", "--out", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "d" / "sharpness.csv").exists() and (tmp_path / "d" / "sharpness.png").exists()


def test_operator_matmul_accepts_numpy_and_refuses_other_types():
    import numpy as np

    from curvature import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    H = HessianOperator(model, F.cross_entropy, (x, y))
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    out = H @ v
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert np.allclose(out, (H @ torch.from_numpy(v)).numpy())
    V = np.random.default_rng(1).standard_normal((H.shape[0], 3)).astype(np.float32)
    assert (H @ V).shape == (H.shape[0], 3) and (H @ V).dtype == np.float32
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        H @ [1.0] * H.shape[0]
