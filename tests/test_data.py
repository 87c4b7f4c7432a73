"""Inputs real pipelines feed (issue #12: 1, 2, 3, 8, 9, 13; #13.5): dict / Mapping batches, many batches vs one,
the model's own loss, sum-reduced losses, token weights, DataLoaders (RNG untouched, streamed), precision of the
loss. Numbers against the dense float64 central-difference Hessian of tests/conftest.py."""
from __future__ import annotations

import random
import warnings
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import DT, dense_hessian_fd, rel_err
import curvature as cv
from curvature.data import CurvatureWarning, as_batches, is_single_batch, token_count


def top_eig(H):
    return float(torch.linalg.eigvalsh(0.5 * (H + H.T))[-1])


# --------------------------------------------------------------------------------------------------
# a model with its own loss (HF style: labels in the batch, output.loss)
# --------------------------------------------------------------------------------------------------
class OwnLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def own_loss_case():
    torch.manual_seed(0)
    model = OwnLoss().to(DT)
    batches = [{"x": torch.randn(n, 4, dtype=DT), "labels": torch.randint(0, 3, (n,))} for n in (5, 9, 6)]
    return model, batches


def concat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def dense_of_dicts(model, batches):
    """The dense FD Hessian of the sample-mean loss over the concatenated dict batches."""
    big = concat(batches)
    return dense_hessian_fd(model, lambda out, y: out["loss"], (big, big["labels"]))


def test_two_dict_batches_are_two_batches():
    """#12.1: [A, B] used to be read as one batch (inputs A, targets B): λ of A alone."""
    model, (A, B, _) = own_loss_case()
    ref = top_eig(dense_of_dicts(model, [A, B]))
    pair = cv.sharpness(model, None, [A, B], tol=1e-10).eigenvalue
    together = cv.sharpness(model, None, concat([A, B]), tol=1e-10).eigenvalue
    alone = cv.sharpness(model, None, A, tol=1e-10).eigenvalue
    assert pair == pytest.approx(ref, rel=1e-8)
    assert together == pytest.approx(ref, rel=1e-8)
    assert abs(alone - ref) / ref > 1e-3  # A alone is another number: the pair must not be read as A


def test_three_dict_batches_list_and_dataloader_of_dicts():
    model, batches = own_loss_case()
    ref = top_eig(dense_of_dicts(model, batches))
    assert cv.sharpness(model, None, batches, tol=1e-10).eigenvalue == pytest.approx(ref, rel=1e-8)
    samples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    loader = DataLoader(samples, batch_size=5)  # default collate: dicts of stacked tensors
    assert cv.sharpness(model, None, loader, tol=1e-10).eigenvalue == pytest.approx(ref, rel=1e-8)


def test_userdict_and_batchencoding_batches():
    """#12.1: (UserDict, y) pairs were read as positional inputs; a BatchEncoding is one dict batch."""
    from transformers import BatchEncoding

    model, batches = own_loss_case()
    ref = top_eig(dense_of_dicts(model, batches[:2]))
    loss = lambda out, y: F.cross_entropy(out["logits"], y)  # noqa: E731
    pairs = [(UserDict({"x": b["x"]}), b["labels"]) for b in batches[:2]]
    assert not is_single_batch(pairs) and len(as_batches(pairs)) == 2
    assert cv.sharpness(model, loss, pairs, tol=1e-10).eigenvalue == pytest.approx(ref, rel=1e-8)
    enc = [BatchEncoding(b) for b in batches[:2]]
    assert is_single_batch(enc[0]) and len(as_batches(enc)) == 2
    assert cv.sharpness(model, None, enc, tol=1e-10).eigenvalue == pytest.approx(ref, rel=1e-8)
    # a dict batch with a loss_fn: the loss gets batch["labels"]
    assert cv.sharpness(model, loss, batches[:2], tol=1e-10).eigenvalue == pytest.approx(ref, rel=1e-8)


