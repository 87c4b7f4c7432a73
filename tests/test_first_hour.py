"""The mistakes of a hurried first hour (#25) get a clear answer at the first measurement.

Each case is one of the mistakes reported in the issue: a misconfigured tracker (the loss's signature, a loss class,
F.cross_entropy on (B, T, V) logits, inputs and targets of different lengths) raises at its first measurement,
naming what was given and the expected ``loss_fn(outputs, targets)``; later failures warn once per kind with a
count; ``tracker.step`` after ``optimizer.step()`` warns with the fix; ``tracker.step(model, opt, x, y)`` says that
``y`` landed in ``step``. The numbers of a correct set-up are checked against a dense float64 Hessian."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvature as cv
from conftest import assert_same_state, dense_hessian_fd, snapshot
from curvature.tracking import ROW_KEYS, SharpnessTracker, TrackingSetupError, TrackingWarning


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    return model, x, y


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))   # (B, T, V) logits


def loss_model_batch(model, batch):  # the common signature the tracker does not use
    x, y = batch
    return F.cross_entropy(model(x), y)


def _setups():
    model, x, y = mlp()
    torch.manual_seed(1)
    lm, ids = TinyLM(), torch.randint(0, 16, (4, 6))
    return {
        "loss(model, batch)": (model, loss_model_batch, (x, y), "parameters are (model, batch)"),
        "cross_entropy on (B, T, V)": (lm, F.cross_entropy, (ids, ids), "logits.flatten(0, -2)"),
        "x and y lengths differ": (model, F.cross_entropy, (x, y[:10]), "inputs hold 16 samples and the targets 10"),
    }


@pytest.mark.parametrize("case", list(_setups()))
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_misconfigured_tracker_raises_at_the_first_measurement(case, optimizer, tmp_path):
    model, loss_fn, batch, hint = _setups()[case]
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    tracker = SharpnessTracker(loss_fn, every=1, sinks=[tmp_path / "rows.csv"])
    before = snapshot(model, opt)
    with pytest.raises(TrackingSetupError) as info:
        tracker.step(model, opt, batch, step=0)
    text = str(info.value)
    assert "loss_fn(outputs, targets)" in text and "batch = tuple of 2" in text and hint in text, text
    assert "setup_errors='warn'" in text  # the opt-out is named
    assert isinstance(info.value, cv.TrackingError) and cv.TrackingSetupError is TrackingSetupError
    assert tracker.history == [] and not (tmp_path / "rows.csv").exists()  # no empty row poisons the file
    assert_same_state(before, model, opt)


def test_setup_errors_warn_once_with_the_same_text_and_every_row_says_why():
    model, loss_fn, batch, _ = _setups()["loss(model, batch)"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(loss_fn, every=1, setup_errors="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [tracker.step(model, opt, batch, step=i) for i in range(5)]
    texts = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(texts) == 1 and "loss_fn(outputs, targets)" in texts[0], texts
    assert all(r["error_kind"] == "setup" and r["sharpness"] is None and r["error"] for r in rows)
    assert tracker.failures == {"setup": 5}


def test_a_loss_class_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"class torch\.nn\.modules\.loss\.CrossEntropyLoss.*CrossEntropyLoss\(\)"):
        SharpnessTracker(nn.CrossEntropyLoss, every=1)
    model, x, y = mlp()
    with pytest.raises(TypeError, match="not a loss"):
        cv.sharpness(model, nn.CrossEntropyLoss, (x, y))


def test_failures_after_a_good_row_warn_once_per_kind_with_a_count():
    model, x, y = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"fail": False}

    def flaky(out, t):  # a transient fault after the first row (think: a lost file handle, a device hiccup)
        if state["fail"]:
            raise RuntimeError("transient fault")
        return F.cross_entropy(out, t)

    tracker = SharpnessTracker(flaky, every=1)
    good = tracker.step(model, opt, (x, y), step=0)
    assert good["error"] is None and good["error_kind"] is None
    H = dense_hessian_fd(model, F.cross_entropy, (x, y))
    assert good["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=2e-3)
    state["fail"] = True
    xbad = x.clone()
    xbad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [tracker.step(model, opt, (x, y), step=i) for i in range(1, 13)]
        state["fail"] = False
        rows += [tracker.step(model, opt, (xbad, y), step=i) for i in range(13, 16)]
    texts = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(texts) == 3, texts  # the first transient fault, its 10th, the first NaN
    assert "transient fault" in texts[0] and "tracker.failures" in texts[0]
    assert texts[1].startswith("curvature: 10 sharpness measurements have failed with error")
    assert "FloatingPointError" in texts[2]
    assert tracker.failures == {"error": 12, "non_finite": 3}
    assert [r["error_kind"] for r in rows] == ["error"] * 12 + ["non_finite"] * 3
    assert all(r["sharpness"] is None and "transient fault" in r["error"] for r in rows[:12])
    assert "error_kind" in ROW_KEYS


def test_out_of_memory_at_the_first_row_is_not_a_setup_error():
    model, x, y = mlp()

    def oom(out, t):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    tracker = SharpnessTracker(oom, every=1)
    with pytest.warns(TrackingWarning, match="out of memory"):
        row = tracker.step(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), step=0)
    assert row["error_kind"] == "out_of_memory"


# -- the order of calls ---------------------------------------------------------------------------------
def _loop(model, opt, x, y, tracker, *, tracker_after_step, steps=3):
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if not tracker_after_step:
            tracker.step(model, opt, (x, y), step=i)
        opt.step()
        if tracker_after_step:
            tracker.step(model, opt, (x, y), step=i)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_tracker_step_after_optimizer_step_warns_with_the_fix(optimizer):
    model, x, y = mlp()
    make = (lambda p: torch.optim.SGD(p, lr=0.1)) if optimizer == "sgd" else (lambda p: torch.optim.AdamW(p, lr=1e-3))
    opt = make(model.parameters())
    tracker = SharpnessTracker(F.cross_entropy, every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(model, opt, x, y, tracker, tracker_after_step=True)
    texts = [str(w.message) for w in caught if "after optimizer.step()" in str(w.message)]
    assert len(texts) == 1 and "before optimizer.step()" in texts[0] and "when='after_step'" in texts[0], texts

    # the right order, and the same run without a tracker: no warning, and training is bit-identical
    model2, _, _ = mlp()
    ref, _, _ = mlp()
    opt2, opt_ref = make(model2.parameters()), make(ref.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loop(model2, opt2, x, y, SharpnessTracker(F.cross_entropy, every=2), tracker_after_step=False)
    for i in range(3):
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt_ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), ref.parameters()))
    # after_step on purpose: no warning either
    model3, _, _ = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loop(model3, make(model3.parameters()), x, y, SharpnessTracker(F.cross_entropy, every=2, when="after_step"),
              tracker_after_step=True)


def test_gradient_accumulation_in_the_right_order_does_not_warn():
    model, x, y = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(F.cross_entropy, every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            opt.zero_grad(set_to_none=False)  # grads zeroed in place, then accumulated over two micro-batches
            for half in (slice(0, 8), slice(8, 16)):
                (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
            tracker.step(model, opt, (x, y), step=i)
            opt.step()
    tracker.close()
    assert not opt._optimizer_step_post_hooks  # close() removes the read-only hook


# -- argument checks ------------------------------------------------------------------------------------
def test_targets_passed_as_a_separate_argument_are_named():
    model, x, y = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(F.cross_entropy, every=1)
    with pytest.raises(TypeError, match=r"step got Tensor \(16,\) int64.*landed in `step`.*\(inputs, targets\)"):
        tracker.step(model, opt, x, y)
    with pytest.raises(TypeError, match=r"batch must be a batch \(inputs, targets\).*got Tensor \(16, 5\) float32"):
        tracker.step(model, opt, x)
    with pytest.raises(TypeError, match=r"optimizer got tuple of 2.*torch.optim.Optimizer"):
        tracker.step(model, (x, y))
    with pytest.raises(TypeError, match="step got str"):
        tracker.step(model, opt, (x, y), step="0")
    with pytest.raises(TypeError, match=r"k got Tensor \(16,\) int64.*landed in `k`"):
        cv.sharpness(model, F.cross_entropy, x, y)
    with pytest.raises(TypeError, match=r"data must be a batch \(inputs, targets\).*got Tensor \(16, 5\) float32"):
        cv.sharpness(model, F.cross_entropy, x)
    with pytest.raises(TypeError, match=r"optimizer got Tensor \(16,\) int64.*landed in `optimizer`"):
        cv.preconditioned_sharpness(model, F.cross_entropy, x, y, opt)
    with pytest.raises(TypeError, match=r"params got Tensor \(16,\) int64.*landed in `params`"):
        cv.HessianOperator(model, F.cross_entropy, x, y)
    with pytest.raises(TypeError, match=r"data must be a batch \(inputs, targets\).*got Tensor \(16, 5\)"):
        cv.hessian_spectral_density(model, F.cross_entropy, x)
    assert tracker.history == []


# -- the same policy in the framework callbacks -----------------------------------------------------------
def test_lightning_callback_raises_on_a_misconfigured_first_measurement():
    pytest.importorskip("lightning.pytorch")
    from curvature.integrations.lightning import SharpnessCallback
    from test_lightning import fit

    with pytest.raises(TrackingSetupError, match=r"parameters are \(model, batch\)"):
        fit("sgd", callbacks=[SharpnessCallback(loss_model_batch, every=2)], max_steps=2)


def test_hf_callback_raises_on_a_misconfigured_first_measurement(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from curvature.integrations.transformers import SharpnessCallback
    from test_transformers_callback import train

    with pytest.raises(TrackingSetupError, match=r"loss_fn\(outputs, targets\).*\n.*parameters are \(model, batch\)"):
        train(tmp_path, callbacks=[SharpnessCallback(loss_model_batch, every=2)], steps=2)


# -- the command line ---------------------------------------------------------------------------------------
SEQ_MODULE = '''
import torch, torch.nn as nn
class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(16, 8), nn.Linear(8, 16)
    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))
def build():
    torch.manual_seed(0)
    return LM()
def data():
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(0))
    return ids, ids
def lm_loss(logits, y):
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())
'''


def test_cli_default_loss_failure_is_printed_once_and_points_to_loss(tmp_path, capsys):
    from curvature.cli import main

    (tmp_path / "seqlm.py").write_text(SEQ_MODULE)
    import importlib.util
    spec = importlib.util.spec_from_file_location("seqlm_for_cli", tmp_path / "seqlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2):
        torch.save({"model": mod.build().state_dict(), "step": step}, folder / f"c{step}.pt")
    spec_args = ["--model", f"{tmp_path / 'seqlm.py'}:build", "--data", f"{tmp_path / 'seqlm.py'}:data"]
    assert main(["analyze", str(folder), *spec_args, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "Expected target size" not in out  # the table marks the rows; the error itself is printed once, below
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].count("Expected target size") == 1, err
    assert "c1.pt" in lines[0] and "c2.pt" in lines[0]
    assert "default --loss cross_entropy" in lines[0] and "--loss" in lines[0] and "(B, T, V)" in lines[0]

    assert main(["check-hvp", *spec_args]) == 2
    err = capsys.readouterr().err
    assert err.count("Expected target size") == 1 and "default --loss cross_entropy" in err, err
    # with the right loss, it works (and an explicit --loss gets no hint)
    assert main(["analyze", str(folder), *spec_args, "--loss", f"{tmp_path / 'seqlm.py'}:lm_loss",
                 "--no-progress", "--tol", "1e-6"]) == 0
    assert "--loss" not in capsys.readouterr().err


# -- plots ------------------------------------------------------------------------------------------------
def test_plot_of_failed_adamw_rows_names_adams_threshold_and_says_it_is_empty(tmp_path):
    pytest.importorskip("matplotlib")
    from curvature.plotting import plot_sharpness, threshold_label

    model, loss_fn, batch, _ = _setups()["loss(model, batch)"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = SharpnessTracker(loss_fn, every=1, setup_errors="warn", sinks=[tmp_path / "rows.csv"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        for i in range(3):
            tracker.step(model, opt, batch, step=i)
    with pytest.warns(UserWarning, match="no finite sharpness values: 3 of 3 measurements failed"):
        fig = plot_sharpness(tmp_path / "rows.csv", tmp_path / "p.png")
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert any("Adam threshold" in lb and "38/η" in lb and "β₁ = 0.9" in lb for lb in labels), labels
    assert not any("SGD" in lb for lb in labels)
    assert any("no finite sharpness values" in t.get_text() for t in fig.axes[0].texts)

    def rows(opt_name, lr, threshold):
        return [{"step": 0, "lr": lr, "threshold": threshold, "optimizer": opt_name, "sharpness": 1.0}]

    assert "2/\\eta" in threshold_label(rows("SGD", 0.1, 20.0))
    assert "(2+2\\mu)/\\eta" in threshold_label(rows("SGD", 0.1, 38.0)) and "μ = 0.9" in threshold_label(
        rows("SGD", 0.1, 38.0))
    assert "β₁ = 0.8" in threshold_label(rows("Adam", 0.01, 1800.0))  # (2+1.6)/(0.2·η) = 18/η
    crit = rows("AdamW", 1e-3, 38000.0)
    crit[0]["critical_sharpness"] = 1500.0
    fig = plot_sharpness(crit)
    assert any("2/\\eta" in ln.get_label() and "lambda_c" in ln.get_label() for ln in fig.axes[0].get_lines())


def test_hf_callback_without_a_probe_batch_raises_at_once_or_warns_once():
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from curvature.integrations.transformers import SharpnessCallback

    class Stream(torch.utils.data.IterableDataset):  # no probe can be built from it without iterating it
        def __iter__(self):
            yield from ({"input_ids": torch.zeros(4, dtype=torch.long)} for _ in range(2))

    model, _, _ = mlp()
    event = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 train_dataloader=torch.utils.data.DataLoader(Stream(), batch_size=2))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    with pytest.raises(TrackingSetupError, match="probe_batch="):
        SharpnessCallback(every=1, log_to_trainer=False).on_pre_optimizer_step(None, state, None, **event)
    cb = SharpnessCallback(every=1, log_to_trainer=False, setup_errors="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            state.global_step = step
            cb.on_pre_optimizer_step(None, state, None, **event)
    assert len([w for w in caught if "no probe batch" in str(w.message)]) == 1 and cb.history == []


def test_failure_kinds_agree_between_ranks():
    # the failing rank raises its own error, the others a RemoteRankError quoting it: both sort it the same way,
    # so every rank raises a set-up error together (or warns together) instead of one rank leaving the others
    # waiting in the next collective
    from curvature.distributed import RemoteRankError
    from curvature.usage import failure_kind

    local = ValueError("Expected input batch_size (8) to match target batch_size (5).")
    remote = RemoteRankError(f"rank 1 failed to build the Hessian operator: ValueError: {local}")
    assert failure_kind(local, first=True) == failure_kind(remote, first=True) == "setup"
    assert (failure_kind(local, first=False), failure_kind(remote, first=False)) == ("error", "remote_rank")
    oom = RemoteRankError("rank 1 failed in an HVP: RuntimeError: CUDA out of memory (simulated)")
    assert failure_kind(oom, first=True) == "out_of_memory"
    assert failure_kind(FloatingPointError("the loss is nan"), first=True) == "non_finite"
    assert failure_kind(TimeoutError("gloo"), first=True) == "error"
