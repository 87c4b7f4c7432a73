"""SharpnessTracker: rows agree with direct calls, warm starts save HVPs, sinks write parseable files, failures
never stop training (unless asked), and a tracked run is bit-identical to an untracked one."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_same_state, snapshot
from curvature.diagnostics import sharpness
from curvature.optim import preconditioned_sharpness, stability_threshold
from curvature.tracking import (ROW_KEYS, CSVSink, JSONLinesSink, SharpnessTracker, TensorBoardSink, TrackingError,
                                TrackingWarning, read_rows)

API_KEYS = ("step", "lr", "loss", "sharpness", "preconditioned_sharpness", "threshold", "num_hvps", "seconds",
            "converged")


def problem(seed=0, task="cls", dropout=0.0):
    torch.manual_seed(seed)
    X = torch.randn(256, 10)
    if task == "reg":
        teacher = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
        Y = teacher(X).detach()
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        return model, F.mse_loss, X, Y
    Y = (X @ torch.randn(10, 3)).argmax(1)
    layers = [nn.Linear(10, 32), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(32, 3)]
    return nn.Sequential(*layers), F.cross_entropy, X, Y


def train(model, loss_fn, X, Y, opt, steps, tracker=None, bs=32, hook=None):
    for i in range(steps):
        idx = torch.arange(i * bs, (i + 1) * bs) % X.shape[0]
        xb, yb = X[idx], Y[idx]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        if hook is not None:
            hook(i, model, opt, (xb, yb))
        if tracker is not None:
            tracker.step(model, opt, (xb, yb), step=i)
        opt.step()


def test_rows_match_direct_sharpness_sgd():
    model, loss_fn, X, Y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    tracker = SharpnessTracker(loss_fn, every=3, tol=1e-6, dtype=torch.float64)
    direct = {}

    def hook(i, m, o, batch):
        if i % 3 == 0:
            direct[i] = sharpness(m, loss_fn, batch, tol=1e-6, dtype=torch.float64)

    train(model, loss_fn, X, Y, opt, 8, tracker, hook=hook)
    assert [r["step"] for r in tracker.history] == [0, 3, 6]
    for row in tracker.history:
        assert set(ROW_KEYS) <= set(row) and set(API_KEYS) <= set(row)
        ref = direct[row["step"]]
        assert row["sharpness"] == pytest.approx(ref.eigenvalue, rel=1e-6)
        assert row["loss"] == pytest.approx(ref.info["loss"], rel=1e-6)
        # step 0: the momentum buffer is empty, the first step is plain GD (2/η; #12.14)
        expected = 2 / 0.3 if row["step"] == 0 else (2 + 2 * 0.9) / 0.3
        assert row["lr"] == 0.3 and row["threshold"] == pytest.approx(expected)
        assert row["edge_ratio"] == pytest.approx(row["sharpness"] / row["threshold"])
        assert row["preconditioned_sharpness"] is None and row["converged"] and row["error"] is None
        assert row["num_hvps"] > 0 and row["seconds"] > 0 and row["eigenvalues"] == [row["sharpness"]]
    # a skipped step is a no-op returning None
    assert tracker.step(model, opt, (X[:8], Y[:8]), step=1) is None


def test_adam_rows_lookahead_before_first_step_then_state():
    model, loss_fn, X, Y = problem(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(loss_fn, every=2, tol=1e-6, k=2, dtype=torch.float64, lookahead="auto")
    direct = {}

    def hook(i, m, o, batch):
        if i % 2 == 0:
            la = i == 0
            direct[i] = preconditioned_sharpness(m, loss_fn, batch, o, k=2, tol=1e-6, lookahead=la,
                                                 dtype=torch.float64)

    train(model, loss_fn, X, Y, opt, 4, tracker, hook=hook)
    first, second = tracker.history
    assert first["lookahead"] is True and second["lookahead"] is False
    for row in (first, second):
        ref = direct[row["step"]]
        assert row["preconditioned_eigenvalues"] == pytest.approx(ref.eigenvalues.tolist(), rel=1e-5)
        assert row["threshold"] == pytest.approx(stability_threshold(opt)) == pytest.approx(38 / 1e-2)
        assert row["edge_ratio"] == pytest.approx(row["preconditioned_sharpness"] / row["threshold"])
        assert len(row["eigenvalues"]) == 2 and row["optimizer"] == "Adam"
        assert row["num_hvps"] >= row["preconditioned_num_hvps"] > 0


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("signals", [False, True])
def test_tracked_run_is_bit_identical(opt_name, signals):
    def run(with_tracker):
        model, loss_fn, X, Y = problem(2, dropout=0.2)
        model.train()
        opt = (torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9) if opt_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-2))
        tracker = SharpnessTracker(loss_fn, every=2, k=2, signals=signals) if with_tracker else None
        torch.manual_seed(123)
        train(model, loss_fn, X, Y, opt, 6, tracker)
        return model, opt, torch.get_rng_state(), tracker

    m1, o1, rng1, tr = run(True)
    m0, o0, rng0, _ = run(False)
    assert len(tr.history) == 3 and all(r["error"] is None for r in tr.history)
    assert torch.equal(rng0, rng1)
    for (n, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), n
    s0, s1 = o0.state_dict()["state"], o1.state_dict()["state"]
    for key in s0:
        for name in s0[key]:
            assert torch.equal(torch.as_tensor(s0[key][name]), torch.as_tensor(s1[key][name]))


def test_measure_leaves_state_untouched():
    model, loss_fn, X, Y = problem(3, dropout=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, X, Y, opt, 2)
    loss_fn(model(X[:32]), Y[:32]).backward()  # .grad populated, as before optimizer.step()
    before = snapshot(model, opt)
    SharpnessTracker(loss_fn, every=1, k=2).step(model, opt, (X[:32], Y[:32]), step=0)
    assert_same_state(before, model, opt)


def _hvps(tracker):
    rows = tracker.history[1:]  # the first row is cold in both runs
    h = sum(r["num_hvps"] - (r["preconditioned_num_hvps"] or 0) for r in rows)
    p = sum(r["preconditioned_num_hvps"] or 0 for r in rows)
    return h / len(rows), p / len(rows)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_warm_start_uses_fewer_hvps(opt_name):
    """Fixed probe batch, measured every step: warm-started LOBPCG needs about a third of the HVPs of a cold
    start for λ_max(H) (measured: SGD 12.1 → 4.2, Adam 12.6 → 3.5 per row; P⁻¹H 13.3 → 7.7)."""
    def run(warm):
        model, loss_fn, X, Y = problem(0, task="reg")
        opt = (torch.optim.SGD(model.parameters(), lr=0.1) if opt_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        # the old tracker's settings (LOBPCG, residual tol, no guard vector): the warm start alone
        tracker = SharpnessTracker(loss_fn, every=1, tol=1e-4, warm_start=warm, probe=(X[:128], Y[:128]),
                                   solver="lobpcg", eig_tol=None, warm_guard=False, gradient_start=False)
        train(model, loss_fn, X, Y, opt, 12, tracker)
        assert all(r["error"] is None for r in tracker.history)
        return tracker

    cold, warm = run(False), run(True)
    (hc, pc), (hw, pw) = _hvps(cold), _hvps(warm)
    print(f"\n{opt_name}: HVPs per row for λ(H): cold {hc:.1f}, warm {hw:.1f}; λ(P⁻¹H): cold {pc:.1f}, warm {pw:.1f}")
    assert all(r["warm_start"] for r in warm.history[1:])
    assert not any(r["warm_start"] for r in cold.history)
    assert hw <= 0.5 * hc
    if opt_name == "adam":
        assert pw < pc
    for a, b in zip(cold.history, warm.history):  # same answers
        assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-3)


def test_sinks_write_parseable_files(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, loss_fn, X, Y = problem(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    logger = logging.getLogger("test.curvature.tracker")
    tracker = SharpnessTracker(loss_fn, every=2, k=2, sinks=[tmp_path / "rows.csv", str(tmp_path / "rows.jsonl"),
                                                              TensorBoardSink(tmp_path / "tb"), logger, seen.append])
    with caplog.at_level(logging.INFO, logger="test.curvature.tracker"):
        train(model, loss_fn, X, Y, opt, 5, tracker)
    tracker.close()
    assert len(tracker.history) == 3 and seen == tracker.history

    # CSV: header = ROW_KEYS, values parse back to the rows
    header = (tmp_path / "rows.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == ROW_KEYS
    for path in (tmp_path / "rows.csv", tmp_path / "rows.jsonl"):
        back = read_rows(path)
        assert len(back) == 3
        for a, b in zip(back, tracker.history):
            assert set(ROW_KEYS) <= set(a)
            for key in ROW_KEYS:
                if isinstance(b[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-12), key
                elif isinstance(b[key], list):
                    assert a[key] == pytest.approx(b[key], rel=1e-12), key
                else:
                    assert a[key] == b[key], key
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert all(set(json.loads(line)) == set(ROW_KEYS) for line in lines)

    # TensorBoard scalars
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for tag in ("curvature/sharpness", "curvature/preconditioned_sharpness", "curvature/threshold",
                "curvature/edge_ratio", "curvature/eigenvalue_1"):
        assert tag in tags
    events = ea.Scalars("curvature/sharpness")
    assert [e.step for e in events] == [0, 2, 4]
    assert [e.value for e in events] == pytest.approx([r["sharpness"] for r in tracker.history], rel=1e-6)

    # logging
    msgs = [r.getMessage() for r in caplog.records if r.name == "test.curvature.tracker"]
    assert len(msgs) == 3 and "λ_max(H)" in msgs[0] and "step 0" in msgs[0]

    df = tracker.to_dataframe()
    assert list(df.columns[:len(ROW_KEYS)]) == list(ROW_KEYS) and len(df) == 3


def test_csv_flushed_per_row(tmp_path):
    model, loss_fn, X, Y = problem(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = CSVSink(tmp_path / "live.csv")
    tracker = SharpnessTracker(loss_fn, every=1, sinks=[sink, JSONLinesSink(tmp_path / "live.jsonl")])
    tracker.step(model, opt, (X[:16], Y[:16]), step=0)
    assert len(read_rows(tmp_path / "live.csv")) == 1  # readable while the file is still open
    assert len(read_rows(tmp_path / "live.jsonl")) == 1
    tracker.close()


def test_nan_measurement_warns_and_training_continues(tmp_path):
    model, loss_fn, X, Y = problem(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(loss_fn, every=1, sinks=[tmp_path / "r.csv"])
    Xbad = X.clone()
    Xbad[0, 0] = float("nan")
    with pytest.warns(TrackingWarning, match="step 1"):
        train(model, loss_fn, X, Y, opt, 1, tracker)
        row = tracker.step(model, opt, (Xbad[:16], Y[:16]), step=1)  # an injected NaN in the batch
        train(model, loss_fn, X, Y, opt, 1, tracker)  # training and tracking go on
    assert row["error"] and "FloatingPointError" in row["error"] and row["converged"] is False
    assert row["sharpness"] is None and row["step"] == 1
    assert [r["error"] is None for r in tracker.history] == [True, False, True]
    back = read_rows(tmp_path / "r.csv")
    assert back[1]["error"] == row["error"] and back[1]["sharpness"] is None
    for p in model.parameters():
        assert torch.isfinite(p).all()

    strict = SharpnessTracker(loss_fn, every=1, on_error="raise")
    with pytest.raises(TrackingError, match="FloatingPointError"):
        strict.step(model, opt, (Xbad[:16], Y[:16]), step=0)
    assert strict.history[-1]["error"]  # the row was still recorded before raising


def test_no_convergence_is_reported():
    model, loss_fn, X, Y = problem(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(loss_fn, every=1, tol=1e-12, max_iters=2, k=2)
    with pytest.warns(TrackingWarning, match="did not converge"):
        row = tracker.step(model, opt, (X[:32], Y[:32]), step=0)
    assert row["converged"] is False and "did not converge" in row["error"]
    assert math.isfinite(row["sharpness"])  # the (approximate) value is still reported
    with pytest.raises(TrackingError):
        SharpnessTracker(loss_fn, every=1, tol=1e-12, max_iters=2, on_error="raise").step(
            model, opt, (X[:32], Y[:32]), step=0)


def test_failing_sink_does_not_stop_training():
    model, loss_fn, X, Y = problem(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken(row):
        raise OSError("disk full")

    tracker = SharpnessTracker(loss_fn, every=1, sinks=[broken])
    with pytest.warns(TrackingWarning, match="disk full"):
        assert tracker.step(model, opt, (X[:16], Y[:16]), step=0)["sharpness"] > 0


def test_fixed_probe_loader_and_own_loss():
    model, loss_fn, X, Y = problem(9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:64], Y[:64]), batch_size=16, shuffle=True)
    rng = torch.get_rng_state()
    row = SharpnessTracker(loss_fn, every=1, probe=loader, tol=1e-6, dtype=torch.float64).step(
        model, opt, None, step=0)
    assert torch.equal(rng, torch.get_rng_state())  # iterating the shuffling probe loader drew nothing
    ref = sharpness(model, loss_fn, (X[:64], Y[:64]), tol=1e-6, dtype=torch.float64)
    assert row["sharpness"] == pytest.approx(ref.eigenvalue, rel=1e-6)

    class OwnLoss(nn.Module):  # a model that computes its loss from labels, like Hugging Face models
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"logits": out, "loss": F.cross_entropy(out, labels)}

    wrapped = OwnLoss(model)
    row2 = SharpnessTracker(None, every=1, tol=1e-6, dtype=torch.float64).step(
        wrapped, opt, {"x": X[:64], "labels": Y[:64]}, step=0)
    assert row2["sharpness"] == pytest.approx(ref.eigenvalue, rel=1e-6)


def test_importing_curvature_imports_no_framework():
    code = ("import sys, curvature, curvature.tracking, curvature.plotting, curvature.integrations; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'matplotlib', 'pandas', "
            "'tensorboard') if m in sys.modules]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_arguments():
    with pytest.raises(ValueError):
        SharpnessTracker(F.mse_loss, every=0)
    with pytest.raises(ValueError):
        SharpnessTracker(F.mse_loss, when="sometimes")
    with pytest.raises(TypeError):
        SharpnessTracker(F.mse_loss, not_an_option=1)
    with pytest.raises(ValueError):
        SharpnessTracker(F.mse_loss, sinks=["rows.txt"])


def test_zero_learning_rate_has_no_threshold():
    model, loss_fn, X, Y = problem(10)
    for opt in (torch.optim.SGD(model.parameters(), lr=0.0), torch.optim.Adam(model.parameters(), lr=0.0)):
        row = SharpnessTracker(loss_fn, every=1).step(model, opt, (X[:16], Y[:16]), step=0)
        assert row["error"] is None and row["sharpness"] > 0
        assert row["threshold"] is None and row["edge_ratio"] is None
        # λ_max(P⁻¹H) is defined at lr = 0 (the first step of a warm-up from 0); SGD has none
        assert (row["preconditioned_sharpness"] is None) == isinstance(opt, torch.optim.SGD)


def test_adam_at_lr_zero_still_measures_preconditioned_sharpness():
    # the first row of a warm-up from 0: λ_max(P⁻¹H) is measured (lookahead), threshold and edge ratio are None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    row = SharpnessTracker(F.cross_entropy, every=1).step(model, opt, (x, y), step=0)
    assert row["error"] is None and row["preconditioned_sharpness"] > 0
    assert row["threshold"] is None and row["edge_ratio"] is None
    ref = preconditioned_sharpness(model, F.cross_entropy, (x, y), opt, lookahead=True, tol=1e-8)
    assert abs(row["preconditioned_sharpness"] - ref.eigenvalue) <= 1e-3 * ref.eigenvalue


# ---------------------------------------------------------------------------------------------------
# W&B and MLflow sinks (issue #14.7): real packages, offline W&B and an MLflow file store, no mocks
# ---------------------------------------------------------------------------------------------------
def _wandb_history(run_dir):
    """(step, {key: value}) of every history record in an offline run's ``.wandb`` file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    path = glob.glob(f"{run_dir}/wandb/offline-run-*/*.wandb")[0]
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        raw = chunk if kind == 1 else None
        if kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            raw = buf + chunk
        if raw is not None:
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                out.append((rec.history.step.num, {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                                   for i in rec.history.item}))
    return out


