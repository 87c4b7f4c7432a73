"""Fault injection: an exception or a KeyboardInterrupt at any point of a curvature call leaves the process and
the model as they were (#15.1, #15.2).

* deterministic: the k-th write into a module's ``_parameters`` / ``_buffers`` (the tensor swap of every forward
  pass) raises, for every k over several forward passes — including writes of the swap back;
* asynchronous: a real signal (SIGALRM from ``setitimer``, handled by Python's SIGINT handler, i.e. what Ctrl-C
  does) interrupts the main thread after a random delay during ``sharpness`` / ``preconditioned_sharpness``;
  then the model must hold the very Parameter objects the optimizer holds, with their ``.grad``, the same buffer
  objects and values, and no transform level (functorch or the legacy vmap of
  ``autograd.grad(is_grads_batched=True)``) may be left active.

The CI test runs a few hundred interrupts; ``python tests/test_interrupts.py 2000`` runs the full count.
"""
from __future__ import annotations

import random
import signal
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvature as cv
from conftest import legacy_vmap_level, process_switches


class Net(nn.Module):
    """What the second-order context switches for: train-mode BatchNorm, dropout, LayerNorm, SDPA (F.hardsigmoid and
    torch.utils.checkpoint are switched for every model)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.gate = nn.Sigmoid()
        self.ln = nn.LayerNorm(8)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x)))
        h = self.ln(h * self.gate(h))
        a = F.scaled_dot_product_attention(h[:, None, None], h[:, None, None], h[:, None, None]).reshape(h.shape)
        return self.fc2(self.drop(a + h))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Net().double().train()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()  # non-trivial .grad that must survive
    return model, opt, x, y


def _process_state():
    return {**process_switches(), "rng": torch.get_rng_state()}


def _model_state(model, opt):
    return {
        "param_ids": [id(p) for p in model.parameters()],
        "opt_ids": [id(p) for g in opt.param_groups for p in g["params"]],
        "slots": [(type(m.__dict__["_parameters"]), [id(v) for v in m._parameters.values()],
                   [id(v) for v in m._buffers.values()]) for m in model.modules()],
        "grads": [(id(p.grad), None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "values": [p.detach().clone() for p in model.parameters()],
        "buffers": [(id(b), b.clone()) for b in model.buffers()],
        "flags": [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()],
    }


def _problems(before_proc, before_model, model, opt) -> list[str]:
    out = []
    after_proc, after_model = _process_state(), _model_state(model, opt)
    for key, val in before_proc.items():
        same = torch.equal(val, after_proc[key]) if isinstance(val, torch.Tensor) else val == after_proc[key]
        if not same:
            out.append(f"process {key}")
    for key, val in before_model.items():
        a = after_model[key]
        if key in ("grads", "buffers"):
            same = [i for i, _ in val] == [i for i, _ in a] and all(
                (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
                for (_, u), (_, v) in zip(val, a))
        elif key == "values":
            same = all(torch.equal(u, v) for u, v in zip(val, a))
        else:
            same = val == a
        if not same:
            out.append(f"model {key}")
    if after_model["param_ids"] != after_model["opt_ids"]:
        out.append("model parameters are not the optimizer's")
    return out


def _repair(model, opt):
    """Put a corrupted model back (so one failure does not cascade over the remaining trials)."""
    for m in model.modules():
        if type(m.__dict__["_parameters"]) is not dict:
            m.__dict__["_parameters"] = dict(m._parameters)
            m.__dict__["_buffers"] = dict(m._buffers)
    while legacy_vmap_level() > 0:
        torch._C._vmapmode_decrement_nesting()
    torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(0)


CALLS = {  # LOBPCG where the block paths (batched double backward, vmap over jvp) must be interrupted too
    "sharpness_1batch": lambda m, o, x, y: cv.sharpness(m, F.cross_entropy, (x, y), k=2, tol=1e-3, max_iters=6,
                                                        solver="lobpcg"),
    "sharpness_2batches_fwd": lambda m, o, x, y: cv.sharpness(
        m, F.cross_entropy, [(x[:12], y[:12]), (x[12:], y[12:])], k=2, tol=1e-3, max_iters=4,
        method="forward_over_reverse", solver="lobpcg"),
    "sharpness_2batches": lambda m, o, x, y: cv.sharpness(
        m, F.cross_entropy, [(x[:12], y[:12]), (x[12:], y[12:])], k=3, tol=1e-3, max_iters=4),
    "preconditioned": lambda m, o, x, y: cv.preconditioned_sharpness(m, F.cross_entropy, (x, y), o, k=2, tol=1e-3,
                                                                      max_iters=6),
    # the tracker in a training loop: λ(H) and λ(P⁻¹H) (Adam), warm-start state, a row (#26: its figures)
    "tracker_step": lambda m, o, x, y: cv.SharpnessTracker(F.cross_entropy, every=1, k=1, tol=1e-3, max_iters=4,
                                                           keep_history=False).step(m, o, (x, y), step=0),
}


# --- deterministic: the k-th tensor swap raises -------------------------------------------------------------
class _RaiseOnKthWrite(dict):
    counter = [0]
    k = -1

    def __setitem__(self, key, value):
        _RaiseOnKthWrite.counter[0] += 1
        if _RaiseOnKthWrite.counter[0] == _RaiseOnKthWrite.k:
            raise KeyboardInterrupt(f"injected at write {self.k}")
        super().__setitem__(key, value)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_kth_tensor_swap_raises(call):
    model, opt, x, y = _setup()
    proc, state = _process_state(), _model_state(model, opt)
    modules = list(model.modules())
    injected = 0
    for k in range(1, 100, 4):
        for m in modules:
            m.__dict__["_parameters"] = _RaiseOnKthWrite(m._parameters)
            m.__dict__["_buffers"] = _RaiseOnKthWrite(m._buffers)
        _RaiseOnKthWrite.counter[0], _RaiseOnKthWrite.k = 0, k
        try:
            CALLS[call](model, opt, x, y)
        except KeyboardInterrupt:
            injected += 1
        finally:
            _RaiseOnKthWrite.k = -1
            for m in modules:
                m.__dict__["_parameters"] = dict(m._parameters)
                m.__dict__["_buffers"] = dict(m._buffers)
        problems = _problems(proc, {**state, "slots": _model_state(model, opt)["slots"]}, model, opt)
        assert not problems, f"write {k} raised: {problems}"
    assert injected >= 8


# --- asynchronous interrupts at random times -------------------------------------------------------------------
def run_random_interrupts(trials: int, seed: int = 0) -> dict:
    """Interrupt ``trials`` calls at random times; returns counts of interrupts that landed and of corruptions.

    The interrupt is a real asynchronous signal: ``setitimer`` delivers SIGALRM to the process after a random
    delay and its handler is Python's own SIGINT handler (``signal.default_int_handler``), so a
    ``KeyboardInterrupt`` is raised wherever the main thread is, exactly as for Ctrl-C. (A helper thread calling
    ``_thread.interrupt_main()`` does the same, but its Timer's locks can themselves be interrupted and deadlock
    the harness after a few hundred trials.)"""
    rng = random.Random(seed)
    model, opt, x, y = _setup()
    names = sorted(CALLS)
    durations = {}
    for name in names:  # warm up, then time each call (the fastest of 3, so that most interrupts land inside)
        CALLS[name](model, opt, x, y)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            CALLS[name](model, opt, x, y)
            times.append(time.perf_counter() - t0)
        durations[name] = min(times)
    landed = corrupted = 0
    examples: list[str] = []
    proc, state = _process_state(), _model_state(model, opt)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        for trial in range(trials):
            name = names[trial % len(names)]
            try:
                signal.setitimer(signal.ITIMER_REAL, max(1e-6, rng.uniform(0.0, durations[name])))
                CALLS[name](model, opt, x, y)
                signal.setitimer(signal.ITIMER_REAL, 0)
                for _ in range(1000):  # a signal delivered just before the cancel lands here, inside the try
                    pass
            except KeyboardInterrupt:
                landed += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            problems = _problems(proc, state, model, opt)
            if problems:
                corrupted += 1
                if len(examples) < 5:
                    examples.append(f"{name}: {problems}")
                _repair(model, opt)
                model, opt, x, y = _setup()
                proc, state = _process_state(), _model_state(model, opt)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    nn.Linear(3, 3)  # no vmap level left active: creating a layer draws random numbers
    return {"trials": trials, "landed": landed, "corrupted": corrupted, "examples": examples}


def test_random_interrupts_never_corrupt_the_model():
    res = run_random_interrupts(160, seed=1)  # ~10 s on one core
    assert res["corrupted"] == 0, res
    assert res["landed"] >= 30, res  # many interrupts really landed inside a call (~40-70 %, load-dependent)


if __name__ == "__main__":
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    t0 = time.perf_counter()
    print(run_random_interrupts(n, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0),
          f"{time.perf_counter() - t0:.1f} s")


# --- #15.2: an interrupt that lands just before a transform level is popped --------------------------------------
def _raise_once_then(real, *, after: bool = False):
    """``real`` wrapped to raise one KeyboardInterrupt: before calling it, or (``after``) once it has run."""
    state = {"armed": True}

    def fake(*args, **kwargs):
        out = real(*args, **kwargs) if after else None
        if state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt("injected after the call" if after else "injected just before the level is popped")
        return out if after else real(*args, **kwargs)
    return fake, state


def test_interrupt_before_the_legacy_vmap_level_is_popped(monkeypatch):
    # autograd.grad(is_grads_batched=True) runs torch._vmap_internals._vmap: increment, work, finally decrement.
    # An interrupt landing in that finally used to leave the level active for the rest of the process.
    import torch._vmap_internals as vi
    model, opt, x, y = _setup()
    real_unwrap, real_dec = vi._unwrap_batched, torch._C._vmapmode_decrement_nesting
    fake_dec, state = _raise_once_then(real_dec)
    state["armed"] = False

    def unwrap(*args, **kwargs):  # arm the fault once the batched backward has run
        state["armed"] = True
        return real_unwrap(*args, **kwargs)

    monkeypatch.setattr(vi, "_unwrap_batched", unwrap)
    monkeypatch.setattr(torch._C, "_vmapmode_decrement_nesting", fake_dec)
    with pytest.raises(KeyboardInterrupt):
        cv.sharpness(model, F.cross_entropy, (x, y), k=2, tol=1e-3, max_iters=3, solver="lobpcg")  # block HVPs
    monkeypatch.undo()
    assert legacy_vmap_level() == 0
    nn.Linear(3, 3)  # "vmap: We do not yet support calling random operations inside of vmap" before the fix


def test_interrupt_before_the_functorch_vmap_level_is_popped(monkeypatch):
    import torch._functorch.vmap as fv
    model, opt, x, y = _setup()
    fake_dec, _ = _raise_once_then(fv._vmap_decrement_nesting)
    monkeypatch.setattr(fv, "_vmap_decrement_nesting", fake_dec)
    with pytest.raises(KeyboardInterrupt):
        cv.sharpness(model, F.cross_entropy, [(x[:12], y[:12]), (x[12:], y[12:])], k=2, tol=1e-3, max_iters=3,
                     method="forward_over_reverse", solver="lobpcg")  # block HVPs: vmap over forward-over-reverse
    monkeypatch.undo()
    assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0
    nn.Linear(3, 3)
    assert torch.is_grad_enabled()


# --- an interrupt between the C++ and the Python half of torch.func.jvp's bookkeeping ---------------------------
def _forward_over_reverse_works(model, x, y):
    ref = cv.sharpness(model, F.cross_entropy, (x, y), tol=1e-10).eigenvalue
    got = cv.sharpness(model, F.cross_entropy, (x, y), tol=1e-10, method="forward_over_reverse")
    assert got.info["method"] == "forward_over_reverse" and got.eigenvalue == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("where", ["jvp_nesting", "dual_level"])
def test_interrupt_inside_jvp_bookkeeping_leaves_later_jvps_working(monkeypatch, where):
    """``torch.func.jvp`` keeps a Python counter (``JVP_NESTING``) and a Python copy of the forward-AD level next to
    the C++ state; an interrupt between the two (seen once in CI's random-interrupt test: every later jvp then
    failed with "no level exists" / "requires_grad_() inside of a function being transformed") left them apart for
    the rest of the process. The guard now puts both back."""
    import torch._functorch.eager_transforms as et
    import torch._functorch.predispatch as pd
    model, opt, x, y = _setup()
    if where == "jvp_nesting":
        monkeypatch.setattr(et, "_jvp_decrement_nesting", _raise_once_then(et._jvp_decrement_nesting, after=True)[0])
    else:
        monkeypatch.setattr(pd, "_exit_dual_level", _raise_once_then(pd._exit_dual_level, after=True)[0])
    with pytest.raises(KeyboardInterrupt):
        cv.sharpness(model, F.cross_entropy, (x, y), tol=1e-3, max_iters=3, method="forward_over_reverse")
    monkeypatch.undo()
    assert et.JVP_NESTING == 0 and torch.autograd.forward_ad._current_level == -1
    _forward_over_reverse_works(model, x, y)


def test_restore_with_an_undo_that_always_fails_does_not_hang_and_restores_the_rest():
    """restore() retries a pass that an interrupt broke; an action that fails every time used to make that loop
    spin forever (seen as a hang of the random-interrupt harness when a leaked forward-AD level made the level
    repair raise each pass). Now: three passes, then every action on its own, then the first error is raised."""
    from curvature._exact import StateGuard
    box = {"a": 1, "b": 2}
    guard = StateGuard()
    guard.set_item(box, "a", 10)

    def broken():
        raise RuntimeError("this undo always fails")

    guard.push(broken)
    guard.set_item(box, "b", 20)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="always fails"):
        guard.restore()
    assert box == {"a": 1, "b": 2} and time.perf_counter() - t0 < 5