def test_batch_rules():
    x, y = torch.randn(3, 2), torch.randint(0, 2, (3,))
    assert is_single_batch((x, y)) and is_single_batch([x, y]) and is_single_batch({"x": x})
    assert is_single_batch(((x, x), y)) and is_single_batch(({"x": x}, None)) and is_single_batch(({"x": x}, y))
    assert not is_single_batch([(x, y), (x, y)]) and not is_single_batch([{"x": x}, {"x": x}])
    assert len(as_batches([((x, x), y)])) == 1  # a list of one batch is always one batch
    with pytest.raises(TypeError, match=r"batch 0 must be a pair \(inputs, targets\) or a Mapping"):
        as_batches([x, x, x])
    with pytest.raises(TypeError, match=r"data must be a batch"):
        as_batches(3)


class DictForward(nn.Module):
    """forward(self, batch) takes the dict itself."""

    def __init__(self):
        super().__init__()
        self.inner = OwnLoss()

    def forward(self, batch):
        return self.inner(batch["x"], batch["labels"])


def test_model_taking_one_dict_argument():
    model, batches = own_loss_case()
    wrapped = DictForward().to(DT)
    wrapped.inner.load_state_dict(model.state_dict())
    ref = top_eig(dense_of_dicts(model, batches))
    with pytest.raises(TypeError):
        cv.sharpness(wrapped, None, batches)  # forward() got an unexpected keyword argument 'x'
    res = cv.sharpness(wrapped, None, batches, tol=1e-10, inputs_as="argument")
    assert res.eigenvalue == pytest.approx(ref, rel=1e-8)


# --------------------------------------------------------------------------------------------------
# #12.2: loss_fn=None everywhere
# --------------------------------------------------------------------------------------------------
def test_loss_fn_none_in_every_entry_point():
    model, batches = own_loss_case()
    H = dense_of_dicts(model, batches)
    op = cv.HessianOperator(model, None, batches)
    assert rel_err(op.to_dense(), H) < 1e-7
    assert cv.hessian_trace(model, None, batches, method="exact").estimate == pytest.approx(float(H.trace()), rel=1e-7)
    assert cv.check_hvp(model, None, batches).passed
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = cv.preconditioned_sharpness(model, None, batches, opt, tol=1e-8)
    assert res.info["preconditioner"] == "next_step"
    cv.gi_adam_init(opt, model, None, batches)
    assert all("exp_avg_sq" in opt.state[p] for p in model.parameters())
    assert cv.tracking.model_output_loss is cv.data.model_output_loss is cv.model_output_loss


# --------------------------------------------------------------------------------------------------
# #12.3: sum-reduced losses
# --------------------------------------------------------------------------------------------------
def test_sum_reduced_loss_modules_are_refused():
    torch.manual_seed(1)
    model = nn.Linear(4, 3).to(DT)
    data = (torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))
    for loss in (nn.CrossEntropyLoss(reduction="sum"), nn.MSELoss(reduction="none")):
        with pytest.raises(ValueError, match=r"reduction='(sum|none)'.*mean loss"):
            cv.sharpness(model, loss, data)
    cv.sharpness(model, nn.CrossEntropyLoss(), data)  # mean: fine


def test_sum_reduced_callable_warns_with_the_factor():
    torch.manual_seed(1)
    model = nn.Linear(4, 3).to(DT)
    data = (torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))
    with pytest.warns(CurvatureWarning, match=r"sum-reduced.*2\.000x"):
        cv.sharpness(model, lambda out, y: F.cross_entropy(out, y, reduction="sum"), data)


def _tiny_lm():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Tanh(), nn.Linear(5, 7)).to(DT)
    x = torch.randint(0, 7, (4, 6))
    y = torch.randint(0, 7, (4, 6))
    y[0, 3:] = -100
    y[2, 1:] = -100
    return model, x, y


def test_no_false_positive_on_mean_losses():
    """Token-mean LM loss with padding, train-mode BatchNorm, dropout: no sum-reduction warning."""
    model, x, y = _tiny_lm()
    token_mean = lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())  # noqa: E731
    torch.manual_seed(3)
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT).train()
    drop = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(DT).train()
    d = (torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        cv.sharpness(model, token_mean, (x, y))
        cv.sharpness(bn, lambda o, t: F.cross_entropy(o, t), d)
        cv.sharpness(drop, lambda o, t: F.cross_entropy(o, t), d)


# --------------------------------------------------------------------------------------------------
# #12.8 and #13.5: DataLoaders keep the RNG, are streamed, and are one fixed matrix
# --------------------------------------------------------------------------------------------------
def _loader_case(**kw):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 4, dtype=DT), torch.randint(0, 3, (40,)))
    return model, DataLoader(ds, batch_size=8, shuffle=True, **kw)