@pytest.mark.parametrize("spec", ["run", "log"])
def test_wandb_run_and_wandb_log_as_sinks_log_numbers_on_the_row_step(tmp_path, monkeypatch, spec):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, loss_fn, X, Y = problem(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = wandb.init(project="curvature-test", dir=str(tmp_path), mode="offline")
    try:
        tracker = SharpnessTracker(loss_fn, every=2, k=2, tol=1e-6, sinks=[run if spec == "run" else wandb.log])
        train(model, loss_fn, X, Y, opt, 6, tracker)
    finally:
        run.finish()
    history = _wandb_history(tmp_path)
    for _ in range(100):  # wandb-core may still be flushing the offline file right after finish() under load
        if len(history) >= 3:
            break
        time.sleep(0.1)
        history = _wandb_history(tmp_path)
    assert [step for step, _ in history] == [0, 2, 4]
    for (step, values), row in zip(history, tracker.history):
        assert values["curvature/sharpness"] == pytest.approx(row["sharpness"], rel=1e-12)
        assert values["curvature/threshold"] == pytest.approx(row["threshold"])
        assert values["curvature/eigenvalue_1"] == pytest.approx(row["eigenvalues"][1], rel=1e-12)
        logged = {k: v for k, v in values.items() if not k.startswith("_")}
        assert all(isinstance(v, (int, float)) for v in logged.values()), logged  # no lists, strings, None


def test_mlflow_run_as_sink_logs_numbers_on_the_row_step(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from curvature.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    model, loss_fn, X, Y = problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        tracker = SharpnessTracker(loss_fn, every=2, tol=1e-6, sinks=[run])
        train(model, loss_fn, X, Y, opt, 6, tracker)
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "curvature/sharpness")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["sharpness"], rel=1e-12))
                                                   for r in tracker.history]
    metrics = client.get_run(run.info.run_id).data.metrics
    assert "curvature/threshold" in metrics and "curvature/error" not in metrics
    sink = MLflowSink(client=client, run_id=run.info.run_id)  # a client and a run id work too
    sink({"step": 10, "sharpness": 3.0, "eigenvalues": [3.0], "error": None})
    assert client.get_metric_history(run.info.run_id, "curvature/sharpness")[-1].step == 10


