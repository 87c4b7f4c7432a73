"""Build notebooks/schedule_comparison.ipynb from the cells below and execute it (nbclient), so the committed
notebook carries its outputs and writes notebooks/schedule_comparison.png.

    python notebooks/build_schedule_comparison.py
"""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

CELLS = [
    md("""# Warm-up schedules compared: loss, sharpness, divergence

`curvature.compare.compare_schedules` trains the same model (same initialisation, same batches) under several
learning-rate warm-ups and records loss, accuracy, sharpness λ (λ_max(H) for SGD, the pre-conditioned λ_max(P⁻¹H)
for Adam, measured with a warm-started `SharpnessTracker`) and divergence (non-finite loss, or loss > 10 × L₀:
flagged, never raised).

The **curvature-aware** warm-up (`curvature.warmup.feedback.CurvatureAwareWarmup`) raises η toward η_trgt while the
measured edge ratio η·λ/c (c = 2 for SGD, 38 for Adam) stays below a safety fraction `safety`, planning each new
rate from the measured λ (η_next = min(safety·c/λ, 2η, η_trgt)) and backing off after a loss spike.

Two setups: a tanh FCN on scikit-learn's digits with full-batch SGD (a large initialisation, ×2: the
sharpness-reduction phase of Kalra & Barkeshli, arXiv 2406.09405), and a one-block byte-level Transformer LM on
Python standard-library sources with Adam. Small models and one thread: the notebook runs in about two minutes."""),
    code("""import time
import torch
import matplotlib
import matplotlib.pyplot as plt
from curvature.compare import (compare_schedules, find_required_warmup, digits_setup, byte_lm_setup)

torch.set_num_threads(1)   # tiny models: one thread is fastest and leaves the other core alone
t_start = time.perf_counter()"""),
    md("""## 1. Digits FCN, SGD: how long must a linear warm-up be?

η_trgt = 6 is 7.5× the stability threshold 2/λ₀ at initialisation (λ₀ ≈ 2.5). A sweep over linear warm-up
lengths finds the shortest one that does not diverge."""),
    code("""dg = digits_setup()
LR = dg["lr_target"]
STEPS = 150
sweep = find_required_warmup(dg["make_model"], dg["data"], LR, grid=(0, 5, 10, 15, 20, 30, 40),
                             steps=STEPS, loss_fn=dg["loss_fn"], optimizer="sgd")
T_req = sweep["warmup_steps"]
print("diverged per warm-up length:", sweep["diverged"])
print("shortest linear warm-up that trains:", T_req, "steps")"""),
    md("""## 2. Digits: every schedule

The fixed-length warm-ups use T = T_req. Two curvature-aware settings: the default `safety=0.5` (stays at half
the stability threshold: never crosses the edge) and `safety=1.8`, which lets η go past the edge into the
catapult regime (between 2/λ and ~4/λ for MSE networks) where the loss spike flattens the landscape, with the
spike back-off as the brake."""),
    code("""schedules = {
    "none": "constant",
    "linear": "linear",
    "exponential": "exponential",
    "cosine": "cosine",
    "wsd": "wsd",
    "catapult": "catapult",
    "loss_adaptive": "loss_adaptive",
    "curvature_aware (s=0.5)": {"kind": "curvature_aware", "safety": 0.5, "every": 5},
    "curvature_aware (s=1.8)": {"kind": "curvature_aware", "safety": 1.8, "every": 5},
}
digits = compare_schedules(dg["make_model"], dg["data"], schedules, optimizer="sgd", steps=STEPS, lr_target=LR,
                           track_every=15, warmup_steps=T_req, loss_fn=dg["loss_fn"], eval_data=dg["eval_data"])
print(digits.table())"""),
    code("""ca = digits.row("curvature_aware (s=1.8)")
lin = digits.row("linear")
print(f"linear warm-up: needs T = {T_req} steps; reaches η_trgt at step {lin['steps_to_target']}")
print(f"curvature-aware (s=1.8): reaches η_trgt at step {ca['steps_to_target']}, diverged: {ca['diverged']}, "
      f"final test accuracy {ca['final_accuracy']:.3f}, controller overhead {ca['schedule_hvps']} HVPs "
      f"(tracking for the plot: {ca['tracking_hvps']} HVPs)")
for d in digits.curves[("curvature_aware (s=1.8)", 0)]["decisions"]:
    lam = d.get("lambda")
    print(f"  step {d['step']:3d}: {d['action']:<8} lr {d['lr']:.3g}" + (f"  λ {lam:.3g}" if lam else "")
          + f"  ({d['reason']})")
cons = digits.row("curvature_aware (s=0.5)")
print(f"curvature-aware (s=0.5): max lr {cons['max_lr']:.3g} (never reaches η_trgt = {LR}: below the edge, "
      "λ falls too slowly), diverged: {}".format(cons["diverged"]))

# The claim: the curvature-aware warm-up reaches η_trgt without diverging, in no more steps than the linear
# warm-up the sweep found necessary.
assert T_req is not None and T_req > 0
assert not ca["diverged"] and ca["failure"] is None
assert ca["steps_to_target"] is not None and ca["steps_to_target"] <= T_req
assert digits.row("none")["diverged"]"""),
    md("""## 3. Byte-level Transformer LM, Adam

Adam's pre-conditioned sharpness λ_max(P⁻¹H) starts near 10⁶ and falls by orders of magnitude in the first
steps; the controller follows it (η grows by at most 2× per measurement)."""),
    code("""lm = byte_lm_setup()
LM_LR, LM_STEPS = lm["lr_target"], 60
lm_res = compare_schedules(lm["make_model"], lm["data"],
                           {"none": "constant", "linear": "linear", "catapult": "catapult",
                            "curvature_aware (s=1.8)": {"kind": "curvature_aware", "safety": 1.8, "every": 5}},
                           optimizer="adam", steps=LM_STEPS, lr_target=LM_LR, batch_size=lm["batch_size"],
                           track_every=20, warmup_steps=20, loss_fn=lm["loss_fn"], eval_data=lm["eval_data"])
print(lm_res.table())
lm_ca = lm_res.row("curvature_aware (s=1.8)")
assert not lm_ca["diverged"] and lm_ca["failure"] is None"""),
    code("""fig, axes = plt.subplots(2, 3, figsize=(15, 8))
digits.plot(axes=axes[0], title=f"digits FCN, SGD, η_trgt={LR:g} (linear T={T_req})")
lm_res.plot(axes=axes[1], title=f"byte LM, Adam, η_trgt={LM_LR:g}")
fig.tight_layout()
fig.savefig("schedule_comparison.png", dpi=100)
plt.show()
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")"""),
]

