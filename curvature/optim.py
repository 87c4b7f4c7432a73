"""Optimizer-aware curvature: pre-conditioned sharpness (Adam and other diagonal pre-conditioners), stability
thresholds, GI-Adam.

**Pre-conditioned sharpness (Adam).** PyTorch's Adam/AdamW step is θ ← θ − η·m̂/(√v̂ + ε) with m̂ = m/(1−β₁ᵗ),
v̂ = v/(1−β₂ᵗ). Written as θ ← θ − η·P⁻¹m with the diagonal pre-conditioner

    P = (1−β₁ᵗ)·diag(√v̂ + ε),

it is heavy-ball momentum (m ← β₁m + (1−β₁)g) on the pre-conditioned problem, so on a quadratic with P frozen
it is stable while λ_max(P⁻¹H) < (2+2β₁)/((1−β₁)η) (= 38/η for β₁ = 0.9). :class:`PreconditionedHessianOperator`
applies the symmetric P^{-1/2} H P^{-1/2} (same eigenvalues as P⁻¹H, so symmetric solvers work);
:func:`preconditioned_sharpness` returns its top eigenpairs (Kalra & Barkeshli, *Why Warmup the Learning
Rate?*, NeurIPS 2024, arXiv 2406.09405).

P is read per parameter from the optimizer's own state: t = ``state["step"]`` (tensor or number),
v = ``state["exp_avg_sq"]`` (``state["max_exp_avg_sq"]`` with ``amsgrad``), and each parameter group's
``betas``/``eps``/``lr``. Parameter groups with different learning rates are folded into one matrix: the block
of group g is divided by η_g/η₀ (η₀ = the first group's lr), so the one threshold (2+2β₁)/((1−β₁)η₀) applies to
every block. With different β₁ per group, the threshold uses the first group's β₁ (the fold covers only lr).

By default (``lookahead=True``, the convention of Kalra & Barkeshli) P is that of the step about to be taken,
built from the current batch gradient g (computed in float64): v ← β₂v + (1−β₂)g² (then the running max with
``amsgrad``), t ← t+1; before the first step (no state) this is v = (1−β₂)g², t = 1. For Adam with L2
``weight_decay`` (not AdamW) g includes the decay term wd·θ, as in the optimizer's own update of v.
``lookahead=False`` reads the P of the last step taken (v, t as stored). ``info["preconditioner"]`` says which
(``"next_step"`` / ``"last_step"``). The Hessian H is always that of the loss alone (no decay term).

**Other diagonal pre-conditioners.** The same operator serves every optimizer whose step is
Δ = −η·P⁻¹·(numerator) with a diagonal P, η the group's lr; scalar factors of η (bias corrections, Adagrad's lr
decay, Adafactor's relative step) go into P, as Adam's (1−β₁ᵗ) does. With g' = g (+ wd·θ for L2 decay) and t' =
step + 1, torch 2.13's rules give (lookahead; the last-step P uses the state as stored):

* RMSprop: P = √(αv + (1−α)g'²) + ε; centered: √(αv + (1−α)g'² − ḡ'²) + ε with ḡ' = αḡ + (1−α)g'; with momentum
  μ the buffer is buf ← μ·buf + P⁻¹g', θ ← θ − η·buf (same P). Numerator g'.
* Adagrad: P = (1 + (t'−1)·lr_decay)·(√(sum + g'²) + ε). Numerator g'.
* Adamax: P = (1−β₁^{t'})·max(β₂u, |g'| + ε). Numerator m' (the EMA).
* NAdam: Δ = −η·D⁻¹(a·g' + b·m'), D = √(v'/(1−β₂^{t'})) + ε, a = (1−μ_t)/(1−Π_t), b = μ_{t+1}/(1−Π_{t+1}) (μ_t the
  momentum cache, Π_t its running product); P = D·(1−β₁)/(a(1+β₁) + b(1−β₁)), the factor that makes Adam's threshold
  the one for λ(P⁻¹H) (for Adam, a = 0 and b = 1/(1−β₁ᵗ) give P = (1−β₁ᵗ)·D).
* RAdam: rectified (ρ_t > 5): P = (1−β₁^{t'})·(√v' + ε)/(r_t·√(1−β₂^{t'})) (ε outside the bias correction, as torch
  adds it); not rectified (ρ_t ≤ 5, the first steps): the step is un-preconditioned momentum SGD, P = (1−β₁^{t'})·I
  (``info["unrectified"]`` lists those parameters). Numerator m'.
* Adafactor: P = (η·c/α)·√max(V̂, ε₁²), V̂ the factored (row·col / mean row) or full second moment, α =
  max(ε₂, RMS(θ))·min(η, 1/√t'), c = max(1, RMS(g/√V̂)/d) the update clipping of this gradient. Lookahead only.
* Adadelta: P = √(v' + ε)/√(u + ε), u = ``acc_delta`` before the step. Lookahead only.
* SGD has P = I (use λ_max(H)); Muon's orthogonalised update is not diagonal: :func:`preconditioned_sharpness`
  raises a ``TypeError`` that says so and points to λ_c (critical sharpness).

**Stability thresholds** (:func:`stability_threshold`, derived on a quadratic with curvature λ, for PyTorch's
update rules, P frozen; η = the first group's current lr, i.e. whatever a scheduler set):

* SGD: λ < 2/η.
* SGD with momentum μ and dampening d (buf ← μ·buf + (1−d)·g, θ ← θ − η·buf): the iteration
  z² − (1+μ−a)z + μ = 0 with a = (1−d)ηλ is stable iff 0 < a < 2+2μ, so λ < (2+2μ)/((1−d)η)
  (= (2+2μ)/η for PyTorch's default d = 0; 2/η at the very start, since the buffer starts empty).
* Nesterov (PyTorch form: buf ← μ·buf + (1−d)·g, θ ← θ − η·(g + μ·buf)): with x = ηλ the characteristic
  polynomial is z² − (1+μ−x(1+μ−μd))z + μ(1−x) = 0; the Jury conditions give λ < (2+2μ)/((1+2μ−μd)η), i.e.
  (2+2μ)/((1+2μ)η) for d = 0 (PyTorch requires d = 0 with Nesterov): ≈ 1.357/η for μ = 0.9.
* Adam/AdamW: λ^{P⁻¹H} < (2+2β₁)/((1−β₁)η), β₁ of the first group. The same for Adamax and RAdam (the same
  heavy ball m ← β₁m + (1−β₁)g on P⁻¹H; RAdam's un-rectified steps too, with P = (1−β₁ᵗ)·I).
* NAdam: with x = ηλ(D⁻¹H) the iteration (θ, m) has z² − (1 + β₁ − x(a + b(1−β₁)))z + β₁(1 − a·x) = 0; the Jury
  conditions give x < 2(1+β₁)/(a(1+β₁) + b(1−β₁)) (the |det| < 1 condition is weaker), i.e. λ(P⁻¹H) <
  (2+2β₁)/((1−β₁)η) with NAdam's P above.
* RMSprop: λ^{P⁻¹H} < 2/η; with momentum μ (heavy ball on P⁻¹H, buffer from 0): (2+2μ)/η once the buffer exists,
  2/η before the first step.
* Adagrad, Adafactor, Adadelta, Muon: ``None`` (:func:`stability_note` says why: Adagrad's accumulator only grows,
  so P is never quasi-static; Adafactor's step is relative to ‖θ‖ and clipped; Adadelta's P divides by its own past
  updates; Muon has no diagonal P). The stability figure there is λ_c·η (critical sharpness).

With (L2) ``weight_decay`` wd in SGD the optimizer sees H + wd·I: the threshold applies to λ^H + wd, where λ^H
is the loss Hessian's sharpness that :func:`~curvature.sharpness` reports (without the decay term).

**GI-Adam** (Kalra & Barkeshli): initialise v₀ = g₀² from the first batch's gradient, m₀ = 0, t = 0, and keep
Adam's bias corrections; the stock Adam/AdamW code then runs unchanged. It equals Adam with an automatic
warm-up factor √(1−β₂ᵗ) and cuts λ^{P⁻¹H} of the first step by about √(1−β₂) (≈ 0.03 for β₂ = 0.999).
:func:`gi_adam_init` does this on any Adam/AdamW from a given batch; :class:`GIAdam` is a drop-in Adam that
does it lazily, at its first step, from the gradient in ``.grad``.

Nothing here changes the model, its ``.grad``, its buffers or the RNG state; the diagnostics never change the
optimizer's state (only :func:`gi_adam_init` and :class:`GIAdam` write it, by design).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .data import CurvatureWarning, as_batches, resolve_loss_fn
from .diagnostics import check_solver_options, solve_checked, split_operator_options
from ._exact import StateGuard, call_with_state, frozen_rng, unwrap_model
from .distributed import assert_ranks_agree, collective_device, resolve_process_group, sum_or_fail
from .operators import HessianOperator, LinearOperator
from .sharded import clip_factor
from ._validate import check_positive_float
from .solvers import EigenResult
from .usage import check_batch_argument, check_not_a_batch_half

__all__ = ["PreconditionedHessianOperator", "preconditioned_sharpness", "stability_threshold", "edge_ratio",
           "is_adam_like", "gi_adam_init", "GIAdam", "has_diagonal_preconditioner", "require_diagonal_preconditioner",
           "lookahead_required", "stability_note"]

_SUPPORTED = "torch.optim.SGD (with or without momentum / Nesterov), torch.optim.Adam, torch.optim.AdamW"
_ADAM_SUPPORTED = "torch.optim.Adam and torch.optim.AdamW (and their subclasses, e.g. curvature.GIAdam)"
_DIAGONAL_SUPPORTED = ("torch.optim.Adam, AdamW (and subclasses, e.g. curvature.GIAdam), RMSprop, Adagrad, Adamax, "
                       "NAdam, RAdam, Adafactor and Adadelta")
#: What the stability figure is for an optimizer without a derived threshold (issue #21: critical sharpness).
_USE_CRITICAL = "use λ_c·η (critical_sharpness / the tracker's critical_every) as its stability figure"


# ---------------------------------------------------------------------------------------------------
# Reading optimizers
# ---------------------------------------------------------------------------------------------------
def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside framework wrappers: Lightning's ``LightningOptimizer`` (``._optimizer``) and
    accelerate's ``AcceleratedOptimizer`` (``.optimizer``; it subclasses ``torch.optim.Optimizer`` itself, so
    the wrapper is looked through even when it is an Optimizer)."""
    for _ in range(4):
        inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def is_adam_like(optimizer: Any) -> bool:
    """True for ``torch.optim.Adam`` / ``AdamW`` (any implementation: for-loop, foreach, fused) and subclasses."""
    return isinstance(unwrap_optimizer(optimizer), (torch.optim.Adam, torch.optim.AdamW))


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _group_lr(group: dict, index: int = 0) -> float:
    lr = _scalar(group["lr"])
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"the learning rate of parameter group {index} is {lr}: stability thresholds and the "
                         "pre-conditioned operator need lr > 0")
    return lr


