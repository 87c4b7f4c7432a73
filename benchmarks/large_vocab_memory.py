"""Peak host memory of one HVP vs one training step on a GPT with a GPT-2-sized vocabulary (#13 part 6).

GPT-2-style decoder (``benchmarks.models.GPT``: pre-LN, tied embeddings, fused SDPA) with V = 50,257,
d = 128, 2 layers, float32, on CPU. Each measurement runs in a fresh subprocess: build model + batch, note
RSS, reset the kernel's high-water mark (``/proc/self/clear_refs``), run the operation once, and report
VmHWM − RSS before (MiB): the extra memory the operation needed at its peak.

* ``train``: forward, backward, AdamW step (state created in the step: counted);
* ``exact``: ``HessianOperator`` (double backward, cached first-order graph) + one HVP;
* ``exact_fwd``: ``method="forward_over_reverse"`` + one HVP;
* ``fd``: ``method="finite_difference"`` + one HVP (two gradients; nothing kept).

Run:  PYTHONPATH=. python benchmarks/large_vocab_memory.py --tokens 1024,2048 --out benchmarks/results/large-vocab-memory-cpu-DATE.md
GPU:  the same with --device cuda (then torch.cuda.max_memory_allocated is reported instead of RSS).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = ("train", "exact", "exact_fwd", "fd")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(mode: str, tokens: int, device: str) -> dict:
    import torch
    sys.path.insert(0, ".")
    from benchmarks.models import GPT, SeqCrossEntropy
    from curvature.operators import HessianOperator

    torch.set_num_threads(1)
    torch.manual_seed(0)
    seq = 128
    model = GPT(128, 2, 4, seq, vocab=50257).to(device)
    loss_fn = SeqCrossEntropy()
    idx = torch.randint(0, 50257, (tokens // seq, seq), device=device)
    y = torch.randint(0, 50257, (tokens // seq, seq), device=device)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, 1, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    t0 = time.perf_counter()
    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss_fn(model(idx), y).backward()
        opt.step()
    else:
        method = {"exact": "auto", "exact_fwd": "forward_over_reverse", "fd": "finite_difference"}[mode]
        HessianOperator(model, loss_fn, (idx, y), method=method).matmat(v)
    seconds = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (_rss_kib("VmHWM") - base) / 1024
    return {"mode": mode, "tokens": tokens, "peak_mib": peak_mib, "seconds": seconds, "n": n,
            "logits_mib": tokens * 50257 * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,2048")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        mode, tokens = args.child.split(":")
        print(json.dumps(child(mode, int(tokens), args.device)))
        return
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for mode in MODES:
            res = subprocess.run([sys.executable, __file__, "--child", f"{mode}:{tokens}", "--device", args.device],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                rows.append({"mode": mode, "tokens": tokens, "error": res.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| tokens | one (tokens × V) float32 tensor | train step | exact HVP (double backward) | exact HVP "
             "(forward-over-reverse) | FD HVP | exact / train | FD / train |", "|---|---|---|---|---|---|---|---|"]
    for tokens in sorted({r["tokens"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["tokens"] == tokens}
        cell = lambda m: f"{by[m]['peak_mib']:.0f} MiB ({by[m]['seconds']:.1f} s)" if "peak_mib" in by[m] else by[m]["error"]  # noqa: E731
        ratio = lambda m: f"{by[m]['peak_mib'] / by['train']['peak_mib']:.2f}" if "peak_mib" in by[m] else "—"  # noqa: E731
        lines.append(f"| {tokens:,} | {tokens * 50257 * 4 / 2**20:.0f} MiB | {cell('train')} | {cell('exact')} | "
                     f"{cell('exact_fwd')} | {cell('fd')} | {ratio('exact')} | {ratio('fd')} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"# Peak memory of one HVP vs one training step, V = 50,257 ({args.device}, "
                     f"{time.strftime('%Y-%m-%d')})\n\nCommand: `PYTHONPATH=. python benchmarks/large_vocab_memory.py "
                     f"--tokens {args.tokens} --device {args.device} --out {args.out}`\n\nGPT d=128, 2 layers, tied "
                     "embeddings, float32; extra peak memory over the loaded model and batch (CPU: VmHWM − RSS, fresh "
                     "process per cell).\n\n" + text + "\n")


if __name__ == "__main__":
    main()
