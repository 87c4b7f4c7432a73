"""The ``curvature`` command: ``demo``, ``analyze`` (checkpoints, offline) and ``check-hvp``.

Run ``curvature --help`` or ``curvature COMMAND --help``; ``python -m curvature.cli`` is the same program.
Errors print one line to stderr and exit with status 2 (``--debug`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

# Only the standard library at import time: `curvature --help` and `--version` never import torch (instant).
from ._cli_defaults import BENCH_SOLVERS, DEMO_DEFAULTS, DEMO_QUICK, HelpFormatter, add_compare_arguments
from ._version import __version__

__all__ = ["main", "build_parser"]

PROG = "curvature"

_DTYPES = ("float64", "float32", "bfloat16", "float16")


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


_Formatter = HelpFormatter


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors")


def _add_model_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MOD:FACTORY",
                   help="function that builds the model, as 'package.module:function' or "
                        "'path/to/file.py:function' (called with no arguments, returns a torch.nn.Module). Modules "
                        "are imported from the installed packages, PYTHONPATH and --path folders, never from the "
                        "current directory (a checkpoint folder must not run code).")
    p.add_argument("--data", required=True, metavar="MOD:FACTORY",
                   help="function that returns the data: one batch (inputs, targets) or an iterable of batches "
                        "(a list, a DataLoader). Several batches = the Hessian of the mean loss over all of them.")
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="folder to import the --model/--data/--loss modules from (repeatable; searched after the "
                        "installed packages). The current directory is never searched unless named here; a file "
                        "also works directly: path/to/file.py:function")
    p.add_argument("--loss", default=None, metavar="NAME|MOD:FN|model",
                   help="loss(outputs, targets) -> scalar (default: cross_entropy): cross_entropy, mse, nll, l1, "
                        "huber, bce, "
                        "bce_with_logits, 'package.module:function', or model: the model computes its own loss "
                        "from the labels in a dict batch, as Hugging Face models do")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="compute curvature in this dtype (on copies of the weights); default: the model's own")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where the model is built)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="torch-curvature (import curvature): curvature diagnostics for PyTorch: the sharpness λ_max of the loss Hessian (and of Adam's "
                    "pre-conditioned Hessian) against the stability threshold 2/η of the learning rate.",
        epilog="commands:\n"
               "  demo        train a small MLP on scikit-learn's digits and watch it reach the edge of stability\n"
               "  analyze     sharpness of every checkpoint in a folder, offline (CSV / JSON lines, plot)\n"
               "  check-hvp   verify Hessian-vector products on your model against finite differences\n"
               "  compare     compare warm-up schedules (digits FCN with SGD, byte-level LM with Adam)\n\n"
               "examples:\n"
               "  curvature demo --out demo-out\n"
               "  curvature analyze demo-out/checkpoints --model curvature.demo:digits_model \\\n"
               "      --data curvature.demo:digits_data --loss mse --out results.csv --plot sharpness.png\n"
               "  curvature check-hvp --model mypkg.models:build --data mypkg.data:one_batch\n"
               "  curvature compare --setup digits --out compare-out\n\n"
               "Run 'curvature COMMAND --help' for the options of a command.")
    _add_debug(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (distribution torch-curvature)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # -- demo ---------------------------------------------------------------------------------------
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter, help="train on digits and watch the edge of stability",
        description="Train a small MLP on scikit-learn's bundled digits (no download) with SGD under a linear "
                    "learning-rate warm-up (or Adam), measure the sharpness λ_max every few steps with "
                    "SharpnessTracker, save a few checkpoints, analyse them offline with analyze_checkpoints, "
                    "and plot λ_max against the stability threshold 2/η. Warm-up raises η until η·λ_max/2 "
                    "reaches 1 (the edge of stability); from there on λ_max is held near 2/η.",
        epilog="writes into DIR:\n"
               "  sharpness.csv     one row per measured step (step, lr, loss, sharpness, threshold, ...)\n"
               "  sharpness.png     λ_max and 2/η against the step, the learning rate on a twin axis\n"
               "  checkpoints/      a few checkpoints ({'model', 'optimizer', 'step'})\n"
               "  checkpoints.csv   the offline analysis of those checkpoints\n\n"
               "examples:\n"
               "  curvature demo\n"
               "  curvature demo --out /tmp/demo --optimizer adam\n"
               "  curvature demo --quick             # 60 steps instead of 200")
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="output folder")
    demo.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                      help="sgd: plain SGD (full batch), threshold 2/η; adam: Adam, pre-conditioned sharpness "
                           "λ_max(P⁻¹H) against 38/η")
    sgd, adam = DEMO_DEFAULTS["sgd"], DEMO_DEFAULTS["adam"]
    demo.add_argument("--steps", type=int, default=None,
                      help=f"training steps (default: {sgd['steps']}; --quick: {DEMO_QUICK['steps']})")
    demo.add_argument("--lr", type=float, default=None, help="peak learning rate after warm-up "
                      f"(default: {sgd['lr']:g} for sgd, {adam['lr']:g} for adam)")
    demo.add_argument("--warmup", type=int, default=None,
                      help=f"warm-up steps (default: {sgd['warmup']}; --quick: {DEMO_QUICK['warmup']}; with "
                           "another --steps: 30%% of it)")
    demo.add_argument("--every", type=int, default=None,
                      help=f"measure sharpness every N steps (default: {sgd['every']})")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initialisation")
    demo.add_argument("--quick", action="store_true", help="a short run (tests, a first look)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors (files are still written)")
    _add_debug(demo)

    # -- analyze ------------------------------------------------------------------------------------
    analyze = sub.add_parser(
        "analyze", formatter_class=_Formatter, help="sharpness of every checkpoint in a folder",
        description="Load every checkpoint in CKPT_DIR (*.pt, *.pth, *.ckpt, *.bin, *.safetensors) into the model "
                    "built by --model, and measure on the data of --data: the loss, the top-k Hessian "
                    "eigenvalues (sharpness), and, when the checkpoint holds Adam/AdamW state, the pre-conditioned "
                    "sharpness λ_max(P⁻¹H); with optimizer state also the learning rate and the stability "
                    "threshold (2/η for SGD, 38/η for Adam with β₁=0.9). Checkpoints are taken in order of their "
                    "step (saved in the file as step / global_step / epoch, else read from the file name); each "
                    "solve starts from the previous checkpoint's eigenvectors.\n\n"
                    "Formats: a plain state_dict, a dict with model / optimizer / step entries "
                    "(model_state_dict, state_dict also work), .safetensors, Lightning .ckpt files (a "
                    "'model.' prefix is stripped to fit the model).\n\n"
                    "Checkpoints are loaded with torch.load(weights_only=True): a file that holds pickled "
                    "Python objects is refused unless you pass --trust-checkpoints (unpickling can run code: only "
                    "for files you trust).",
        epilog="output: one row per checkpoint with columns file, step, lr, loss, sharpness, "
               "preconditioned_sharpness, threshold, num_hvps, seconds, converged, error. Rows are written to "
               "--out as each checkpoint finishes; running the same command again skips the files already in "
               "--out (use --no-resume to start over). A checkpoint that cannot be read gets a row with 'error' "
               "and the others are still analysed (exit status 1; 2 if none could be analysed).\n\n"
               "examples:\n"
               "  curvature analyze demo-out/checkpoints --model curvature.demo:digits_model \\\n"
               "      --data curvature.demo:digits_data --loss mse --out results.csv --plot sharpness.png\n"
               "  curvature analyze runs/ckpts --model mypkg.models:resnet18 --data mypkg.data:val_batches \\\n"
               "      --k 3 --device cuda --dtype float64 --out results.jsonl")
    analyze.add_argument("ckpt", nargs="+", metavar="CKPT_DIR", help="folder of checkpoints (or checkpoint files)")
    _add_model_data(analyze)
    analyze.add_argument("--k", type=int, default=1, help="number of top eigenvalues")
    analyze.add_argument("--solver", choices=("lobpcg", "lanczos", "power_iteration"), default="lobpcg",
                         help="eigensolver")
    analyze.add_argument("--tol", type=float, default=1e-4, help="relative residual ‖Hv − λv‖/|λ| to stop at")
    analyze.add_argument("--max-iters", type=int, default=None, help="most solver iterations per checkpoint")
    analyze.add_argument("--optimizer", default=None, metavar="MOD:FACTORY",
                         help="function(params) -> torch.optim.Optimizer to load the saved optimizer state into "
                              "(default: Adam, AdamW or SGD, inferred from the saved state)")
    analyze.add_argument("--max-batch-size", type=int, default=None,
                         help="split batches into micro-batches of at most this many samples (bounds memory)")
    analyze.add_argument("--out", default=None, metavar="FILE",
                         help="write rows to FILE: CSV, or JSON lines for .jsonl/.json or with --json")
    analyze.add_argument("--json", action="store_true",
                         help="JSON lines instead of CSV (in --out, or on stdout without --out)")
    analyze.add_argument("--plot", default=None, metavar="PNG",
                         help="plot λ_max and the threshold against the step (lr on a twin axis); with --k > 1 "
                              "also the eigenvalues (PNG_spectrum.png)")
    analyze.add_argument("--trust-checkpoints", action="store_true",
                         help="allow checkpoints that hold pickled Python objects (torch.load(weights_only=False)); "
                              "unpickling can run arbitrary code: only for files you trust")
    analyze.add_argument("--recursive", action="store_true", help="also look in sub-folders of CKPT_DIR")
    analyze.add_argument("--no-resume", action="store_true", help="redo every checkpoint, overwriting --out")
    analyze.add_argument("--overwrite", action="store_true",
                         help="replace an existing --out that is not an analysis output (refused otherwise)")
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_debug(analyze)

    # -- check-hvp ----------------------------------------------------------------------------------
    check = sub.add_parser(
        "check-hvp", formatter_class=_Formatter, help="verify Hessian-vector products on your model",
        description="Apply the Hessian of your model's loss to a few random directions v and compare with "
                    "central differences of gradients, (∇L(θ+εv) − ∇L(θ−εv))/2ε, and check the symmetry "
                    "uᵀHv = vᵀHu. Exit status 0 when both relative errors are within the tolerance, 1 otherwise. "
                    "Runs in float64 by default. Models with kinks (ReLU) can show finite-difference errors where "
                    "a kink is crossed; the symmetry check is unaffected by that.",
        epilog="examples:\n"
               "  curvature check-hvp --model curvature.demo:digits_model --data curvature.demo:digits_data \\\n"
               "      --loss mse\n"
               "  curvature check-hvp --model mypkg.models:build --data mypkg.data:one_batch --loss mse "
               "--directions 5")
    _add_model_data(check)
    check.set_defaults(dtype="float64")
    check.add_argument("--directions", type=int, default=3, help="number of random directions")
    check.add_argument("--tol", type=float, default=None,
                       help="largest relative error accepted (default: 1e-5 in float64)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    _add_debug(check)
    # -- compare (schedule-comparison harness; run by curvature.compare.run_compare) ------------------
    add_compare_arguments(sub)
    _add_bench_arguments(sub)
    return parser


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------
def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .checkpoints import add_search_path, analyze_checkpoints, format_rows, import_object

    if args.k < 1:
        raise CLIError(f"--k must be at least 1, got {args.k}")
    if not (math.isfinite(args.tol) and args.tol > 0):  # inf would accept the start vector; nan never converges
        raise CLIError(f"--tol must be a finite number > 0, got {args.tol}")
    for flag, value in (("--max-iters", args.max_iters), ("--max-batch-size", args.max_batch_size)):
        if value is not None and value < 1:  # before any checkpoint is read (0 is not "no limit")
            raise CLIError(f"{flag} must be at least 1, got {value}")
    options: dict[str, Any] = {}
    if args.dtype:
        options["dtype"] = _dtype(args.dtype)
    if args.max_batch_size:
        options["max_batch_size"] = args.max_batch_size
    if args.device:
        _check_device(args.device)
    json_lines = True if args.json else None
    ckpts = args.ckpt[0] if len(args.ckpt) == 1 else args.ckpt
    add_search_path(args.path)
    optimizer_factory = import_object(args.optimizer, "--optimizer") if args.optimizer else None
    fresh: list[dict] = []
    rows = analyze_checkpoints(ckpts, args.model, args.data, args.loss, k=args.k, solver=args.solver, tol=args.tol,
                               max_iters=args.max_iters, device=args.device,
                               trust_checkpoints=args.trust_checkpoints, optimizer_factory=optimizer_factory,
                               progress=_progress_enabled(args), out=args.out, resume=not args.no_resume,
                               json_lines=json_lines, recursive=args.recursive, callback=fresh.append,
                               overwrite=args.overwrite, **options)
    if len(rows) > len(fresh):
        print(f"{PROG}: resumed: {len(rows) - len(fresh)} checkpoint(s) already in {args.out} were skipped, "
              f"{len(fresh)} analysed now (--no-resume redoes them)", file=sys.stderr)
    if args.json and args.out is None:
        from .rows import encode_json_row

        for r in rows:
            print(encode_json_row(r), end="")  # valid JSON (NaN / inf as strings), like --out
    else:  # a failed row's error is printed once, on stderr below; the table marks the row
        print(format_rows([dict(r, error="(below)") if r.get("error") else r for r in rows]))
        if args.out:
            print(f"rows written to {args.out}")
    failed = [r for r in rows if r.get("error")]
    good = [r for r in rows if not r.get("error")]
    if args.plot and good:
        _plot(good, args.plot, args.k)
        print(f"plot written to {args.plot}")
    for message, files in _grouped_errors(failed).items():  # each error once (the same one for several files: once)
        measuring = bool(files) and re.match(r"\w*(Error|Exception): ", message) is not None  # "Type: ..." from the measurement
        hint = f"; {_default_loss_hint(args)}" if measuring and getattr(args, "loss_default", False) else ""
        print(f"{PROG}: error: {', '.join(files) + ': ' if files else ''}{_one_line(message)}{hint}", file=sys.stderr)
    if failed and not good:
        return 2
    return 1 if failed else 0


def _plot(rows: list[dict], path: str, k: int) -> None:
    from . import plotting

    plotting.plot_sharpness(rows, path=path)
    if k > 1 and hasattr(plotting, "plot_spectrum"):
        root, ext = os.path.splitext(path)
        try:
            plotting.plot_spectrum(rows, path=f"{root}_spectrum{ext or '.png'}")
        except TypeError:
            pass


def _check_device(device: str) -> None:
    from ._validate import check_device

    try:
        check_device(device)
    except ValueError as exc:
        raise CLIError(f"--{exc}".replace("--device=", "--device ", 1)) from None


def _cmd_check_hvp(args: argparse.Namespace) -> int:
    from .checkpoints import add_search_path, build_model, resolve_data, resolve_model_factory, resolve_loss
    from .diagnostics import check_hvp

    add_search_path(args.path)

    if args.directions < 2:
        raise CLIError(f"--directions must be at least 2 (the symmetry check pairs them), got {args.directions}")
    model = build_model(resolve_model_factory(args.model))
    if args.device:
        _check_device(args.device)
        model = model.to(args.device)
    data = resolve_data(args.data)
    loss = resolve_loss(args.loss)
    result = check_hvp(model, loss, data, num_directions=args.directions, dtype=_dtype(args.dtype),
                       tol=args.tol, seed=args.seed)
    print(result)
    print(f"  parameters: {result.details.get('num_params')}, HVP route: {result.details.get('method')}, "
          f"finite-difference step ε = {result.eps:.2e}")
    for i, (fd, sym) in enumerate(zip(result.fd_errors, result.symmetry_errors)):
        print(f"  direction {i}: relative error vs finite differences {fd:.2e}, asymmetry {sym:.2e}")
    return 0 if result.passed else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.steps is not None and args.steps < 2:
        raise CLIError(f"--steps must be at least 2, got {args.steps}")
    run_demo(out=args.out, optimizer=args.optimizer, steps=args.steps, lr=args.lr, warmup=args.warmup,
             every=args.every, seed=args.seed, quick=args.quick,
             progress=_progress_enabled(args) and not args.quiet, verbose=not args.quiet)
    return 0


def _add_bench_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """``curvature bench``: our eigensolvers, scipy and installed peers on the user's model (run by
    :func:`curvature.bench.run`)."""
    p = subparsers.add_parser(
        "bench", formatter_class=_Formatter,
        help="benchmark the eigensolvers (ours, scipy, installed peers) on your model",
        description="λ_max of your model's loss Hessian by Lanczos, LOBPCG, power iteration, scipy eigsh(which='LA') "
                    "and any installed peer (PyHessian, hessian-eigenthings, curvlinops), side by side in one "
                    "process: HVPs, time, and each one's error against a tight float64 reference.",
        epilog="example:\n  curvature bench --model curvature.demo:digits_model --data curvature.demo:digits_data "
               "--loss mse")
    _add_model_data(p)
    p.add_argument("--eig-tol", type=float, default=1e-3, help="relative eigenvalue accuracy asked")
    p.add_argument("--seeds", type=int, default=5, help="start vectors per solver (medians over them)")
    p.add_argument("--solvers", nargs="+", default=list(BENCH_SOLVERS), choices=list(BENCH_SOLVERS),
                   help="our solvers to run")
    p.add_argument("--no-scipy", action="store_true", help="leave out scipy eigsh")
    p.add_argument("--no-peers", action="store_true", help="leave out the peer libraries")
    _add_debug(p)
    return p


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    return run_compare(args)


def _grouped_errors(rows: list[dict]) -> dict[str, list[str]]:
    """Failed rows by error message: a measurement error is ``"<file>: <Type>: <message>"``; the same message
    for several files is printed once, naming them."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        text, file = str(r["error"]), str(r.get("file") or "")
        if file and text.startswith(file + ": "):
            groups.setdefault(text[len(file) + 2:], []).append(file)
        else:
            groups.setdefault(text, [])
    return groups