def _fold_reference_lr(opt: torch.optim.Optimizer) -> float:
    """η₀, the first group's lr, that the other groups' P are folded against (P_g · η₀/η_g).

    η₀ = 0 (the first step of a warm-up from 0) is accepted when every group has lr 0: the fold is then 1 and P
    is the optimizer's own (the threshold is undefined there, but λ_max(P⁻¹H) is not). Otherwise every lr must
    be > 0."""
    lrs = [_scalar(g["lr"]) for g in opt.param_groups]
    if all(lr == 0.0 for lr in lrs):
        return 0.0
    return _group_lr(opt.param_groups[0], 0)


def _has_momentum_buffers(opt: torch.optim.Optimizer, group: dict) -> bool:
    """True once SGD has stored a momentum buffer for some parameter of ``group`` (after its first step)."""
    return any(opt.state.get(p, {}).get("momentum_buffer") is not None for p in group["params"])


def _kind(opt: Any) -> str | None:
    """Which diagonal pre-conditioner ``opt`` has: ``"adam"`` (Adam, AdamW and subclasses), ``"rmsprop"``,
    ``"adagrad"``, ``"adamax"``, ``"nadam"``, ``"radam"``, ``"adafactor"``, ``"adadelta"``; ``None`` for the rest
    (SGD: P = I; Muon: not diagonal; Rprop, LBFGS, ASGD, SparseAdam, custom optimizers)."""
    kinds = [("adam", "Adam"), ("adam", "AdamW"), ("rmsprop", "RMSprop"), ("adagrad", "Adagrad"),
             ("adamax", "Adamax"), ("nadam", "NAdam"), ("radam", "RAdam"), ("adafactor", "Adafactor"),
             ("adadelta", "Adadelta")]
    for kind, name in kinds:
        cls = getattr(torch.optim, name, None)
        if cls is not None and isinstance(opt, cls):
            return kind
    return None


def has_diagonal_preconditioner(optimizer: Any) -> bool:
    """True when :func:`preconditioned_sharpness` can build the optimizer's diagonal P: Adam, AdamW (and
    subclasses), RMSprop, Adagrad, Adamax, NAdam, RAdam, Adafactor, Adadelta (framework wrappers looked through)."""
    return _kind(unwrap_optimizer(optimizer)) is not None


def lookahead_required(optimizer: Any) -> bool:
    """True when only the P of the step about to be taken can be built (``lookahead=True``): before the optimizer's
    first step (no parameter with ``step > 0``), and always for Adafactor (its P holds the update-clipping factor
    of the step's own gradient) and Adadelta (its P divides by ``acc_delta`` as it was *before* the last step)."""
    opt = unwrap_optimizer(optimizer)
    if _kind(opt) in ("adafactor", "adadelta"):
        return True
    return not any(_scalar(opt.state.get(p, {}).get("step", 0)) > 0 for g in opt.param_groups for p in g["params"])