# Issue #12.4 / #16: lookahead P by default, accuracy-controlled rows, one graph, training-graph entry, guard
# ---------------------------------------------------------------------------------------------------
from conftest import dense_hessian_fd  # noqa: E402


def _hand_built_P(opt, params, grads, lookahead=True):
    """Adam's P of the next step (v' = β₂v + (1−β₂)g², t' = t+1) or of the last one, with the lr fold."""
    lr0 = opt.param_groups[0]["lr"]
    parts = []
    for p, g in zip(params, grads):
        group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
        b1, b2 = group["betas"]
        st = opt.state.get(p, {})
        t = float(st["step"]) if st else 0.0
        v = st["exp_avg_sq"].clone() if st else torch.zeros_like(p)
        if lookahead:
            v, t = b2 * v + (1 - b2) * g * g, t + 1
            if group.get("amsgrad") and st:
                v = torch.maximum(st["max_exp_avg_sq"], v)
        elif group.get("amsgrad"):
            v = st["max_exp_avg_sq"]
        P = (1 - b1 ** t) * ((v / (1 - b2 ** t)).sqrt() + group["eps"]) * (lr0 / group["lr"])
        parts.append(P.reshape(-1))
    return torch.cat(parts).detach()


def _adam_problem(kind):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, Y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:  # AdamW + amsgrad + two groups with different learning rates
        opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                                 {"params": model[2].parameters(), "lr": 3e-3}], amsgrad=True, weight_decay=0.1)
    return model, F.mse_loss, X, Y, opt


