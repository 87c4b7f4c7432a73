"""Peak host memory of a Hessian operator over a DataLoader of 100 batches: held in memory vs streamed.

    python -m benchmarks.streaming [--batches 100] [--batch-size 128] [--features 2048] [--out FILE.md]

Before issue #13.5, ``as_batches`` read a DataLoader into a list of every batch at construction (the same as
passing ``data=list(loader)``, the "held" row); now a DataLoader is read again on every HVP pass with the same
batches in the same order ("streamed"). The dataset makes each sample on the fly (seeded per index), so the
data itself costs no memory and the peak is what the operator holds. Each mode runs in a fresh subprocess;
peak RSS is ``ru_maxrss`` minus the RSS after imports and model set-up. Also reported: construction time and
seconds per HVP (a streamed pass re-reads the loader), and λ_max from 5 LOBPCG iterations (the same number
both ways).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import curvature as cv
from torch.utils.data import DataLoader, Dataset

mode, nb, bs, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

class OnTheFly(Dataset):
    def __len__(self):
        return nb * bs
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(d, generator=g), torch.randint(0, 10, (), generator=g)

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
loader = DataLoader(OnTheFly(), batch_size=bs, shuffle=True)
torch.nn.functional.cross_entropy(model(torch.randn(bs, d)), torch.zeros(bs, dtype=torch.long)).backward()
model.zero_grad(set_to_none=True)
base = rss_mb()
t0 = time.perf_counter()
data = list(loader) if mode == "held" else loader
op = cv.HessianOperator(model, torch.nn.functional.cross_entropy, data)
t1 = time.perf_counter()
res = cv.lobpcg(op, 1, tol=1e-12, max_iters=5)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "base_mb": base, "peak_mb": peak, "extra_mb": peak - base,
                  "build_s": t1 - t0, "hvps": res.num_hvps, "s_per_hvp": (t2 - t1) / max(res.num_hvps, 1),
                  "lambda": float(res.eigenvalues[0]), "streaming": op.engine.batches.streaming}))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming-cpu-2026-12-01.md"))
    args = ap.parse_args(argv)
    rows = []
    for mode in ("held", "streamed"):
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.batches), str(args.batch_size),
                               str(args.features)], capture_output=True, text=True, timeout=1800, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    data_mb = args.batches * args.batch_size * (args.features * 4 + 8) / 2 ** 20
    lines = [
        "# Streaming a DataLoader: peak host memory (CPU)",
        "",
        f"`python -m benchmarks.streaming --batches {args.batches} --batch-size {args.batch_size} "
        f"--features {args.features}` on {platform.processor() or platform.machine()}, 1 thread, "
        f"Python {platform.python_version()}; the loader's batches total {data_mb:.0f} MiB (float32 inputs + "
        "int64 labels), made on the fly by the dataset. `held` = the batches in a list, what `as_batches` did "
        "with a DataLoader before #13.5; `streamed` = the DataLoader itself, read again on every HVP pass.",
        "",
        "| mode | peak RSS above set-up (MiB) | build (s) | s / HVP | HVPs | λ_max (5 LOBPCG iterations) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['extra_mb']:.0f} | {r['build_s']:.2f} | {r['s_per_hvp']:.3f} | {r['hvps']} | "
                     f"{r['lambda']:.10g} |")
    lines += ["", f"Same λ both ways: {rows[0]['lambda'] == rows[1]['lambda']} "
              f"(relative difference {abs(rows[0]['lambda'] - rows[1]['lambda']) / abs(rows[0]['lambda']):.1e})."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