def _no_diagonal_reason(opt: Any) -> str:
    """Why ``opt`` has no diagonal P, and what to use instead (one sentence for errors and row notes)."""
    name = type(opt).__name__
    if isinstance(opt, torch.optim.SGD):
        return (f"{name} has no pre-conditioner (P = I, λ(P⁻¹H) = λ_max(H)): use sharpness() (λ_max(H)) with "
                "stability_threshold()")
    muon = getattr(torch.optim, "Muon", None)
    if muon is not None and isinstance(opt, muon):
        return (f"{name} has no diagonal pre-conditioner (it orthogonalises the momentum matrix by Newton–Schulz, "
                f"a step that is not P⁻¹ times a gradient): {_USE_CRITICAL}")
    return f"{name} has no diagonal pre-conditioner this library can read: {_USE_CRITICAL}"


def stability_note(optimizer: Any) -> str | None:
    """Why :func:`stability_threshold` is ``None`` for ``optimizer`` and what to use instead; ``None`` when it has
    a threshold. Written into the tracker's ``stability_note`` column."""
    opt = unwrap_optimizer(optimizer)
    name = type(opt).__name__
    kind = _kind(opt)
    if isinstance(opt, torch.optim.SGD) or kind in ("adam", "adamax", "nadam", "radam", "rmsprop"):
        return None
    if kind == "adagrad":
        return (f"no stability threshold derived for {name}: its accumulator only grows, so P is never quasi-static "
                f"and the frozen-P argument behind 2/η does not describe its dynamics; {_USE_CRITICAL}")
    if kind == "adafactor":
        return (f"no stability threshold derived for {name}: its step is relative to the parameter norm and clipped "
                f"by the update's RMS (not linear in the gradient); {_USE_CRITICAL}")
    if kind == "adadelta":
        return (f"no stability threshold derived for {name}: its P divides by the running average of its own past "
                f"updates (acc_delta); {_USE_CRITICAL}")
    return f"no stability threshold derived for {name}; " + _no_diagonal_reason(opt)


def _beta1(group: dict) -> float:
    beta1 = _scalar(group["betas"][0])
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1 must be in [0, 1) for a stability threshold, got {beta1}")
    return beta1


def stability_threshold(optimizer: Any) -> float | None:
    """The largest curvature the optimizer's step is stable on (quadratic model, P frozen), for its first group's
    lr; ``None`` where no threshold is derived (:func:`stability_note` says why).

    * SGD: 2/η; with momentum μ (PyTorch form buf ← μ·buf + (1−d)·g): (2+2μ)/((1−d)η), = (2+2μ)/η for the
      default dampening d = 0; with Nesterov: (2+2μ)/((1+2μ−μd)η) (= (2+2μ)/((1+2μ)η)). Before the first step
      (no ``momentum_buffer`` in the state yet) the step is plain GD, 2/η (Nesterov: 2/((1+μ)η)). Compare
      with λ_max(H) (plus the weight decay, if any: the optimizer sees H + wd·I).
    * Adam/AdamW, Adamax, NAdam, RAdam: (2+2β₁)/((1−β₁)η). Compare with λ_max(P⁻¹H)
      (:func:`preconditioned_sharpness`; NAdam's P carries the factor that makes this one threshold apply).
    * RMSprop: 2/η; with momentum μ: (2+2μ)/η once the momentum buffer exists (2/η before the first step, the
      buffer starts at 0). Compare with λ_max(P⁻¹H).
    * Adagrad, Adafactor, Adadelta, Muon, and other optimizers: ``None``.

    η is ``optimizer.param_groups[0]["lr"]`` as it is now (after any scheduler), β₁/μ/d from that group.
    Derivations in the module docstring and docs/optimizers.md.
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"stability_threshold() takes a torch.optim.Optimizer ({_SUPPORTED}, or one with a "
                        f"diagonal pre-conditioner: {_DIAGONAL_SUPPORTED}); got {type(opt).__name__}")
    kind = _kind(opt)
    if not isinstance(opt, torch.optim.SGD) and kind not in ("adam", "adamax", "nadam", "radam", "rmsprop"):
        return None
    group = opt.param_groups[0]
    lr = _group_lr(group)
    if kind in ("adam", "adamax", "nadam", "radam"):
        beta1 = _beta1(group)
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    mu = _scalar(group.get("momentum", 0.0))
    if mu == 0:
        return 2.0 / lr
    if kind == "rmsprop":  # buf ← μ·buf + g/P, θ ← θ − η·buf: heavy ball on P⁻¹H; the buffer starts at 0
        return (2 + 2 * mu) / lr if _has_momentum_buffers(opt, group) else 2.0 / lr
    d = _scalar(group.get("dampening", 0.0))
    if d >= 1:
        raise ValueError(f"SGD with dampening={d} >= 1 never feeds gradients into its momentum buffer after the "
                         "first step: it has no stability threshold")
    if not _has_momentum_buffers(opt, group):
        # the first step: PyTorch sets buf = g (no dampening), so the step is θ ← θ − η·g (plain GD), or with
        # Nesterov θ ← θ − η·(1+μ)·g
        return 2.0 / ((1 + mu) * lr) if group.get("nesterov", False) else 2.0 / lr
    if group.get("nesterov", False):
        return (2 + 2 * mu) / ((1 + 2 * mu - mu * d) * lr)
    return (2 + 2 * mu) / ((1 - d) * lr)


def edge_ratio(optimizer: Any, eigenvalue: Any) -> float:
    """``eigenvalue / stability_threshold(optimizer)``: 1.0 is the edge of stability.

    Pass λ_max(H) for SGD and λ_max(P⁻¹H) for Adam/AdamW and the other diagonal pre-conditioners (a float, a 0-d
    tensor, or an :class:`EigenResult`, whose top eigenvalue is used). For plain SGD this is η·λ/2. An optimizer
    without a derived threshold (Adagrad, ...) is a ``ValueError`` that says why (:func:`stability_note`).

    A NaN eigenvalue (a failed measurement) or a negative one (no positive curvature: the ratio to a threshold
    on positive curvature has no meaning, and λ_max < 0 usually means the most negative eigenvalue was passed)
    gives NaN with a ``RuntimeWarning``, never a number that looks like a distance to the edge.
    """
    if isinstance(eigenvalue, EigenResult):
        eigenvalue = eigenvalue.eigenvalue
    elif isinstance(eigenvalue, torch.Tensor):
        if eigenvalue.numel() != 1:
            raise ValueError(f"edge_ratio() takes one eigenvalue, got a tensor of shape {tuple(eigenvalue.shape)} "
                             "(pass eigenvalues[0] for the top one)")
        eigenvalue = eigenvalue.item()
    elif not isinstance(eigenvalue, (int, float)):
        raise TypeError(f"edge_ratio() takes an eigenvalue as a float, a tensor or an EigenResult, "
                        f"got {type(eigenvalue).__name__}")
    value = float(eigenvalue)
    threshold = stability_threshold(optimizer)
    if threshold is None:
        raise ValueError(f"edge_ratio() needs a stability threshold: {stability_note(optimizer)}")
    if math.isnan(value) or value < 0:
        what = "NaN (a failed measurement)" if math.isnan(value) else \
            f"{value:.6g} < 0 (no positive curvature; pass the largest eigenvalue, not the most negative)"
        warnings.warn(f"edge_ratio: the eigenvalue is {what}; the edge ratio is undefined, returning NaN",
                      RuntimeWarning, stacklevel=2)
        return math.nan
    return value / threshold


def _require_adam(optimizer: Any, what: str) -> torch.optim.Optimizer:
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"{what} supports {_ADAM_SUPPORTED}; got {type(opt).__name__}")
    return opt


def require_diagonal_preconditioner(optimizer: Any, what: str = "preconditioned_sharpness()"
                                    ) -> torch.optim.Optimizer:
    """The (unwrapped) optimizer when it has a diagonal P (:func:`has_diagonal_preconditioner`), else a
    ``TypeError`` naming it, saying why (SGD: P = I; Muon: not diagonal) and what to use instead."""
    opt = unwrap_optimizer(optimizer)
    if _kind(opt) is None:
        raise TypeError(f"{what} supports {_DIAGONAL_SUPPORTED}; got {type(opt).__name__}: "
                        + _no_diagonal_reason(opt))
    return opt


def _owners(opt: torch.optim.Optimizer) -> dict[int, int]:
    return {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}


def _is_decoupled(opt: torch.optim.Optimizer, group: dict) -> bool:
    if _kind(opt) == "adafactor":  # θ ← (1 − η·wd)·θ, the gradient is never touched
        return True
    return bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))


def _nadam_mu(beta1: float, psi: float, t: float) -> float:
    """NAdam's momentum cache μ_t = β₁(1 − ½·0.96^{tψ}) (ψ = ``momentum_decay``), as torch computes it."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (t * psi)))


