"""compare_schedules: end to end on a tiny setting, divergence reported (not raised), the CLI entry."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

from curvature.compare import (DEFAULT_SCHEDULES, SUMMARY_KEYS, ComparisonResult, add_compare_subcommand,
                               compare_schedules, find_required_warmup, run_compare)
from curvature.warmup import LinearWarmup


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=gen)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return X, y


def test_every_default_schedule_runs_and_gets_a_row(tmp_path):
    res = compare_schedules(tiny_model, tiny_data(), None, optimizer="sgd", steps=12, seeds=(0,), lr_target=0.5,
                            track_every=4, batch_size=16, warmup_steps=4)
    assert isinstance(res, ComparisonResult)
    assert [r["schedule"] for r in res.rows] == list(DEFAULT_SCHEDULES)
    for r in res.rows:
        assert set(SUMMARY_KEYS) <= set(r)
        assert r["failure"] is None, r
        assert not r["diverged"]
        assert r["steps_run"] == 12 and 0 <= r["final_accuracy"] <= 1
        curve = res.curves[(r["schedule"], 0)]
        assert len(curve["loss"]) == len(curve["lr"]) == 12
        assert [e["step"] for e in curve["tracked"]] == [0, 4, 8]
        assert all(e["sharpness"] > 0 for e in curve["tracked"])
    assert res.row("none")["steps_to_target"] == 0
    assert res.row("linear")["steps_to_target"] == 4
    assert res.row("curvature_aware")["schedule_hvps"] > 0
    assert res.row("catapult")["schedule_forward_passes"] > 0
    df = res.to_dataframe()
    assert len(df) == len(DEFAULT_SCHEDULES) and list(df.columns) == list(SUMMARY_KEYS)
    import matplotlib

    matplotlib.use("Agg")
    fig = res.plot(tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert len(fig.axes) == 3
    assert "schedule" in res.table()


def test_divergence_is_detected_and_reported_not_raised():
    scheds = {"huge": {"kind": "constant"}, "ok": LinearWarmup(0.1, 3), "fn": (lambda t: 1e6),
              "broken": (lambda t: 1 / 0)}
    res = compare_schedules(tiny_model, tiny_data(), scheds, optimizer="sgd", steps=30, lr_target=1e4,
                            track_every=None, seeds=(0, 1))
    assert len(res.rows) == 8
    for seed in (0, 1):
        huge = res.row("huge", seed)
        assert huge["diverged"] and huge["diverged_step"] is not None and huge["diverged_step"] < 30
        assert res.row("fn", seed)["diverged"]
        assert not res.row("ok", seed)["diverged"] and res.row("ok", seed)["failure"] is None
        broken = res.row("broken", seed)
        assert broken["failure"].startswith("ZeroDivisionError")
    assert set(res.diverged) == {"huge", "fn", "broken"}


def test_adam_and_loss_factor_divergence():
    res = compare_schedules(tiny_model, tiny_data(), {"ca": {"kind": "curvature_aware", "every": 3},
                                                        "lin": "linear"},
                            optimizer="adam", steps=9, lr_target=0.05, track_every=3, warmup_steps=3)
    ca = res.row("ca")
    assert ca["failure"] is None and ca["schedule_hvps"] > 0
    tracked = res.curves[("ca", 0)]["tracked"]
    assert all(e["preconditioned_sharpness"] is not None for e in tracked)
    assert res.curves[("ca", 0)]["decisions"][0]["action"] in ("grow", "done")


def test_find_required_warmup():
    out = find_required_warmup(tiny_model, tiny_data(), lr_target=0.5, grid=(0, 4), steps=6, optimizer="sgd")
    assert out["warmup_steps"] == 0 and out["diverged"] == {0: False, 4: False}


def test_cli_entry_quick(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="curvature")
    sub = parser.add_subparsers(dest="command")
    add_compare_subcommand(sub)
    args = parser.parse_args(["compare", "--setup", "digits", "--quick", "--steps", "12", "--track-every", "6",
                              "--schedules", "none,linear,curvature_aware", "--out", str(tmp_path / "o")])
    assert args.func is run_compare
    assert run_compare(args) == 0
    text = capsys.readouterr().out
    assert "curvature_aware" in text and "linear" in text
    assert (tmp_path / "o" / "comparison.csv").exists() and (tmp_path / "o" / "comparison.png").exists()
    lines = (tmp_path / "o" / "comparison.csv").read_text().strip().splitlines()
    assert len(lines) == 4
    bad = parser.parse_args(["compare", "--schedules", "nope", "--out", str(tmp_path / "o2")])
    assert run_compare(bad) == 2
    assert not math.isnan(1.0)


def test_compare_prints_progress_and_keeps_partial_results(tmp_path, capsys):
    # issue 14.11: one line per schedule as it finishes, the expected runtime first, and comparison.csv
    # rewritten after every run, so an interrupted compare keeps what finished
    parser = argparse.ArgumentParser(prog="curvature")
    sub = parser.add_subparsers(dest="command")
    add_compare_subcommand(sub)
    seen: list[int] = []
    import curvature.compare as C

    original = C.compare_schedules

    def spy(*a, **kw):  # a real run; stop it after the second schedule, as Ctrl-C would
        user_on_row = kw["on_row"]

        def on_row(row, done, total):
            user_on_row(row, done, total)
            seen.append(len((tmp_path / "o" / "comparison.csv").read_text().strip().splitlines()) - 1)
            if done == 2:
                raise KeyboardInterrupt

        kw["on_row"] = on_row
        return original(*a, **kw)

    C.compare_schedules = spy
    try:
        args = parser.parse_args(["compare", "--setup", "digits", "--quick", "--steps", "8", "--track-every", "4",
                                  "--schedules", "none,linear,cosine", "--out", str(tmp_path / "o")])
        with pytest.raises(KeyboardInterrupt):
            run_compare(args)
    finally:
        C.compare_schedules = original
    text = capsys.readouterr().out
    assert "expected runtime" in text and "[1/3] none" in text and "[2/3] linear" in text
    assert seen == [1, 2]
    rows = (tmp_path / "o" / "comparison.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[1].startswith("none") and rows[2].startswith("linear")