def _default_loss_hint(args: argparse.Namespace) -> str:
    """What to say when the default loss may be the cause of a failure."""
    return (f"the loss used was the default --loss {args.loss} (F.cross_entropy(outputs, targets): (N, C) outputs, "
            "(N,) class targets); choose yours with --loss: mse, nll, l1, huber, bce, bce_with_logits, model (the "
            "model's own loss from the labels in a dict batch), or package.module:function for a "
            "loss_fn(outputs, targets), e.g. one that flattens a sequence model's (B, T, V) logits")


def _one_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return " ".join(lines) if lines else "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvature`` console script; returns the exit status."""
    from ._safepath import drop_cwd_from_sys_path

    if argv is None:  # run as the program (console script, python -m): nothing in the current directory may
        drop_cwd_from_sys_path()  # shadow a module imported later (#15.5); a call from Python keeps sys.path
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "loss"):  # remember whether the loss was chosen: a failure of the default one says so
        args.loss_default = args.loss is None
        args.loss = "cross_entropy" if args.loss is None else args.loss
    debug = getattr(args, "debug", False)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"demo": _cmd_demo, "analyze": _cmd_analyze, "check-hvp": _cmd_check_hvp, "compare": _cmd_compare,
                "bench": _cmd_bench}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, no traceback (unless --debug)
        if debug:
            raise
        from .checkpoints import CheckpointError

        expected = isinstance(exc, (CLIError, CheckpointError, ValueError, TypeError, FileNotFoundError))
        prefix = "" if expected else f"{type(exc).__name__}: "
        hint = "" if expected else " (run with --debug for the traceback)"
        if getattr(args, "loss_default", False) and not isinstance(exc, (CLIError, CheckpointError,
                                                                           FileNotFoundError)):
            hint += f"; {_default_loss_hint(args)}"
        print(f"{PROG}: error: {prefix}{_one_line(exc)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