def _diagonal_P(kind: str, group: dict, state: dict, p: torch.Tensor, g: torch.Tensor | None,
                read: Any) -> tuple[torch.Tensor, str | None]:
    """One parameter's P (float64, before the lr fold) such that the step is Δ = −η·P⁻¹·(numerator), η the group's
    lr: the P of the step about to be taken when ``g`` (this data's gradient, L2 decay included) is given, else
    that of the last step taken (the state as stored). ``read(key, default)`` gives a float64 copy of a state
    tensor (``default``: the value torch initialises it to). Returns (P, a note on this parameter or None).
    The formulas follow torch 2.13's update rules (docs/optimizers.md derives each)."""
    t_prev = _scalar(state.get("step", 0.0))
    t = t_prev + 1 if g is not None else t_prev
    zeros = torch.zeros(p.shape, dtype=torch.float64, device=g.device if g is not None else None)
    eps = group.get("eps")
    if kind == "adam":
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        v = read("exp_avg_sq", zeros)
        if g is not None:
            v = beta2 * v + (1 - beta2) * g * g
            if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
                v = torch.maximum(read("max_exp_avg_sq", zeros), v)
        elif group.get("amsgrad", False) and "max_exp_avg_sq" in state:
            v = read("max_exp_avg_sq", zeros)
        return (1 - beta1 ** t) * (v.sqrt() / math.sqrt(1 - beta2 ** t) + eps), None
    if kind == "rmsprop":
        alpha = _scalar(group["alpha"])
        v = read("square_avg", zeros)
        ga = read("grad_avg", zeros) if group.get("centered", False) else None
        if g is not None:
            v = alpha * v + (1 - alpha) * g * g
            ga = None if ga is None else alpha * ga + (1 - alpha) * g
        var = v if ga is None else (v - ga * ga).clamp_min(0.0)  # ≥ 0 up to rounding (Cauchy–Schwarz)
        return var.sqrt() + eps, None
    if kind == "adagrad":  # Δ = −η/(1 + (t−1)·lr_decay) · g/(√sum + ε): the lr decay is a factor of P
        s = read("sum", torch.full_like(zeros, _scalar(group.get("initial_accumulator_value", 0.0))))
        if g is not None:
            s = s + g * g
        return (1 + (t - 1) * _scalar(group.get("lr_decay", 0.0))) * (s.sqrt() + eps), None
    if kind == "adamax":  # u ← max(β₂u, |g| + ε), Δ = −η/(1−β₁ᵗ) · m/u
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        u = read("exp_inf", zeros)
        if g is not None:
            u = torch.maximum(beta2 * u, g.abs() + eps)
        return (1 - beta1 ** t) * u, None
    if kind == "nadam":
        # Δ = −η·D⁻¹·(a·g + b·m'), D = √(v'/(1−β₂ᵗ)) + ε, a = (1−μ_t)/(1−Π_t), b = μ_{t+1}/(1−Π_{t+1}): on a frozen-P
        # quadratic this is stable iff ηλ(D⁻¹H) < 2(1+β₁)/(a(1+β₁) + b(1−β₁)); P = D·(1−β₁)/(a(1+β₁) + b(1−β₁))
        # makes Adam's threshold (2+2β₁)/((1−β₁)η) the one for λ(P⁻¹H) (for Adam itself a = 0, b = 1/(1−β₁ᵗ)
        # gives Adam's P = (1−β₁ᵗ)·D)
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        psi = _scalar(group.get("momentum_decay", 4e-3))
        v = read("exp_avg_sq", zeros)
        mu_t, mu_next = _nadam_mu(beta1, psi, t), _nadam_mu(beta1, psi, t + 1)
        prod = _scalar(state.get("mu_product", 1.0))
        if g is not None:
            v = beta2 * v + (1 - beta2) * g * g
            prod = prod * mu_t
        a, b = (1 - mu_t) / (1 - prod), mu_next / (1 - prod * mu_next)
        D = (v / (1 - beta2 ** t)).sqrt() + eps
        return D * ((1 - beta1) / (a * (1 + beta1) + b * (1 - beta1))), None
    if kind == "radam":
        # rectified (ρ_t > 5): Δ = −η·r_t·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε); otherwise Δ = −η·m/(1−β₁ᵗ): P = (1−β₁ᵗ)·I
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        v = read("exp_avg_sq", zeros)
        if g is not None:
            v = beta2 * v + (1 - beta2) * g * g
        bc2 = 1 - beta2 ** t
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * (beta2 ** t) / bc2
        if rho_t > 5.0:
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            return (1 - beta1 ** t) * (v.sqrt() + eps) / (rect * math.sqrt(bc2)), None
        return torch.full_like(v, 1 - beta1 ** t), "unrectified"
    if kind == "adafactor":
        # Δ = −(α/c)·g/√max(V̂, ε₁²), α = max(ε₂, RMS(θ))·min(η, 1/√t), c = max(1, RMS(update)/d) (update clipping):
        # P = (η·c/α)·√max(V̂, ε₁²)
        assert g is not None  # only the lookahead P (see lookahead_required)
        lr = _scalar(group["lr"])
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else _scalar(eps1)
        w = t ** _scalar(group["beta2_decay"])
        g2 = g * g
        if g.dim() > 1:
            row = read("row_var", None)
            col = read("col_var", None)
            row_mean, col_mean = g2.mean(dim=-1, keepdim=True), g2.mean(dim=-2, keepdim=True)
            row = row_mean * w if row is None else row + w * (row_mean - row)
            col = col_mean * w if col is None else col + w * (col_mean - col)
            var = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            var = read("variance", zeros)
            var = var + w * (g2 - var)
        denom_sqrt = var.clamp(min=eps1 * eps1).sqrt()
        theta = p.detach().to(device=g.device, dtype=torch.float64)
        alpha = max(_scalar(eps2), float(theta.norm()) / math.sqrt(p.numel())) * min(lr, 1 / math.sqrt(t))
        update = g / denom_sqrt
        clip = max(1.0, float(update.norm()) / (math.sqrt(update.numel()) * _scalar(group["d"])))
        return (lr * clip / alpha) * denom_sqrt, None
    if kind == "adadelta":  # Δ = −η·√(u+ε)/√(v'+ε)·g, u = acc_delta before this step
        assert g is not None
        rho = _scalar(group["rho"])
        v = rho * read("square_avg", zeros) + (1 - rho) * g * g
        return (v + eps).sqrt() / (read("acc_delta", zeros) + eps).sqrt(), None
    raise AssertionError(kind)  # pragma: no cover - _require_diagonal admits only the kinds above


