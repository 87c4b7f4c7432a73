"""Hugging Face integration: a real transformers.Trainer on a tiny GPT-2 (built from a config, no download) trained
on the bytes of the `os` module's source; rows match direct calls, land in log_history and in files, and training
is bit-identical with and without the callback."""
from __future__ import annotations

import copy
import inspect
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from curvature.diagnostics import sharpness  # noqa: E402
from curvature.integrations.transformers import SharpnessCallback  # noqa: E402
from curvature.tracking import model_output_loss, read_rows  # noqa: E402

SEQ = 16


class ByteChunks(torch.utils.data.Dataset):
    def __init__(self, n=48):
        data = torch.tensor(list(inspect.getsource(os).encode()[: n * SEQ]), dtype=torch.long)
        self.chunks = data.view(n, SEQ)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def make_model():
    transformers.set_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=256, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def train(tmp_path, callbacks=(), attach=None, steps=4, warmup=0):
    model = make_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=warmup, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ByteChunks(), callbacks=list(callbacks))
    if attach is not None:
        attach.attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, trainer


def test_trainer_rows_logs_and_bit_identical(tmp_path):
    snaps = {}

    def snapshot_sink(row):  # runs inside the callback, before optimizer.step: the parameters measured
        snaps[row["step"]] = copy.deepcopy(model_ref[0].state_dict())

    model_ref = []

    class Remember(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            model_ref.append(model)

    cb = SharpnessCallback(every=2, tol=1e-4, sinks=[snapshot_sink, tmp_path / "rows.jsonl"])
    model, trainer = train(tmp_path, [Remember()], attach=cb)
    rows = cb.history
    assert [r["step"] for r in rows] == [0, 2]
    assert all(r["error"] is None and r["converged"] for r in rows), rows
    assert rows[0]["lookahead"] is True and rows[1]["lookahead"] is True  # P of the step about to be taken
    assert rows[0]["preconditioner"] == rows[1]["preconditioner"] == "next_step"
    assert rows[0]["optimizer"] == "AdamW" and rows[1]["preconditioned_sharpness"] > rows[1]["sharpness"]
    assert rows[1]["warm_start"] and rows[1]["num_hvps"] < rows[0]["num_hvps"]

    # a row agrees with a direct sharpness() call at the same parameters, on the same probe batch
    probe = cb.probe_batch
    assert probe["input_ids"].shape == (4, SEQ)
    for row in rows:
        ref_model = make_model()
        ref_model.load_state_dict(snaps[row["step"]])
        ref_model.train()
        ref = sharpness(ref_model, model_output_loss, (dict(probe), None), tol=1e-4)
        assert row["sharpness"] == pytest.approx(ref.eigenvalue, rel=1e-3)
        assert row["loss"] == pytest.approx(ref.info["loss"], rel=1e-5)

    # the Trainer's own log and the file sink
    logged = [h for h in trainer.state.log_history if "curvature/sharpness" in h]
    assert [h["step"] for h in logged] == [0, 2]
    assert [h["curvature/sharpness"] for h in logged] == pytest.approx([r["sharpness"] for r in rows])
    assert [r["sharpness"] for r in read_rows(tmp_path / "rows.jsonl")] == pytest.approx([r["sharpness"] for r in rows])

    # the same run without the callback: bit-identical parameters
    plain, _ = train(tmp_path)
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_user_loss_fn_and_log_history_without_trainer(tmp_path):
    def lm_loss(outputs, labels):
        logits = outputs.logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    cb = SharpnessCallback(lm_loss, every=2, tol=1e-3, when="after_step")
    _, trainer = train(tmp_path, [cb], steps=3, warmup=2)  # lr 0 → 1e-3 → (measured at 2) → decay
    assert [r["step"] for r in cb.history] == [2]
    row = cb.history[0]
    assert row["error"] is None and row["sharpness"] > 0 and row["preconditioned_sharpness"] > 0
    assert any(h.get("curvature/sharpness") == pytest.approx(row["sharpness"]) for h in trainer.state.log_history)


# --- report_to integrations without attach(), the hook floor, resume, rank zero (issue 14.3/14.4, 15.10/15.15) ---
def _args(tmp_path, steps, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_plain_callbacks_reach_tensorboard_on_the_global_step_axis(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = SharpnessCallback(every=2, tol=1e-3)
    args = _args(tmp_path, 5, report_to=["tensorboard"], logging_steps=1)  # events under output_dir/runs
    trainer = transformers.Trainer(model=make_model(), args=args, train_dataset=ByteChunks(), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [r["step"] for r in cb.history] == [0, 2, 4]
    events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "tfevents" in f]
    assert events, "no TensorBoard event file"
    scalars: dict[str, list] = {}
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    tag = next(t for t in scalars if t.endswith("curvature/sharpness"))
    assert [e.step for e in scalars[tag]] == [0, 2, 4]  # the rows' steps = state.global_step
    assert [e.value for e in scalars[tag]] == pytest.approx([r["sharpness"] for r in cb.history], rel=1e-6)
    loss_tag = next(t for t in scalars if t.endswith("train/loss") or t == "loss")
    assert sorted({e.step for e in scalars[loss_tag]}) == [1, 2, 3, 4, 5]  # the Trainer's own axis: same numbers


def test_without_a_trainer_on_the_stack_it_fails_loudly_with_the_fix(tmp_path):
    cb = SharpnessCallback(every=1)
    with pytest.raises(RuntimeError, match=r"cb\.attach\(trainer\)"):
        cb.on_train_begin(_args(tmp_path, 1), transformers.TrainerState(), transformers.TrainerControl())


def test_missing_pre_optimizer_hook_raises_instead_of_recording_nothing():
    from curvature.integrations.transformers import check_hook_support

    class OldCallback:  # the TrainerCallback of transformers < 4.45: no on_pre_optimizer_step event
        def on_step_end(self, *a, **k):
            pass

    with pytest.raises(RuntimeError, match="4.45"):
        check_hook_support(OldCallback, "before_step")
    check_hook_support(OldCallback, "after_step")  # after_step uses on_step_end: fine
    check_hook_support(transformers.TrainerCallback, "before_step")


@pytest.mark.parametrize("restore_flag,vectors_in_file", [(False, False), (True, False), (False, True)])
def test_resume_continues_history_and_warm_starts(tmp_path, monkeypatch, restore_flag, vectors_in_file):
    if vectors_in_file:  # large models: the warm-start vectors go to a file in the checkpoint folder
        import curvature.integrations.transformers as hf

        monkeypatch.setattr(hf, "_INLINE_LIMIT", 0)
    def run(cb, steps, resume=None):
        args = _args(tmp_path, steps, save_strategy="steps", save_steps=2,
                     restore_callback_states_from_checkpoint=restore_flag)
        trainer = transformers.Trainer(model=make_model(), args=args, train_dataset=ByteChunks(), callbacks=[cb])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = SharpnessCallback(every=2, tol=1e-4, sinks=[tmp_path / "rows.csv"])
    run(first, 4)  # checkpoint-2 holds the row of step 0; checkpoint-4 those of steps 0 and 2
    full = [r["step"] for r in first.history]
    assert full == [0, 2]
    again = SharpnessCallback(every=2, tol=1e-4)
    trainer = run(again, 6, resume=str(tmp_path / "out" / "checkpoint-4"))
    assert any(cb is again for cb in trainer.callback_handler.callbacks)  # the user's callback, not a copy
    assert [r["step"] for r in again.history] == [0, 2, 4]  # history continues
    assert again.history[1]["sharpness"] == pytest.approx(first.history[1]["sharpness"])
    assert again.history[2]["warm_start"] is True  # first row after the resume starts from the saved vectors
    assert (tmp_path / "out" / "checkpoint-4" / "curvature_warm_start.pt").exists() == vectors_in_file
    cold = SharpnessCallback(every=2, tol=1e-4, warm_start=False)
    run(cold, 6, resume=str(tmp_path / "out" / "checkpoint-4"))
    assert again.history[2]["num_hvps"] < cold.history[-1]["num_hvps"]


def test_only_the_main_process_writes_files(tmp_path):
    cb = SharpnessCallback(every=1, sinks=[tmp_path / "rows.csv"])
    trainer = transformers.Trainer(model=make_model(), args=_args(tmp_path, 1), train_dataset=ByteChunks())
    cb.attach(trainer)
    state = transformers.TrainerState(is_world_process_zero=False, is_local_process_zero=False)
    cb.on_train_begin(trainer.args, state, transformers.TrainerControl(), model=trainer.model)
    assert cb.tracker.sinks == []  # rank != 0: rows are measured (same values on every rank) but not written
