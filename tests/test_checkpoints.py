"""analyze_checkpoints and safe checkpoint loading, in-process (the CLI end-to-end tests are in test_cli.py)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.checkpoints import (CheckpointError, UnsafeCheckpointError, analyze_checkpoints, find_checkpoints,
                                   fit_state_dict, format_rows, import_object, load_checkpoint, read_rows,
                                   step_from_name)
from curvature.diagnostics import sharpness
from curvature.optim import preconditioned_sharpness, stability_threshold

DT = torch.float64
TOL = 1e-10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g)


def trained(steps: int, opt_cls=torch.optim.SGD, **opt_kw):
    """A model and optimizer after a few full-batch steps (distinct checkpoints, real optimizer state)."""
    model = make_model()
    opt = opt_cls(model.parameters(), **opt_kw)
    X, y = make_data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, opt


def direct(model, **kw):
    return sharpness(model, F.cross_entropy, make_data(), tol=TOL, **kw).eigenvalue


def analyze(path, **kw):
    kw.setdefault("tol", TOL)
    return analyze_checkpoints(path, make_model, make_data(), F.cross_entropy, **kw)


class Evil:
    """Unpickling this runs code (creates a folder): the kind of checkpoint weights_only=True refuses."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target, 0o777, True))  # exist_ok: harmless when run twice


# ---------------------------------------------------------------------------------------------------
def test_formats_values_steps_and_order(tmp_path):
    from safetensors.torch import save_file

    m1, o1 = trained(1, lr=0.1)
    m2, _ = trained(3, lr=0.1)
    m3, _ = trained(5, lr=0.1)
    m4, o4 = trained(7, lr=0.1, momentum=0.9)
    d = tmp_path / "ckpts"
    d.mkdir()
    # names whose natural order differs from the step order, and one step stored only in the file name
    torch.save({"model": m1.state_dict(), "optimizer": o1.state_dict(), "step": 100}, d / "a.pt")
    torch.save(m2.state_dict(), d / "weights_300.pth")                                # plain state_dict
    save_file({k: v.contiguous() for k, v in m3.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"step": "500"})
    torch.save({"state_dict": {f"model.{k}": v for k, v in m4.state_dict().items()},  # Lightning-style
                "optimizer_states": [o4.state_dict()], "global_step": 700, "epoch": 3,
                "pytorch-lightning_version": "2.4.0"}, d / "epoch=3-step=700.ckpt")
    (d / "notes.txt").write_text("not a checkpoint")
    rows = analyze(d)
    assert [r["step"] for r in rows] == [100, 300, 500, 700]
    assert [os.path.basename(r["file"]) for r in rows] == ["a.pt", "weights_300.pth", "model.safetensors",
                                                          "epoch=3-step=700.ckpt"]
    for row, model in zip(rows, (m1, m2, m3, m4)):
        assert row["error"] is None
        assert row["converged"] is True
        assert row["sharpness"] == pytest.approx(direct(model), rel=1e-6)
        assert row["eigenvalues"] == [row["sharpness"]]
    assert rows[0]["lr"] == 0.1 and rows[0]["threshold"] == pytest.approx(20.0)
    assert rows[0]["optimizer"] == "SGD"
    assert rows[0]["edge_ratio"] == pytest.approx(rows[0]["sharpness"] / 20.0)
    assert rows[1]["threshold"] is None and rows[1]["preconditioned_sharpness"] is None
    assert rows[3]["threshold"] == pytest.approx(stability_threshold(o4)) == pytest.approx((2 + 1.8) / 0.1)
    # warm start: every solve after the first starts from the previous checkpoint's eigenvectors
    assert rows[0]["warm_start"] is False and all(r["warm_start"] for r in rows[1:])