@pytest.mark.parametrize("kind", ["adam", "adamw_amsgrad_2groups"])
def test_rows_use_the_P_of_the_step_about_to_be_taken(kind):
    model, loss_fn, X, Y, opt = _adam_problem(kind)
    tracker = SharpnessTracker(loss_fn, every=1, tol=1e-10, k=1)
    last = SharpnessTracker(loss_fn, every=1, tol=1e-10, k=1, lookahead=False, on_error="warn")
    params = list(model.parameters())
    for i in range(6):
        xb, yb = X[(i * 16) % 64:(i * 16) % 64 + 16], Y[(i * 16) % 64:(i * 16) % 64 + 16]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        if i in (0, 1, 2, 5):
            row = tracker.measure(model, opt, (xb, yb), step=i)
            H = dense_hessian_fd(model, loss_fn, (xb, yb))
            for la, r in ((True, row), (False, None if i == 0 else last.measure(model, opt, (xb, yb), step=i))):
                if r is None:
                    continue
                P = _hand_built_P(opt, params, [p.grad for p in params], lookahead=la)
                D = P.rsqrt()
                ref = float(torch.linalg.eigvalsh(D[:, None] * H * D[None, :])[-1])
                assert r["preconditioner"] == ("next_step" if la else "last_step")
                assert r["preconditioned_sharpness"] == pytest.approx(ref, rel=1e-6), (i, la)
            assert row["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
        opt.step()


def test_sgd_rows_have_no_preconditioner_and_report_the_bound():
    model, loss_fn, X, Y = problem(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    row = SharpnessTracker(loss_fn, every=1).step(model, opt, (X[:64], Y[:64]), step=0)
    assert row["preconditioner"] is None and row["solver"] == "lanczos" and row["eig_tol"] == 1e-3
    assert row["converged"] and 0 <= row["error_bound"] <= 1e-3
    ref = sharpness(model, loss_fn, (X[:64], Y[:64]), tol=1e-10, dtype=torch.float64).eigenvalue
    assert abs(row["sharpness"] - ref) / ref <= 1e-3


@pytest.mark.parametrize("bad", [{"eig_tol": float("inf")}, {"tol": float("nan")}, {"tol": 0.0}, {"tol": "1e-4"},
                                 {"every": 0}, {"every": 2.5}, {"k": 0}, {"max_iters": 0}, {"solver_seed": "a"}])
def test_tracker_options_are_validated(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        SharpnessTracker(F.cross_entropy, **bad)


def test_one_first_order_graph_per_adam_measurement(monkeypatch):
    import curvature.tracking as tracking

    built = []
    real = tracking.HessianOperator

    def counting(*a, **kw):
        built.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tracking, "HessianOperator", counting)
    model, loss_fn, X, Y, opt = _adam_problem("adam")
    rows = {}
    for share in (True, False):
        built.clear()
        rows[share] = SharpnessTracker(loss_fn, every=1, tol=1e-10, share_graph=share).step(
            model, opt, (X, Y), step=0)
        assert len(built) == (1 if share else 2)
    assert rows[True]["preconditioned_sharpness"] == pytest.approx(rows[False]["preconditioned_sharpness"],
                                                                    rel=1e-9)


@pytest.mark.parametrize("entry", ["create_graph", "loss"])
def test_training_graph_entry_is_exact(entry):
    model, loss_fn, X, Y, opt = _adam_problem("adam")
    tracker = SharpnessTracker(loss_fn, every=1, tol=1e-10, k=2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = loss_fn(model(X), Y)
    if entry == "create_graph":
        loss.backward(create_graph=True)
        row = tracker.step(model, opt, (X, Y), step=0)
    else:
        row = tracker.step(model, opt, (X, Y), step=0, loss=loss)
        loss.backward()
    assert row["source"] == "training_graph" and row["error"] is None
    H = dense_hessian_fd(model, loss_fn, (X, Y))
    torch.testing.assert_close(torch.tensor(row["eigenvalues"], dtype=torch.float64),
                               torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-7, atol=0)
    g = torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])
    P = _hand_built_P(opt, list(model.parameters()), [p.grad.detach() for p in model.parameters()])
    D = P.rsqrt()
    assert row["preconditioned_sharpness"] == pytest.approx(
        float(torch.linalg.eigvalsh(D[:, None] * H * D[None, :])[-1]), rel=1e-7)
    assert row["loss"] == (pytest.approx(float(loss.detach())) if entry == "loss" else None)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.isfinite(g).all()
    for p in model.parameters():  # the loop frees the graph it made
        p.grad = None


class _Quadratic(nn.Module):
    """L(θ) = ½ θᵀ A θ with A a buffer the test changes between measurements."""

    def __init__(self, A):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(A.shape[0], dtype=A.dtype))
        self.register_buffer("A", A)

    def forward(self, x):
        return 0.5 * self.theta @ self.A @ self.theta + 0 * x.sum()