SUMMARY = "## What this shows\n\n* Digits / SGD: with η_trgt = 6 (7.5× the threshold at initialisation) no warm-up diverges at once, and a linear\n  warm-up needs T = 20 steps (the sweep: 0–15 diverge). The curvature-aware warm-up with `safety=1.8` reaches\n  η_trgt at step 20 — no later than the necessary linear warm-up — without diverging, for 60 HVPs of controller\n  overhead (4 warm-started LOBPCG measurements, ≈ 15 HVPs each). With the default `safety=0.5` it never crosses\n  the edge and stalls near η ≈ 0.8: reaching a target far beyond 2/λ₀ needs the catapults that flatten the\n  landscape, which a sub-edge controller, by design, avoids. The default is the safe choice, not the fast one.\n* Byte LM / Adam: this tiny model trains without warm-up at η_trgt = 0.05 even though λ_max(P⁻¹H)·η/38 is ~10³ at\n  the first step (Adam's step size is bounded, so the quadratic threshold overstates the danger early on). The\n  curvature-aware controller follows λ_max(P⁻¹H) down from ~10⁶ but, growing at most 2× per measurement, does not\n  reach η_trgt in 60 steps; it never diverges."
CELLS.append(md(SUMMARY))


def build(execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = CELLS
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = HERE / "schedule_comparison.ipynb"
    if execute:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(build())