def test_shuffling_dataloader_leaves_the_global_rng_untouched():
    model, loader = _loader_case()
    before = torch.get_rng_state()
    res = cv.sharpness(model, F.cross_entropy, loader, tol=1e-10)
    assert torch.equal(torch.get_rng_state(), before)
    # the operator is that of the batches the loader would yield now
    with torch.random.fork_rng():
        batches = list(loader)
    assert res.eigenvalue == pytest.approx(cv.sharpness(model, F.cross_entropy, batches, tol=1e-10).eigenvalue,
                                           rel=1e-10)
    gen = torch.Generator().manual_seed(5)
    model, loader = _loader_case(generator=gen)
    state = gen.get_state()
    cv.sharpness(model, F.cross_entropy, loader)
    assert torch.equal(gen.get_state(), state) and torch.equal(torch.get_rng_state(), before)


def test_dataloader_is_streamed_and_one_fixed_matrix():
    model, loader = _loader_case()
    op = cv.HessianOperator(model, F.cross_entropy, loader)
    assert op.engine.batches.streaming and len(op.engine.batches) == 5
    with torch.random.fork_rng():
        batches = list(loader)
    H = dense_hessian_fd(model, F.cross_entropy, batches)
    A = op.to_dense()
    assert rel_err(A, H) < 1e-7
    assert torch.equal(op.to_dense(), A)  # every pass the same batches in the same order
    one = cv.HessianOperator(model, F.cross_entropy, DataLoader(batches[0:1], batch_size=None))
    assert not one.engine.batches.streaming and one.engine._graph is not None  # one batch: the cached fast path


class Jittered(Dataset):
    """Random augmentation from its own unseeded generator: a different batch on every pass."""

    def __init__(self):
        self.rng = random.Random()
        self.x = torch.randn(16, 4, dtype=DT)
        self.y = torch.randint(0, 3, (16,))

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return self.x[i] + self.rng.random(), self.y[i]


def test_loader_that_changes_between_passes_is_refused():
    torch.manual_seed(6)
    model = nn.Linear(4, 3).to(DT)
    with pytest.raises(RuntimeError, match=r"different batch 0 .*data=list\(loader\)"):
        cv.sharpness(model, F.cross_entropy, DataLoader(Jittered(), batch_size=4))
    cv.sharpness(model, F.cross_entropy, list(DataLoader(Jittered(), batch_size=4)))  # held in memory: fine