def test_warm_start_does_not_lock_onto_lambda2_when_they_swap():
    """At the edge of stability λ1 and λ2 swap (3.362 / 3.315): the old warm start (previous top vector only,
    loose stop) reports λ2; the guard vector keeps λ1."""
    g = torch.Generator().manual_seed(0)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.linspace(0.01, 2.5, n - 2, dtype=torch.float64)
    before = torch.cat([torch.tensor([3.362, 3.315], dtype=torch.float64), bulk])
    after = torch.cat([torch.tensor([3.315, 3.362], dtype=torch.float64), bulk])  # the two top directions swap
    data = (torch.zeros(1, 1, dtype=torch.float64), None)
    loss_fn = lambda out, y: out  # noqa: E731
    results = {}
    for label, kw in (("old", dict(solver="lobpcg", warm_guard=False)), ("guard", dict(solver="lobpcg")),
                      ("guard_lanczos", dict())):
        model = _Quadratic(Q @ torch.diag(before) @ Q.T)
        with torch.no_grad():
            model.theta.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.1)
        tracker = SharpnessTracker(loss_fn, every=1, eig_tol=1e-3, probe=data, retry_cold=False, hvp_route="exact",
                                   **kw)  # the solver defect itself, on exact HVPs
        first = tracker.step(model, None, step=0)
        assert first["sharpness"] == pytest.approx(3.362, rel=1e-3)
        model.A.copy_(Q @ torch.diag(after) @ Q.T)
        results[label] = tracker.step(model, None, step=1)
    assert results["old"]["sharpness"] == pytest.approx(3.315, rel=1e-3)  # the defect: λ2 reported
    for label in ("guard", "guard_lanczos"):
        assert results[label]["warm_start"]
        assert results[label]["sharpness"] == pytest.approx(3.362, rel=1e-3), label