# ---------------------------------------------------------------------------------------------------
# The pre-conditioned operator
# ---------------------------------------------------------------------------------------------------
class PreconditionedHessianOperator(LinearOperator):
    """P^{-1/2} H P^{-1/2} for an optimizer's diagonal pre-conditioner P (same eigenvalues as P⁻¹H): Adam/AdamW as
    below; RMSprop, Adagrad, Adamax, NAdam, RAdam, Adafactor and Adadelta with the P of the module docstring.

    H is a :class:`~curvature.operators.HessianOperator` built with the same ``params`` and options
    (``method``, ``dtype``, ``device``, ``seed``, ``max_batch_size``, ``distributed``, ...), available as
    ``.inner``. P is read from the optimizer's state, per parameter and per group:

        P = (1−β₁ᵗ)·diag(√v̂ + ε)·(η₀/η_g),   v̂ = v/(1−β₂ᵗ),

    t = ``state["step"]``, v = ``state["exp_avg_sq"]`` (``"max_exp_avg_sq"`` with amsgrad), η_g the lr of the
    parameter's group and η₀ that of the first group: the lr fold makes one threshold
    (2+2β₁)/((1−β₁)η₀) (:func:`stability_threshold`, first group's β₁) apply to every group.

    Args:
        model, loss_fn, data, params: as for :class:`HessianOperator`; frozen parameters are not in it.
        optimizer: a ``torch.optim.Adam`` / ``AdamW`` (or another optimizer with a diagonal P:
            :func:`has_diagonal_preconditioner`) that owns every parameter of the operator (for-loop, foreach or
            fused implementation; ``step`` stored as a tensor or a number). SGD and Muon: a ``TypeError`` that
            says what to use instead.
        lookahead: ``True`` (default): the P of the step about to be taken (v ← β₂v + (1−β₂)g², t ← t+1, then the
            running max with amsgrad; g = this data's gradient, computed in float64, plus wd·θ for Adam's L2
            weight decay); works before the first step (v = (1−β₂)g², t = 1). ``False``: the P of the last step
            taken (v, t as stored); a parameter with ``step = 0`` is then an error.
        lookahead_dtype: dtype of the gradient the lookahead P is built from. ``"auto"`` (default): float64
            while a parameter has no Adam state yet (then v = (1−β₂)g² and P ∝ |g|: float32 rounding of small
            entries gave 5e-3 error in λ(P⁻¹H) on the 438k GPT), the operator's own gradient once every parameter
            has taken a step (there v's history dominates: float32 and float64 agreed to ≤ 6e-6 at steps 1–300);
            a dtype: always that (one extra gradient pass on a copy of the parameters when it is wider than the
            operator's); ``None``: always the operator's own gradient (no extra pass).
            ``info["lookahead_gradient"]`` says which dtype was used.
        max_grad_norm: with ``lookahead``, the gradient P is built from is clipped to this norm first, as
            ``torch.nn.utils.clip_grad_norm_`` (and the Hugging Face Trainer's ``max_grad_norm``) clips the gradient
            the optimizer sees: g ← g·min(1, max_grad_norm/(‖g‖ + 1e-6)), ‖g‖ over the operator's parameters.
            ``None`` (default): unclipped. ``info["lookahead_clip"]`` is the factor applied.

    Parameters with no Adam state (never got a gradient: an unused head, a conditional branch) and a zero
    gradient on this data are left out: their rows of H are zero, P = inf there (``info["left_out"]``). With
    ``lookahead=False``, one with no state but a gradient now gets the P its first step will have
    (``info["first_step_preconditioner"]``). ``info["preconditioner"]`` is ``"next_step"`` or ``"last_step"``.
        inner: an existing :class:`~curvature.operators.HessianOperator` to wrap (its first-order graph is reused:
            λ(H) and λ(P⁻¹H) from one graph); ``model``, ``loss_fn`` and ``data`` are then not read.

    Attributes: ``preconditioner`` (flat diagonal of P, in ``param_names`` order), ``inner``, ``loss``,
    ``gradient``, ``param_names``, ``params``, ``lr`` (η₀), ``beta1`` (of the first group), ``lookahead``, ``info``.
    The optimizer's state is only read (copies), never modified.
    """

    def __new__(cls, model: nn.Module | None = None, *args: Any, inner: Any = None, **kwargs: Any) -> Any:
        """A fully-sharded model (FSDP2 ``fully_shard``), or an ``inner`` operator built on one, gets a
        :class:`~curvature.sharded.ShardedPreconditionedOperator` (P read shard by shard from the sharded state)."""
        from .sharded import ShardedHessianOperator, ShardedPreconditionedOperator, is_sharded_model

        if cls is PreconditionedHessianOperator and (isinstance(inner, ShardedHessianOperator) or (
                inner is None and model is not None and is_sharded_model(model))):
            kwargs.pop("lookahead_dtype", None)  # the sharded lookahead uses the operator's own gradient
            return ShardedPreconditionedOperator(model, *args, inner=inner, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, optimizer: Any, params: Any = None, *,
                 lookahead: bool = True, lookahead_dtype: torch.dtype | str | None = "auto",
                 inner: HessianOperator | None = None, max_grad_norm: float | None = None,
                 **operator_options: Any) -> None:
        opt = require_diagonal_preconditioner(optimizer, "PreconditionedHessianOperator")
        if not isinstance(lookahead, bool):
            raise TypeError(f"lookahead must be True (P of the step about to be taken) or False (P of the last step "
                            f"taken), got {lookahead!r}")
        lr0 = _fold_reference_lr(opt)
        if inner is None:
            inner = HessianOperator(model, loss_fn, data, params, **operator_options)
        elif operator_options or params is not None:
            raise TypeError("pass either inner= (an existing HessianOperator) or params/operator options, not both")
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        self.inner = inner
        self.optimizer = opt
        self.lookahead = lookahead
        self.param_names: list[str] = list(inner.param_names)
        self.params: list[torch.Tensor] = list(inner.params)
        self.loss: float = inner.loss
        self.gradient: torch.Tensor = inner.gradient
        self.lr = lr0
        betas = opt.param_groups[0].get("betas")
        self.beta1 = _scalar(betas[0]) if betas is not None else None
        self.kind: str = _kind(opt)
        self.info: dict[str, Any] = {"preconditioner": "next_step" if lookahead else "last_step"}
        self.lookahead_dtype = lookahead_dtype
        grad64 = self._lookahead_gradient(operator_options, (model, loss_fn, data))
        if lookahead and max_grad_norm is not None:  # the gradient the optimizer will see: clipped, as the trainer does
            factor = clip_factor(float(grad64.norm()), check_positive_float(max_grad_norm, "max_grad_norm"))
            grad64 = grad64 * factor
            self.info["lookahead_clip"] = factor
        P64 = self._build_preconditioner(opt, lr0, grad64)
        # ranks whose Adam states differ would silently solve different operators: one collective says so on all
        assert_ranks_agree(getattr(inner, "process_group", None), adam_preconditioner=P64)
        self.preconditioner = P64.to(self.dtype)
        self._scale = P64.rsqrt().to(self.dtype)  # 0 where a parameter is left out (P = inf)

    def _lookahead_gradient(self, options: dict, source: tuple | None = None) -> torch.Tensor:
        """g for the lookahead P, in float64: P ∝ |g| before the first step, so float32 rounding of small gradient
        entries would show up in λ(P⁻¹H) (~1e-3); one extra float64 gradient pass over the same batches (same
        frozen randomness) makes P float64-accurate. ``source`` = (model, loss_fn, data) as given to the
        constructor: used when ``inner`` has no engine (the training step's own graph); without data the inner
        gradient is used. ``info["lookahead_gradient"]`` says which dtype P was built from."""
        g = self.inner.gradient
        want = self.lookahead_dtype
        if want == "auto":
            state = self.optimizer.state
            fresh = any(_scalar(state.get(p, {}).get("step", 0)) <= 0 for p in self.params)
            want = torch.float64 if fresh else None
        elif want is not None and not isinstance(want, torch.dtype):
            raise TypeError(f"lookahead_dtype must be 'auto', a torch.dtype or None, got {want!r}")
        # what the extra pass runs on: the inner engine (same model, loss, parameters, batches, frozen randomness,
        # group), or what was given here for an inner operator on the training step's own graph (no engine)
        e = getattr(self.inner, "engine", None)
        if e is not None:
            group = getattr(self.inner, "process_group", None)
            opts = {k: options[k] for k in ("method", "device", "chunk_size") if k in options}
            spec = ((e.model, e.loss_fn, e.batches, list(e.names)),
                    dict(seed=e.seed, distributed=group is not None, process_group=group, **opts))
        elif source is not None and source[0] is not None and source[2] is not None:
            spec = ((*source, list(self.params)), {})
        else:
            spec = None
        if (not self.lookahead or want is None or spec is None
                or torch.finfo(want).eps >= torch.finfo(g.dtype).eps):
            self.info["lookahead_gradient"] = str(g.dtype).replace("torch.", "") if self.lookahead else None
            return g.double()
        args, kwargs = spec
        with warnings.catch_warnings():  # the inner operator has already said what it had to about the loss
            warnings.simplefilter("ignore", CurvatureWarning)
            ref = HessianOperator(*args, dtype=want, cache_graph=False, **kwargs)
        self.info["lookahead_gradient"] = str(want).replace("torch.", "")
        return ref.gradient.double()

    def _build_preconditioner(self, opt: torch.optim.Optimizer, lr0: float, grad: torch.Tensor) -> torch.Tensor:
        """The flat diagonal of P in float64 (``inf`` for parameters left out)."""
        owners = _owners(opt)
        foreign = [n for n, p in zip(self.param_names, self.params) if id(p) not in owners]
        if foreign:
            raise ValueError(f"the optimizer does not own these parameters of the operator: {', '.join(foreign)}; "
                             "narrow the operator with params= or pass the optimizer that trains them")
        kind, name = _kind(opt), type(opt).__name__
        if not self.lookahead and kind in ("adafactor", "adadelta"):
            raise ValueError(f"{name}'s P of the last step cannot be rebuilt from its state ("
                             + ("the update clipping used that step's gradient" if kind == "adafactor" else
                                "acc_delta has been updated since") + "): pass lookahead=True (the P of the step "
                             "about to be taken)")
        dtype, device = torch.float64, self.device
        grads = self.inner.unflatten(grad.to(device))
        live = self.inner.unflatten(self.inner.gradient)
        if not self.lookahead and not any("step" in opt.state.get(p, {}) for p in self.params):
            raise ValueError(f"the optimizer has no {name} state (step, ...) for {', '.join(self.param_names)}: "
                             "P of the last step is undefined. Take an optimizer step first, or pass lookahead=True "
                             "for the P of the step about to be taken")
        parts, zero_step, left_out, first_step, unrectified = [], [], [], [], []
        for pname, p, g, g_live in zip(self.param_names, self.params, grads, live):
            gi = owners[id(p)]
            group = opt.param_groups[gi]
            lr = lr0 if lr0 == 0 else _group_lr(group, gi)
            state = opt.state.get(p, {})
            # state that data has written: stepped, or Adam's initialised moments (GI-Adam: v₀ = g₀², step 0);
            # Adagrad's state at construction (step 0, sum = initial value) carries no gradient yet
            has_state = "step" in state and (_scalar(state["step"]) > 0 or kind == "adam")

            def read(key: str, default: torch.Tensor | None) -> torch.Tensor | None:
                """A detached float64 copy of a state tensor on the operator's device (``default`` if absent)."""
                t = state.get(key)
                if t is None:
                    return None if default is None else default.to(device)
                return t.detach().to(device=device, dtype=dtype, copy=True)

            if not has_state and not bool(g_live.ne(0).any()):
                # never got a gradient (unused head, conditional branch) and none on this data: its rows of H are
                # zero, so it is left out of P⁻¹H (P = inf) instead of blocking the whole model
                left_out.append(pname)
                parts.append(torch.full(p.shape, math.inf, dtype=dtype, device=device))
                continue
            if self.lookahead or "step" not in state:
                if "step" not in state and not self.lookahead:
                    first_step.append(pname)  # used now but never stepped: the P its first step will have
                g = g.to(dtype)
                if group.get("maximize", False):
                    g = -g
                wd = _scalar(group.get("weight_decay", 0.0))
                if wd != 0 and not _is_decoupled(opt, group):
                    g = g + wd * p.detach().to(device=device, dtype=dtype)
            else:
                if _scalar(state["step"]) <= 0:
                    zero_step.append(pname)
                    continue
                g = None
            P, note = _diagonal_P(kind, group, state, p, g, read)
            if note == "unrectified":
                unrectified.append(pname)
            parts.append(P * (1.0 if lr == lr0 else lr0 / lr))
        if zero_step:
            raise ValueError(f"the optimizer has step = 0 for {', '.join(zero_step)}: P of the last step is undefined. "
                             "Take an optimizer step first, or pass lookahead=True for the P of the step about to be "
                             "taken")
        self.info["left_out"] = left_out
        self.info["first_step_preconditioner"] = first_step
        if kind == "radam":
            # ρ_t ≤ 5: RAdam's step is un-preconditioned momentum SGD, Δ = −η·m/(1−β₁ᵗ), i.e. P = (1−β₁ᵗ)·I
            self.info["unrectified"] = unrectified
        P = torch.cat([x.reshape(-1) for x in parts])
        bad = ~((torch.isfinite(P) & (P > 0)) | (P == math.inf))
        if bad.any():
            names = sorted({self.param_names[i] for i in self._param_index(bad.nonzero().flatten().tolist())})
            raise ValueError(f"the pre-conditioner is not positive and finite in {', '.join(names)} "
                             "(eps = 0 with a zero second moment, or a non-finite state)")
        if bool((P == math.inf).all()):
            raise ValueError(f"every parameter of the operator is left out (no {name} state and a zero gradient on "
                             "this data): P⁻¹H is zero")
        return P

    def _param_index(self, flat_indices: Sequence[int]) -> list[int]:
        bounds = torch.tensor([p.numel() for p in self.params]).cumsum(0)
        return [int(torch.searchsorted(bounds, i, right=True)) for i in flat_indices]

    @property
    def method(self) -> str:
        return self.inner.method

    @property
    def whitened_gradient(self) -> torch.Tensor:
        """P^{-1/2} g: the gradient in the coordinates this symmetric form acts in (Adam's step direction
        there, up to momentum); 0 for parameters left out. A good start vector for the top eigenvector."""
        return self._scale * self.gradient.to(self.dtype)

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.inner.flatten(tensors)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return self.inner.unflatten(flat)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        D = self._scale[:, None]
        return D * self.inner.matmat(D * V)