# --------------------------------------------------------------------------------------------------
# #12.9: token-weighted batches (HF causal LM with padded labels) and #12.13: precision of HF's loss
# --------------------------------------------------------------------------------------------------
def _gpt2(float64_loss: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    cfg = GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(DT).eval()
    if float64_loss:  # HF's ForCausalLMLoss casts logits to float32; the same loss kept in float64
        def causal_lm_loss(logits, labels, vocab_size, **kw):
            return F.cross_entropy(logits[..., :-1, :].reshape(-1, vocab_size), labels[..., 1:].reshape(-1))
        model.loss_function = causal_lm_loss
    ids = torch.randint(0, 17, (4, 6))
    labels = ids.clone()
    labels[0, 2:] = -100  # padded: 1 predicted token
    labels[1, 5:] = -100  # 4
    labels[3, 4:] = -100  # 3 (row 2: all 5)
    return model, {"input_ids": ids, "labels": labels}


def test_token_weighted_micro_batches_and_splits_leave_lambda_unchanged():
    model, batch = _gpt2(float64_loss=True)
    whole = cv.sharpness(model, None, batch, tol=1e-12, max_iters=400).eigenvalue
    micro = cv.sharpness(model, None, batch, tol=1e-12, max_iters=400, max_batch_size=1).eigenvalue
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    split = cv.sharpness(model, None, halves, tol=1e-12, max_iters=400).eigenvalue
    print(f"\nGPT-2 padded labels: λ whole {whole:.12g}, micro-batches {micro:.12g}, two batches {split:.12g}")
    assert abs(micro - whole) / whole < 1e-10 and abs(split - whole) / whole < 1e-10
    assert cv.HessianOperator(model, None, batch, max_batch_size=1).num_samples == 1 + 4 + 5 + 3
    # the same with a loss of one's own and weight_fn
    own = lambda out, y: F.cross_entropy(out.logits[..., :-1, :].flatten(0, 1), y[..., 1:].flatten())  # noqa: E731
    w = lambda b: token_count(b["labels"], shift=True)  # noqa: E731
    mine = cv.sharpness(model, own, batch, tol=1e-12, max_iters=400, max_batch_size=1, weight_fn=w).eigenvalue
    assert abs(mine - whole) / whole < 1e-10


def test_float32_loss_under_float64_operator_warns_and_check_hvp_explains():
    model, batch = _gpt2(float64_loss=False)
    with pytest.warns(CurvatureWarning, match=r"loss is computed in torch\.float32.*double\(\)"):
        cv.sharpness(model, None, batch)
    check = cv.check_hvp(model, None, batch)
    assert check.details["loss_dtype"] == torch.float32
    assert check.passed, str(check)
    assert "the loss is computed in torch.float32" in str(check)


def test_ignored_labels_without_weight_fn_warn_when_batches_are_combined():
    model, x, y = _tiny_lm()
    token_mean = lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())  # noqa: E731
    with pytest.warns(CurvatureWarning, match=r"ignored labels \(-100\).*weight_fn"):
        cv.HessianOperator(model, token_mean, (x, y), max_batch_size=2)
    whole = cv.sharpness(model, token_mean, (x, y), tol=1e-12).eigenvalue
    weighted = cv.sharpness(model, token_mean, (x, y), tol=1e-12, max_batch_size=1,
                            weight_fn=lambda b: token_count(b[1])).eigenvalue
    assert weighted == pytest.approx(whole, rel=1e-10)


class OwnSumLoss(OwnLoss):
    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        out["loss"] = out["loss"] * len(labels)  # a model that sums its own loss
        return out


def test_own_loss_of_a_non_hf_model_is_measured():
    torch.manual_seed(0)
    model = OwnSumLoss().to(DT)
    batch = {"x": torch.randn(6, 4, dtype=DT), "labels": torch.randint(0, 3, (6,))}
    with pytest.warns(CurvatureWarning, match=r"sum-reduced.*2\.000x"):
        cv.sharpness(model, None, batch)


def test_tracker_with_the_models_own_loss_weights_tokens():
    model, batch = _gpt2(float64_loss=True)
    whole = cv.sharpness(model, None, batch, tol=1e-12, max_iters=400).eigenvalue
    tracker = cv.SharpnessTracker(None, every=1, tol=1e-12, max_iters=400, max_batch_size=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    row = tracker.step(model, opt, batch)
    assert row["error"] is None and abs(row["sharpness"] - whole) / whole < 1e-10


def test_sum_reduction_check_runs_once_per_mean_loss_and_every_time_for_a_sum_loss():
    """A tracker builds an operator per row: the two extra forward passes of the sum-reduction check are paid
    for the first operator of a mean-reduced callable only; a sum-reduced one is still warned about each time."""
    torch.manual_seed(1)
    model = nn.Linear(4, 3).to(DT)
    data = (torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))
    calls = []

    def mean_loss(out, y):
        calls.append(out.shape[0])
        return F.cross_entropy(out, y)

    cv.HessianOperator(model, mean_loss, data)
    first = len(calls)
    cv.HessianOperator(model, mean_loss, data)
    assert first == 3 and len(calls) - first == 1  # the loss itself, then the check's pair; later: the loss only

    def sum_loss(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    for _ in range(2):
        with pytest.warns(CurvatureWarning, match=r"sum-reduced.*2\.000x"):
            cv.HessianOperator(model, sum_loss, data)