def test_analyze_checkpoints_passes_the_accuracy_options_through(tmp_path):
    from curvature.checkpoints import analyze_checkpoints

    model, loss_fn, X, Y = problem(0)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")

    def factory():
        return problem(0)[0]

    rows = analyze_checkpoints(tmp_path, factory, (X[:64], Y[:64]), loss_fn, eig_tol=1e-3, tol=None,
                               solver="lanczos")
    ref = sharpness(model, loss_fn, (X[:64], Y[:64]), tol=1e-10, dtype=torch.float64).eigenvalue
    assert rows[0]["error"] is None
    assert abs(rows[0]["sharpness"] - ref) / ref <= 1e-3
    with pytest.raises((ValueError, TypeError), match="eig_tol"):
        analyze_checkpoints(tmp_path, factory, (X[:64], Y[:64]), loss_fn, eig_tol=float("nan"), errors="raise")


def test_path_sink_writes_every_row_of_its_own_run(tmp_path):
    """Only rows that were in the file before this run are skipped (a resumed run); two rows of this run with the same
    step (measure() called twice, or one row per optimizer) are both written — none lost."""
    from curvature.sinks import CSVSink, JSONLinesSink

    for sink_cls, name in ((CSVSink, "r.csv"), (JSONLinesSink, "r.jsonl")):
        path = tmp_path / name
        sink = sink_cls(path)
        sink({"step": 0, "sharpness": 1.0})
        sink({"step": 0, "sharpness": 2.0})
        sink({"step": 0, "sharpness": 3.0, "optimizer_index": 1})
        assert [r["sharpness"] for r in read_rows(path)] == [1.0, 2.0, 3.0]
        resumed = sink_cls(path)  # a resumed run: rows already there are not written again
        with pytest.warns(RuntimeWarning, match="already has a row"):
            resumed({"step": 0, "sharpness": 9.0})
        resumed({"step": 1, "sharpness": 4.0})
        assert [r["sharpness"] for r in read_rows(path)] == [1.0, 2.0, 3.0, 4.0]