def preconditioned_sharpness(model: nn.Module, loss_fn: Any, data: Any, optimizer: Any, k: int = 1,
                             solver: str = "lanczos", tol: float | None = None, max_iters: int | None = None,
                             X0: torch.Tensor | None = None, *, params: Any = None, lookahead: bool = True,
                             lookahead_dtype: torch.dtype | str | None = "auto", max_grad_norm: float | None = None,
                             largest: bool = True, solver_seed: int = 0, eig_tol: float | None = None,
                             **operator_options: Any) -> EigenResult:
    """Top-k eigenvalues of the pre-conditioned Hessian P⁻¹H (of P^{-1/2} H P^{-1/2}; eigenvectors are those of
    the symmetric form) for Adam/AdamW and the other diagonal pre-conditioners (RMSprop, Adagrad, Adamax, NAdam,
    RAdam, Adafactor, Adadelta), from the optimizer's own state (see :class:`PreconditionedHessianOperator`).

    Compare ``eigenvalues[0]`` with :func:`stability_threshold` ``(2+2β₁)/((1−β₁)η)``, or use
    :func:`edge_ratio`. Solver options as in :func:`~curvature.sharpness`; extra keyword options go to the
    inner :class:`HessianOperator`. ``lookahead=True`` (default) uses the P of the step about to be taken,
    ``False`` that of the last step taken; ``max_grad_norm`` clips the gradient of that step first, as the
    training loop does. ``info`` holds ``loss``, ``method``, ``num_params``, ``lookahead``,
    ``preconditioner`` (``"next_step"`` / ``"last_step"``), ``left_out`` (parameters without Adam state and
    without gradient, whose zero rows of H are left out), ``threshold`` (``None`` at lr = 0, where it is
    undefined, and for optimizers without a derived threshold), ``stability_note`` (why ``threshold`` is ``None``;
    ``None`` when it is there), ``optimizer`` (its class name) and, for RAdam, ``unrectified``.
    """
    op_kw, rest = split_operator_options(dict(operator_options))
    if rest:
        raise TypeError(f"preconditioned_sharpness() got unexpected keyword arguments: {sorted(rest)}")
    call = "preconditioned_sharpness(model, loss_fn, data, optimizer)"
    check_not_a_batch_half(optimizer, "optimizer", call, batch_name="data")
    check_not_a_batch_half(k, "k", call, batch_name="data")
    check_batch_argument(data, "data", call)
    check_solver_options(k, solver, tol, max_iters, solver_seed, eig_tol)
    op = PreconditionedHessianOperator(model, loss_fn, data, optimizer, params, lookahead=lookahead,
                                       lookahead_dtype=lookahead_dtype, max_grad_norm=max_grad_norm, **op_kw)
    res = solve_checked(op, k, solver, tol, max_iters, X0, largest, solver_seed, eig_tol)
    res.info.update(op.info)
    threshold = stability_threshold(optimizer) if op.lr > 0 else None
    res.info.update(loss=op.loss, method=op.method, num_params=op.shape[0], lookahead=op.lookahead,
                    threshold=threshold, optimizer=type(op.optimizer).__name__,
                    stability_note=stability_note(optimizer) if op.lr > 0 else
                    "lr = 0: the stability threshold is undefined (λ(P⁻¹H) is not)")
    return res


