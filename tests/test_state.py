"""No call changes the model, its grads, buffers, mode or the RNG; randomness is frozen per operator."""
import pytest
import torch
from conftest import ZOO, assert_same_state, dropout_mlp, process_switches, snapshot

import curvature as cv


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_reverse"])
@pytest.mark.parametrize("name", ["cnn_bn_train", "cnn_bn_eval", "transformer", "gru", "partly_frozen"])
def test_state_untouched_bitwise(name, method):
    model, loss_fn, data = ZOO[name]()
    # existing grads must survive, and None grads must stay None
    loss_fn(model(data[0]), data[1]).backward()
    first = next(model.parameters())
    first.grad = None
    V = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), 3, dtype=torch.float64)
    before = snapshot(model)
    op = cv.HessianOperator(model, loss_fn, data, method=method)
    op.matmat(V)
    cv.sharpness(model, loss_fn, data, k=2, method=method, max_iters=5)
    cv.check_hvp(model, loss_fn, data, num_directions=2)
    assert_same_state(before, model)


def test_batchnorm_running_stats_and_counter_unchanged_in_train_mode():
    model, loss_fn, data = ZOO["cnn_bn_train"]()
    rm, nbt = model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone()
    cv.sharpness(model, loss_fn, data, max_iters=3)
    assert torch.equal(model.bn.running_mean, rm) and torch.equal(model.bn.num_batches_tracked, nbt)
    assert model.bn.track_running_stats and model.training


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_reverse"])
def test_dropout_is_frozen_so_the_operator_is_one_symmetric_matrix(method):
    model, loss_fn, data = dropout_mlp()
    rng = torch.get_rng_state()
    op = cv.HessianOperator(model, loss_fn, data, method=method, seed=123)
    A = op.to_dense()
    B = op.to_dense()
    assert torch.equal(A, B)
    assert float((A - A.T).norm() / A.norm()) <= 1e-10
    # dropout masks are really there: another seed is another matrix
    C = cv.HessianOperator(model, loss_fn, data, method=method, seed=7).to_dense()
    assert float((A - C).norm() / A.norm()) > 1e-3
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_both_routes_see_the_same_dropout_masks():
    model, loss_fn, data = dropout_mlp()
    A = cv.HessianOperator(model, loss_fn, data, method="reverse_over_reverse", seed=5).to_dense()
    B = cv.HessianOperator(model, loss_fn, data, method="forward_over_reverse", seed=5).to_dense()
    assert float((A - B).norm() / A.norm()) <= 1e-10


def test_default_seed_is_deterministic_given_the_rng_state_and_does_not_advance_it():
    model, loss_fn, data = dropout_mlp()
    torch.manual_seed(42)
    a = cv.HessianOperator(model, loss_fn, data).to_dense()
    torch.manual_seed(42)
    b = cv.HessianOperator(model, loss_fn, data).to_dense()
    assert torch.equal(a, b)
    torch.manual_seed(42)
    state = torch.get_rng_state()
    cv.sharpness(model, loss_fn, data)
    assert torch.equal(torch.get_rng_state(), state)


def test_works_inside_no_grad_and_on_a_model_in_eval_mode():
    model, loss_fn, data = ZOO["mlp_ce"]()
    model.eval()
    with torch.no_grad():
        res = cv.sharpness(model, loss_fn, data)
    assert res.converged and not model.training


def test_sharpness_is_deterministic_for_a_fixed_seed():
    model, loss_fn, data = ZOO["transformer"]()
    a = cv.sharpness(model, loss_fn, data, k=2, tol=1e-6)
    b = cv.sharpness(model, loss_fn, data, k=2, tol=1e-6)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.num_hvps == b.num_hvps


def _switched_state(model):
    """Everything the second-order context switches, by value or by object identity."""
    return {
        **process_switches(),
        "modules": [(type(m), m.training, getattr(m, "track_running_stats", None), getattr(m, "sparse", None))
                    for m in model.modules()],
        "param_ids": [id(p) for p in model.parameters()], "buffer_ids": [id(b) for b in model.buffers()],
    }


class _BNEmb(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3, sparse=True)
        self.bn = torch.nn.BatchNorm1d(6)
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, idx):
        return self.fc(torch.tanh(self.bn(self.emb(idx).flatten(1))))


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_reverse"])
@pytest.mark.parametrize("where", ["autocast", "inference_mode", "no_grad"])
def test_switches_restored_after_success_and_after_an_error(where, method):
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = _BNEmb().double().train()
    data = (torch.randint(0, 5, (8, 2)), torch.randint(0, 2, (8,)))
    calls = {"n": 0}

    def failing(out, y):  # raises on the 4th evaluation: inside an HVP, after the operator was built
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("boom")
        return F.cross_entropy(out, y)

    region = {"autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16), "inference_mode": torch.inference_mode,
              "no_grad": torch.no_grad}[where]
    with region():
        before = _switched_state(model)
        res = cv.sharpness(model, F.cross_entropy, data, k=2, method=method, max_iters=5)
        assert _switched_state(model) == before
        with pytest.raises(ValueError, match="boom"):
            cv.sharpness(model, failing, [data, data], k=2, method=method, max_iters=5)
        assert _switched_state(model) == before
    assert torch.isfinite(res.eigenvalues).all()