def test_rows_read_back_with_their_types(tmp_path):
    """The one reader knows every column the tracker writes: ints stay ints, names stay strings."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "rows.csv"
    tracker = SharpnessTracker(F.cross_entropy, every=1, signals=True, sinks=[path])
    row = tracker.step(model, opt, (x, y), step=0)
    back = read_rows(path)[0]
    for key in ("step", "num_hvps", "signals_num_hvps"):
        assert isinstance(back[key], int) and back[key] == row[key], key
    for key in ("solver", "source", "when", "optimizer"):
        assert back[key] == row[key], key


class _ShiftedParameter(nn.Module):
    """Outputs θ for every sample; with the loss below, L(θ) = ½ Σ a_i (θ_i − c_i)²: H = diag(a), g = a ⊙ (θ − c)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta.expand(x.shape[0], -1)


def test_cold_row_starts_from_the_gradient():
    """gradient_start="cold": a row without earlier Ritz vectors starts Lanczos from the batch's gradient, not a
    random vector. On L = ½Σ a_i(θ_i − c_i)² with θ − c along the top eigenvector, g is that eigenvector: the row
    is exact (λ = a_max analytically) in 3 HVPs (the stop rule needs two Ritz values and two moves); from a
    random start it takes many more."""
    n = 200
    a = torch.linspace(0.1, 2.0, n, dtype=torch.float64)
    a[-1] = 2.2  # λ1 = 2.2, gap 10 %
    c = torch.zeros(n, dtype=torch.float64)
    theta = torch.zeros(n, dtype=torch.float64)
    theta[-1] = 0.5  # θ − c ∝ e_n: g = a_n (θ_n − c_n) e_n

    def loss_fn(out, target):
        return 0.5 * ((out.mean(0) - target[0]) ** 2 * a).sum()

    batch = (torch.zeros(4, 1, dtype=torch.float64), c[None].expand(4, -1))
    rows = {}
    for start in ("cold", False):
        model = _ShiftedParameter(theta)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = SharpnessTracker(loss_fn, every=1, gradient_start=start, hvp_route="exact")
        rows[start] = tracker.measure(model, opt, batch, step=0)
    g_row, r_row = rows["cold"], rows[False]
    print(f"\nHVPs from the gradient {g_row['num_hvps']}, from a random vector {r_row['num_hvps']}")
    assert g_row["error"] is None and g_row["sharpness"] == pytest.approx(2.2, rel=1e-12)
    assert g_row["num_hvps"] <= 3 and r_row["num_hvps"] >= 2 * g_row["num_hvps"]
    assert not g_row["warm_start"]  # the gradient is not a warm start from earlier rows
    with pytest.raises(ValueError, match="gradient_start"):
        SharpnessTracker(loss_fn, gradient_start="always")