# ---------------------------------------------------------------------------------------------------
# GI-Adam
# ---------------------------------------------------------------------------------------------------
def _scalar_dtype(fused: bool | None) -> torch.dtype:
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:  # pragma: no cover - other torch versions
        return torch.float32 if fused else torch.get_default_dtype()
    return _get_scalar_dtype(is_fused=fused)


def _write_gi_state(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor, g: torch.Tensor) -> None:
    """The one place that writes GI-Adam's state: v₀ = g₀², m₀ = 0, step = 0, laid out exactly as the stock
    Adam ``_init_group`` lays out a fresh state (``step`` a 0-d tensor: float32 on the parameter's device for
    fused/capturable, else on the CPU in the default scalar dtype), so every implementation runs unchanged."""
    if torch.is_complex(p):
        raise TypeError("GI-Adam initialisation does not support complex parameters")
    fused, capturable = group.get("fused"), group.get("capturable", False)
    if fused:
        try:
            from torch.optim.optimizer import _device_dtype_check_for_fused
            _device_dtype_check_for_fused(p)
        except ImportError:  # pragma: no cover
            pass
    if fused or capturable:
        step = torch.zeros((), dtype=_scalar_dtype(fused), device=p.device)
    else:
        step = torch.tensor(0.0, dtype=_scalar_dtype(None), device="cpu")
    g = g.detach().to(device=p.device, dtype=p.dtype)
    sq = torch.empty_like(p, memory_format=torch.preserve_format)
    torch.mul(g, g, out=sq)
    state = opt.state[p]
    state.clear()
    state["step"] = step
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = sq
    if group.get("amsgrad", False):
        state["max_exp_avg_sq"] = sq.clone(memory_format=torch.preserve_format)