def test_adam_preconditioned_sharpness_and_inference(tmp_path):
    model, opt = trained(4, torch.optim.Adam, lr=0.01)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 2},
               tmp_path / "adam.pt")
    mw, ow = trained(4, torch.optim.AdamW, lr=0.02, weight_decay=0.1)
    torch.save({"model": mw.state_dict(), "optimizer": ow.state_dict(), "step": 9}, tmp_path / "adamw.pt")
    rows = analyze(tmp_path)
    by_name = {os.path.basename(r["file"]): r for r in rows}
    for name, m, o in (("adam.pt", model, opt), ("adamw.pt", mw, ow)):
        row = by_name[name]
        assert row["error"] is None
        # the P of the step about to be taken (lookahead contract): preconditioner "next_step"
        want = preconditioned_sharpness(m, F.cross_entropy, make_data(), o, tol=TOL, lookahead=True).eigenvalue
        assert row["preconditioner"] == "next_step"
        assert row["preconditioned_sharpness"] == pytest.approx(want, rel=1e-6)
        assert row["sharpness"] == pytest.approx(direct(m), rel=1e-6)
        assert row["threshold"] == pytest.approx(stability_threshold(o))
        assert row["edge_ratio"] == pytest.approx(row["preconditioned_sharpness"] / row["threshold"])
    assert by_name["adam.pt"]["optimizer"] == "Adam" and by_name["adamw.pt"]["optimizer"] == "AdamW"
    assert by_name["adam.pt"]["step"] == 2  # the epoch when no step is stored
    # an explicit optimizer factory gives the same values
    again = analyze(tmp_path / "adam.pt", optimizer_factory=lambda p: torch.optim.Adam(p, lr=123.0))
    assert again[0]["preconditioned_sharpness"] == pytest.approx(by_name["adam.pt"]["preconditioned_sharpness"],
                                                                 rel=1e-9)
    assert again[0]["lr"] == 0.01  # the saved state's lr wins over the factory's


def test_adam_before_first_step_uses_lookahead(tmp_path):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}, tmp_path / "s0.pt")
    row = analyze(tmp_path)[0]
    assert row["error"] is None and row["lookahead"] is True
    want = preconditioned_sharpness(model, F.cross_entropy, make_data(), opt, tol=TOL, lookahead=True).eigenvalue
    assert row["preconditioned_sharpness"] == pytest.approx(want, rel=1e-6)


def test_resume_and_out_formats(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for s in (1, 2):
        torch.save(trained(s, lr=0.1)[0].state_dict(), d / f"step_{s}.pt")
    for out in (tmp_path / "r.csv", tmp_path / "r.jsonl"):
        first = analyze(d, out=out)
        text = out.read_text()
        assert len(read_rows(out)) == 2
        torch.save(trained(3, lr=0.1)[0].state_dict(), d / "step_3.pt")
        seen = []
        rows = analyze(d, out=out, callback=seen.append)
        assert [os.path.basename(r["file"]) for r in seen] == ["step_3.pt"]  # only the new file was analysed
        assert out.read_text().startswith(text)  # earlier rows untouched, the new one appended
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert rows[0]["sharpness"] == pytest.approx(first[0]["sharpness"], rel=1e-12)
        assert analyze(d, out=out, resume=False)[2]["step"] == 3 and len(read_rows(out)) == 3
        (d / "step_3.pt").unlink()
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])["step"] == 1