def test_whitened_gradient_is_p_to_the_minus_half_g():
    model, loss_fn, X, Y = problem(0, task="reg")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, loss_fn, X, Y, opt, 3)
    from curvature.optim import PreconditionedHessianOperator
    op = PreconditionedHessianOperator(model, loss_fn, (X[:64], Y[:64]), opt)
    assert torch.allclose(op.whitened_gradient, op.gradient / op.preconditioner.sqrt(), rtol=1e-6, atol=0)


def test_training_graph_row_before_adams_first_step_has_a_float64_lookahead():
    """The training-graph entry on an Adam run's first row (no Adam state: P ∝ |g|) used to fail the row
    (AttributeError: the graph operator has no engine for the float64 lookahead gradient); now the float64
    gradient comes from the batch passed, and λ(P⁻¹H) matches a float64 solve."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Embedding(13, 8), nn.Tanh(), nn.Linear(8, 13))
    x, y = torch.randint(0, 13, (24,)), torch.randint(0, 13, (24,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = SharpnessTracker(F.cross_entropy, every=1, tol=1e-6)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    row = tracker.step(model, opt, (x, y), step=0)
    for p in model.parameters():
        p.grad = None
    ref = preconditioned_sharpness(model, F.cross_entropy, (x, y), opt, tol=1e-10, dtype=torch.float64)
    assert row["error"] is None and row["source"] == "training_graph"
    assert abs(row["preconditioned_sharpness"] - ref.eigenvalue) / ref.eigenvalue <= 1e-5


class _Diagonal(torch.nn.Module):
    """L(θ) = ½ Σ d_i θ_i² with d the batch's target: the Hessian is diag(d), whatever θ."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


@pytest.mark.parametrize("solver", ["lanczos", "power_iteration", "lobpcg"])
def test_a_warm_start_blind_to_the_new_top_eigenvector_still_finds_it(solver):
    """The top eigenvector moves where the previous row's vectors have no component (eigenvectors rotate at the
    edge of stability): a start made of those vectors alone spans an invariant subspace of diag(d) here, so the
    solve converges — residual 0, bound 0 — to the wrong eigenvalue. A silent wrong number (2.6 % low at step 330
    of the GELU trajectory in benchmarks/results/tracker-routes-cpu-2026-12-07.md). The warm start carries a
    seeded random component, so every direction is in the Krylov space."""
    n = 40
    model = _Diagonal(n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = lambda out, d: 0.5 * (d * out ** 2).sum(dim=1).mean()  # noqa: E731
    d0 = torch.zeros(1, n, dtype=torch.float64)
    d0[0, :2] = torch.tensor([1.0, 0.5])           # row 0: the gradient d∘θ spans e_0, e_1: Ritz vectors e_0, e_1
    d1 = torch.full((1, n), 0.1, dtype=torch.float64)
    d1[0, :2] = torch.tensor([1.0, 0.5])
    d1[0, 25] = 3.0                                # row 1: the new top is e_25, orthogonal to both
    tracker = SharpnessTracker(loss_fn, every=1, solver=solver, hvp_route="exact", eig_tol=1e-6)
    x = torch.zeros(1, 1, dtype=torch.float64)
    first = tracker.step(model, opt, (x, d0), step=0)
    assert first["sharpness"] == pytest.approx(1.0, rel=1e-6)
    second = tracker.step(model, opt, (x, d1), step=1)
    assert second["warm_start"] and second["sharpness"] == pytest.approx(3.0, rel=1e-6), second