def _first_order_gradient(model: nn.Module, loss_fn: Any, batch: Any, wanted: Sequence[str],
                          group: Any) -> tuple[float, list[torch.Tensor]]:
    """Mean loss and ∂L/∂θ for the named parameters, by plain autograd on detached parameters and cloned buffers
    (the values ``loss.backward()`` would leave in ``.grad`` for one batch); RNG state restored."""
    named = dict(model.named_parameters())
    own = loss_fn is None
    loss_fn = resolve_loss_fn(loss_fn)
    batches = as_batches(batch, model=model, own_loss=own)
    device = named[wanted[0]].device
    total = batches.total_weight
    single = len(batches) == 1 and group is None
    grads: list[torch.Tensor] = [torch.zeros_like(named[n]) for n in wanted]

    def local() -> float:
        loss_sum = 0.0
        with frozen_rng(device), torch.enable_grad():
            for b in batches:
                leaves = {n: named[n].detach().requires_grad_() for n in wanted}
                state: dict[str, torch.Tensor] = {n: p.detach() for n, p in named.items() if n not in leaves}
                state.update({n: buf.clone() for n, buf in model.named_buffers()})
                state.update(leaves)
                guard = StateGuard()  # interrupt-safe swap: the model keeps its own Parameter objects
                try:
                    out = call_with_state(model, state, b.args, b.kwargs, guard)
                finally:
                    guard.restore()
                loss = loss_fn(out, b.targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return a scalar (mean-reduced) loss")
                gs = torch.autograd.grad(loss.reshape(()), list(leaves.values()), allow_unused=True)
                loss_sum += float(loss.detach()) * b.weight
                for i, gr in enumerate(gs):
                    if gr is None:
                        continue
                    if single:
                        grads[i] = gr
                    else:
                        grads[i].add_(gr, alpha=b.weight)
        return loss_sum

    if single:
        return local() / total, grads
    # One fail-together all-reduce of [Σ w, Σ w·loss, Σ w·g...]: a rank that fails or is interrupted here tells
    # the others at once instead of leaving them in the all-reduce (see distributed.sum_or_fail).
    sizes = [g.numel() for g in grads]

    def flat() -> torch.Tensor:
        loss_sum = local()
        return torch.cat([torch.tensor([float(total), loss_sum], dtype=torch.float64, device=device)] +
                         [g.reshape(-1).to(torch.float64) for g in grads])
    summed = sum_or_fail(flat, (2 + sum(sizes),), torch.float64, collective_device(group, device), group,
                         "in the first-order gradient")
    count = float(summed[0])
    parts = torch.split(summed[2:], sizes)
    grads = [(part / count).reshape(g.shape).to(device=g.device, dtype=g.dtype) for part, g in zip(parts, grads)]
    return float(summed[1]) / count, grads


def gi_adam_init(optimizer: Any, model: nn.Module, loss_fn: Any, batch: Any, *, overwrite: bool = False,
                 distributed: bool | None = None, process_group: Any = None) -> float:
    """GI-Adam: set v₀ = g₀² (``exp_avg_sq``), m₀ = 0 (``exp_avg``), ``step`` = 0 for every trainable parameter
    the optimizer owns, g₀ = the gradient of the mean loss on ``batch`` (several batches: their sample-weighted
    mean; all-reduced over ranks when ``torch.distributed`` runs >1 process). Adam's bias corrections are kept, so
    the stock Adam/AdamW step (any implementation) runs unchanged afterwards: the first step's
    v₁ = β₂g₀² + (1−β₂)g₁², t = 1.

    g₀ is computed by plain autograd on detached copies: the model's parameters, ``.grad``, buffers
    (BatchNorm running stats), ``training`` flags and the RNG state are untouched. With amsgrad,
    ``max_exp_avg_sq`` = g₀² too. An optimizer that has already stepped is refused unless ``overwrite=True``.
    Returns the mean loss on ``batch``.
    """
    opt = _require_adam(optimizer, "gi_adam_init()")
    model = unwrap_model(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    owned = [(group, p) for group in opt.param_groups for p in group["params"] if p.requires_grad]
    if not owned:
        raise ValueError("the optimizer owns no trainable parameters (requires_grad=True)")
    outside = [tuple(p.shape) for _, p in owned if id(p) not in by_id]
    if outside:
        raise ValueError(f"the optimizer owns {len(outside)} trainable parameter(s) that are not in the model "
                         f"(shapes {outside}): pass the model the optimizer trains")
    if not overwrite:
        stepped = [by_id[id(p)] for _, p in owned
                   if opt.state.get(p) and "step" in opt.state[p] and _scalar(opt.state[p]["step"]) > 0]
        if stepped:
            raise ValueError(f"the optimizer has already taken steps for {', '.join(stepped)}: GI-Adam initialises "
                             "a fresh optimizer (pass overwrite=True to reset its moments anyway)")
    names = [by_id[id(p)] for _, p in owned]
    group_pg = resolve_process_group(distributed, process_group)
    loss, grads = _first_order_gradient(model, loss_fn, batch, names, group_pg)
    for (group, p), g in zip(owned, grads):
        _write_gi_state(opt, group, p, g)
    return loss


class GIAdam(torch.optim.Adam):
    """Adam with GI-Adam's initialisation done lazily: at the first step of each parameter (empty state), its
    moments are set from the gradient in ``.grad`` (v₀ = g₀², m₀ = 0, t = 0) before the stock Adam step runs.

    A drop-in replacement for ``torch.optim.Adam`` (same arguments; ``decoupled_weight_decay=True`` gives
    AdamW's decay). The first step is then v₁ = g₀², m̂₁ = g₀, i.e. an update of ≈ η·√(1−β₂)·sign(g₀): the
    automatic warm-up factor √(1−β₂ᵗ). v₀ uses the loss gradient as it is in ``.grad`` (without L2 decay).
    To initialise from a chosen batch instead, use :func:`gi_adam_init` on any Adam/AdamW.
    """

    @torch.no_grad()
    def _gi_initialise(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and len(self.state[p]) == 0:
                    if p.grad.is_sparse:
                        raise RuntimeError("GIAdam does not support sparse gradients")
                    _write_gi_state(self, group, p, p.grad)

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gi_initialise()
        super().step()
        return loss
