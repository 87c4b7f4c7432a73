"""What ``curvature --help`` shows, without importing torch: the demo's defaults and the ``compare`` options.

:mod:`curvature.demo` and :mod:`curvature.compare` read their defaults from here (one source), so the help text
cannot drift from the code; this module imports only the standard library (``curvature --help`` stays instant).
"""
from __future__ import annotations

import argparse
from typing import Any

#: Default settings of ``curvature demo`` per optimizer (``--quick`` overrides steps / warm-up / every).
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 5.0, "steps": 200, "warmup": 60, "every": 5},
    "adam": {"lr": 0.03, "steps": 200, "warmup": 60, "every": 5},
}
DEMO_QUICK: dict[str, Any] = {"steps": 60, "warmup": 25, "every": 5}

#: ``curvature compare`` schedule names (= :data:`curvature.compare.DEFAULT_SCHEDULES`) and setups.
COMPARE_SCHEDULES: tuple[str, ...] = ("none", "linear", "exponential", "cosine", "wsd", "catapult", "loss_adaptive",
                                      "curvature_aware")
COMPARE_SETUPS: tuple[str, ...] = ("digits", "lm")

#: Our eigensolvers that ``curvature bench`` runs (= :data:`curvature.bench.OUR_SOLVERS`).
BENCH_SOLVERS: tuple[str, ...] = ("lanczos", "lobpcg", "power_iteration")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Raw descriptions/epilogs; ``(default: X)`` appended once, and only for a real default (not ``None`` or a
    flag's ``False``, and not when the help text already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def add_compare_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """The ``compare`` sub-command's parser (no ``func`` set: see :func:`curvature.compare.add_compare_subcommand`)."""
    p = subparsers.add_parser(
        "compare", help="compare warm-up schedules on a bundled setup", formatter_class=HelpFormatter,
        description="Train the same model under several learning-rate warm-up schedules (no warm-up, linear, "
                    "exponential, cosine, WSD, catapult η_init, loss-adaptive, curvature-aware) and compare loss, "
                    "accuracy, sharpness and divergence. Setups: 'digits' (tanh FCN on scikit-learn's digits, "
                    "full-batch SGD) and 'lm' (byte-level Transformer LM on Python stdlib sources, Adam).\n\n"
                    "Prints the expected runtime first and one line per schedule as it finishes; DIR/comparison.csv "
                    "is rewritten after every schedule (an interrupted run keeps the finished ones), "
                    "DIR/comparison.png at the end.",
        epilog="examples:\n"
               "  curvature compare --setup digits --quick --out compare-out\n"
               "  curvature compare --setup lm --schedules none,linear,curvature_aware")
    p.add_argument("--setup", choices=COMPARE_SETUPS, default="digits", help="which bundled setup")
    p.add_argument("--schedules", default=None,
                   help=f"comma-separated subset of {','.join(COMPARE_SCHEDULES)} (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the setup's)")
    p.add_argument("--lr-target", type=float, default=None, help="η_trgt (default: the setup's)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps of the fixed schedules (default: the setup's)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--track-every", type=int, default=None,
                   help="measure sharpness every N steps, 0: never (default: the setup's)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: the setup's)")
    p.add_argument("--safety", type=float, default=None,
                   help="safety fraction of the curvature-aware warm-up (default: the setup's)")
    p.add_argument("--out", default="compare-out", metavar="DIR", help="output folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    p.add_argument("--quick", action="store_true", help="a short run (tests, a first look)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p