def test_bad_file_in_folder_is_reported_and_retried(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    good = trained(1, lr=0.1)[0]
    torch.save(good.state_dict(), d / "step_1.pt")
    blob = (d / "step_1.pt").read_bytes()
    (d / "step_2.pt").write_bytes(blob[: len(blob) // 2])        # truncated
    (d / "step_3.pt").write_bytes(b"")                           # empty
    (d / "step_4.pt").write_bytes(os.urandom(300))               # garbage
    (d / "step_5.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    out = tmp_path / "r.csv"
    rows = analyze(d, out=out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["error"] is None and rows[0]["sharpness"] == pytest.approx(direct(good), rel=1e-6)
    for r in rows[1:]:
        assert r["error"] and r["sharpness"] is None
        assert os.path.basename(r["file"]) in r["error"]
    assert "truncated" in rows[1]["error"] and "empty" in rows[2]["error"]
    assert "truncated" in rows[3]["error"] and "safetensors" in rows[4]["error"]
    # fixing a file and running again redoes only the failed ones
    torch.save(good.state_dict(), d / "step_2.pt")
    seen = []
    rows = analyze(d, out=out, callback=seen.append)
    assert sorted(os.path.basename(r["file"]) for r in seen) == ["step_2.pt", "step_3.pt", "step_4.pt",
                                                                  "step_5.safetensors"]
    assert rows[1]["error"] is None
    assert len(read_rows(out)) == 5
    with pytest.raises(CheckpointError, match="truncated"):
        analyze(d / "step_4.pt", errors="raise")


def test_unsafe_checkpoints_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code-ran"
    model = make_model()
    torch.save({"model": model.state_dict(), "extra": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoints=True") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "--trust-checkpoints" in str(info.value) and "os.makedirs" in str(info.value)
    assert not marker.exists()
    row = analyze(tmp_path / "evil.pt")[0]
    assert "--trust-checkpoints" in row["error"] and not marker.exists()
    row = analyze(tmp_path / "evil.pt", trust_checkpoints=True)[0]
    assert marker.exists() and row["error"] is None
    assert row["sharpness"] == pytest.approx(direct(model), rel=1e-6)


def test_state_dict_that_does_not_fit_names_keys(tmp_path):
    sd = make_model().state_dict()
    sd["2.extra"] = torch.zeros(1, dtype=DT)
    del sd["0.bias"]
    torch.save(sd, tmp_path / "x.pt")
    row = analyze(tmp_path / "x.pt")[0]
    assert "missing keys: 0.bias" in row["error"] and "unexpected keys: 2.extra" in row["error"]
    wrong = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with pytest.raises(CheckpointError, match=r"0.weight \(8, 5\) vs model \(4, 5\)"):
        fit_state_dict(wrong, make_model().state_dict())


def test_prefixes_are_stripped():
    model = make_model()
    sd = model.state_dict()
    for prefix in ("model.", "module.", "model._orig_mod.", "net.module."):
        fitted = fit_state_dict(model, {prefix + k: v for k, v in sd.items()})
        assert set(fitted) == set(sd)
    # extra entries of a LightningModule (a loss module's buffer, another sub-network) are dropped
    noisy = {**{"model." + k: v for k, v in sd.items()}, "criterion.weight": torch.ones(3)}
    assert set(fit_state_dict(model, noisy)) == set(sd)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        analyze(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint files .* in directory"):
        analyze(tmp_path / "empty")
    torch.save(make_model().state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="cannot import module 'no_such_pkg"):
        analyze_checkpoints(tmp_path / "m.pt", "no_such_pkg.models:build", make_data(), "cross_entropy")
    with pytest.raises(CheckpointError, match="has no attribute 'nope'"):
        analyze_checkpoints(tmp_path / "m.pt", "torch.nn:nope", make_data(), "cross_entropy")
    with pytest.raises(CheckpointError, match="expected 'package.module:function'"):
        import_object("justaname", "--model")
    with pytest.raises(CheckpointError, match="returned a int"):
        analyze_checkpoints(tmp_path / "m.pt", lambda: 3, make_data(), "cross_entropy")
    with pytest.raises(CheckpointError, match="--loss 'hinge'"):
        analyze_checkpoints(tmp_path / "m.pt", make_model, make_data(), "hinge")


def test_helpers():
    assert step_from_name("epoch=3-step=700.ckpt") == 700
    assert step_from_name("ckpt_000300.pt") == 300
    assert step_from_name("runs/checkpoint-1500/model.safetensors") == 1500
    assert step_from_name("last.ckpt") is None
    text = format_rows([{"step": 1, "lr": 0.1, "loss": 0.5, "sharpness": 10.0, "threshold": 20.0,
                         "converged": True}, {"step": 2, "error": "x.pt: bad"}])
    assert "0.500" in text and "error: x.pt: bad" in text


def test_find_checkpoints_lists(tmp_path):
    for name in ("b_10.pt", "b_9.pt"):
        torch.save(make_model().state_dict(), tmp_path / name)
    files = find_checkpoints([tmp_path / "b_10.pt", tmp_path])
    assert sorted(f.name for f in files) == ["b_10.pt", "b_9.pt"]  # deduplicated
    rows = analyze(tmp_path, tol=1e-6)
    assert [r["step"] for r in rows] == [9, 10]


def test_not_converged_is_flagged_not_an_error(tmp_path):
    torch.save(make_model().state_dict(), tmp_path / "m.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = analyze(tmp_path, tol=1e-14, max_iters=2, solver="power_iteration")[0]
    assert row["error"] is None and row["converged"] is False
    assert any("did not converge" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------
# Hugging Face Trainer output (issue #14.5): a real Trainer run, then its output_dir analysed
# ---------------------------------------------------------------------------------------------------
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(config).to(torch.float64)


def _stdlib_bytes_batches(n: int, seq: int = 16) -> list[dict]:
    text = open(os.__file__, "rb").read()[: n * seq]
    ids = torch.tensor(list(text), dtype=torch.long).reshape(n, seq)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def test_hf_trainer_output_dir_analyses_with_adam_state_lr_step_and_threshold(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from curvature.optim import preconditioned_sharpness
    from curvature.tracking import model_output_loss

    train = _stdlib_bytes_batches(16)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=1, use_cpu=True,
                             lr_scheduler_type="constant_with_warmup",
                             report_to=[], logging_steps=100, disable_tqdm=True, seed=0, weight_decay=0.01)
    Trainer(model=_tiny_gpt2(), args=args, train_dataset=train).train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2",
                                                                                       "checkpoint-4"]
    probe = {k: torch.stack([b[k] for b in train[:4]]) for k in ("input_ids", "labels")}
    rows = analyze_checkpoints(out, _tiny_gpt2, probe, None, tol=1e-8, max_iters=200)  # no --recursive needed
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["error"] is None, row["error"]
        folder = Path(row["file"]).parent
        assert Path(row["file"]).name == "model.safetensors"
        # the same state by hand: HF's own loading (ties lm_head), the optimizer in the Trainer's group order
        model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64)
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        decay = [p for n, p in model.named_parameters() if "bias" not in n and ".ln_" not in n and "ln_f" not in n]
        rest = [p for n, p in model.named_parameters() if not ("bias" not in n and ".ln_" not in n and "ln_f" not in n)]
        opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
        opt.load_state_dict(saved)
        assert row["lr"] == pytest.approx(saved["param_groups"][0]["lr"]) and row["lr"] > 0
        assert row["threshold"] == pytest.approx(stability_threshold(opt))
        batch = (probe, None)
        want_h = sharpness(model, model_output_loss, batch, tol=1e-8, max_iters=200).eigenvalue
        want_p = preconditioned_sharpness(model, model_output_loss, batch, opt, tol=1e-8, max_iters=200,
                                          lookahead=True).eigenvalue
        assert row["sharpness"] == pytest.approx(want_h, rel=1e-6)
        assert row["preconditioned_sharpness"] == pytest.approx(want_p, rel=1e-6)
        assert row["preconditioner"] == "next_step" and row["optimizer"] == "AdamW"


def test_folder_of_subfolders_suggests_recursive(tmp_path):
    (tmp_path / "run1").mkdir()
    torch.save(make_model().state_dict(), tmp_path / "run1" / "a.pt")
    with pytest.raises(CheckpointError, match=r"sub-folders \(run1\): pass --recursive"):
        find_checkpoints(tmp_path)
    assert len(find_checkpoints(tmp_path, recursive=True)) == 1


def test_a_folder_named_like_a_checkpoint_gets_an_error_row(tmp_path):
    """#26.2: a directory ``x.pt`` in the folder is a row with a clear error, not silently skipped (every
    checkpoint-looking entry gets exactly one row); the real checkpoint beside it is analysed."""
    d = tmp_path / "run"
    d.mkdir()
    torch.save(trained(1, lr=0.1)[0].state_dict(), d / "step_1.pt")
    (d / "step_2.pt").mkdir()
    (d / "step_2.pt" / "data.pkl").write_bytes(b"not a checkpoint")
    assert [p.name for p in find_checkpoints(d)] == ["step_1.pt", "step_2.pt"]
    rows = analyze(d)
    assert [os.path.basename(r["file"]) for r in rows] == ["step_1.pt", "step_2.pt"]
    assert rows[0]["error"] is None and rows[0]["sharpness"] > 0
    assert rows[1]["step"] == 2 and rows[1]["sharpness"] is None
    assert "is a directory, not a checkpoint file" in rows[1]["error"], rows[1]["error"]
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(d / "step_2.pt")


def test_bad_solver_options_refused_before_any_checkpoint_is_read(tmp_path):
    """#26.5: max_iters=0 (or tol=-1) is one ValueError up front, not an error row per checkpoint."""
    torch.save(trained(1, lr=0.1)[0].state_dict(), tmp_path / "step_1.pt")
    seen = []
    with pytest.raises(ValueError, match="max_iters must be an integer >= 1, got 0"):
        analyze(tmp_path, max_iters=0, callback=seen.append)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        analyze(tmp_path, tol=-1.0, callback=seen.append)
    assert seen == []


def test_offline_analysis_on_the_one_sided_route_reports_checked_values(tmp_path):
    """analyze_checkpoints(..., method="finite_difference", fd_order=1): the rows carry the central check's values
    (within their bound of the exact route's, which is checked against dense references elsewhere), the route and
    the gradient passes, for λ(H) and Adam's λ(P⁻¹H)."""
    model, opt = trained(3, torch.optim.Adam, lr=1e-2)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}, tmp_path / "step3.pt")
    exact = analyze(tmp_path / "step3.pt")[0]
    row = analyze(tmp_path / "step3.pt", tol=None, eig_tol=1e-4, method="finite_difference", fd_order=1,
                  out=tmp_path / "one_sided.csv")[0]
    assert row["hvp_route"] == "one_sided" and row["num_gradients"] > row["num_hvps"] / 2
    assert abs(row["sharpness"] - exact["sharpness"]) / exact["sharpness"] <= row["error_bound"]
    assert (abs(row["preconditioned_sharpness"] - exact["preconditioned_sharpness"])
            / exact["preconditioned_sharpness"] <= row["preconditioned_error_bound"])
