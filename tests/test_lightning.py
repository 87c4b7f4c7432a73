"""Lightning integration: a real Trainer.fit on CPU writes rows that match direct sharpness calls, logs to the
Trainer's logger, and trains bit-identically with and without the callback."""
from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from curvature.diagnostics import sharpness  # noqa: E402
from curvature.integrations.lightning import SharpnessCallback  # noqa: E402
from curvature.optim import preconditioned_sharpness  # noqa: E402


class Module(L.LightningModule):
    def __init__(self, opt="sgd"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))
        self.opt = opt

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 8, generator=g)
    Y = (X[:, :3]).argmax(1)
    ds = torch.utils.data.TensorDataset(X, Y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))


def fit(opt, callbacks=(), logger=False, max_steps=6):
    L.seed_everything(0, verbose=False)
    module = Module(opt)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=list(callbacks), num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        trainer.fit(module, loader())
    return module, trainer


def test_rows_match_direct_calls_and_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    snaps = {}

    class Snapshot(L.Callback):  # records what a direct call needs, at the same point of the step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            snaps[trainer.global_step] = ({k: v.clone() for k, v in pl_module.state_dict().items()},
                                          [t.clone() for t in self.batch], torch.get_rng_state(),
                                          copy.deepcopy(optimizer.state_dict()))

    cb = SharpnessCallback(F.cross_entropy, every=2, tol=1e-6, k=2, dtype=torch.float64,
                           sinks=[tmp_path / "rows.csv"])
    logger = CSVLogger(tmp_path, name="lg")
    module, trainer = fit("adam", [Snapshot(), cb], logger=logger)
    assert [r["step"] for r in cb.history] == [0, 2, 4]
    assert all(r["error"] is None and r["converged"] for r in cb.history)
    for row in cb.history:
        state, batch, rng, opt_state = snaps[row["step"]]
        ref_model = Module("adam")
        ref_model.load_state_dict(state)
        ref_model.train()
        ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
        ref_opt.load_state_dict(opt_state)
        torch.set_rng_state(rng)  # the operator freezes dropout with a seed drawn from the RNG state
        ref = sharpness(ref_model, F.cross_entropy, tuple(batch), k=2, tol=1e-6, dtype=torch.float64)
        assert row["eigenvalues"] == pytest.approx(ref.eigenvalues.tolist(), rel=1e-6)
        torch.set_rng_state(rng)
        pre = preconditioned_sharpness(ref_model, F.cross_entropy, tuple(batch), ref_opt, k=2, tol=1e-6,
                                       dtype=torch.float64, lookahead=True)  # rows: P of the step about to be taken
        assert row["preconditioned_eigenvalues"] == pytest.approx(pre.eigenvalues.tolist(), rel=1e-6)
        assert row["lr"] == 1e-2 and row["optimizer"] == "Adam"
    # the Trainer's logger got the values (at the row's step), and callback_metrics has the last one
    logged = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    got = {int(r["step"]): float(r["curvature/sharpness"]) for r in logged if r.get("curvature/sharpness")}
    assert got == pytest.approx({r["step"]: r["sharpness"] for r in cb.history})
    assert float(trainer.callback_metrics["curvature/sharpness"]) == pytest.approx(cb.history[-1]["sharpness"])
    assert len(list(csv.DictReader(open(tmp_path / "rows.csv")))) == 3


@pytest.mark.parametrize("when", ["before_step", "after_step"])
def test_fit_is_bit_identical_with_callback(when):
    cb = SharpnessCallback(F.cross_entropy, every=2, k=2, when=when)
    tracked, _ = fit("sgd", [cb])
    plain, _ = fit("sgd")
    assert len(cb.history) == 3 and all(r["error"] is None for r in cb.history)
    assert [r["step"] for r in cb.history] == ([0, 2, 4] if when == "before_step" else [2, 4, 6])
    for (name, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), name


# --- manual optimization with two optimizers (issue 14.6), resume (15.10), rank zero (15.15) ---------------
class TwoOptimizers(L.LightningModule):
    """A GAN-like pair: two sub-networks, each stepped by its own optimizer (SGD lr 0.1, Adam lr 1e-2)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.a(x))

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        for opt in (opt_a, opt_b):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()
        self.log("train_loss", F.cross_entropy(self(x), y), on_step=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=1e-2)


def test_manual_optimization_two_optimizers_one_step_axis(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    snaps = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            i = [o is optimizer for o in trainer.optimizers].index(True)
            snaps[(trainer.fit_loop.epoch_loop._batches_that_stepped, i)] = (
                {k: v.clone() for k, v in pl_module.state_dict().items()}, [t.clone() for t in self.batch])

    cb = SharpnessCallback(F.cross_entropy, every=2, tol=1e-6, dtype=torch.float64, preconditioned=False,
                           sinks=[tmp_path / "rows.csv"])
    logger = CSVLogger(tmp_path, name="lg")
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[Snapshot(), cb, LearningRateMonitor("step")], num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TwoOptimizers(), loader())
    assert trainer.global_step == 8  # 4 batches × 2 optimizer steps
    assert [(r["step"], r["optimizer_index"]) for r in cb.history] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    for r in cb.history:  # each optimizer: its own lr and threshold, λ over its own parameters
        assert r["lr"] == (0.1 if r["optimizer_index"] == 0 else 1e-2)
        assert r["threshold"] == pytest.approx(2 / 0.1 if r["optimizer_index"] == 0 else 38 / 1e-2)
        state, batch = snaps[(r["step"], r["optimizer_index"])]
        ref_model = TwoOptimizers()
        ref_model.load_state_dict(state)
        prefix = "a" if r["optimizer_index"] == 0 else "b"
        ref = sharpness(ref_model, F.cross_entropy, tuple(batch), params=[prefix], tol=1e-8, dtype=torch.float64)
        assert r["sharpness"] == pytest.approx(ref.eigenvalue, rel=1e-5)
    # one step axis in metrics.csv: the curvature rows sit on the steps the loggers use (0..3), not global_step
    logged = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    steps_of = lambda key: sorted({int(r["step"]) for r in logged if r.get(key)})  # noqa: E731
    assert steps_of("curvature/optimizer_0/sharpness") == [0, 2] == steps_of("curvature/optimizer_1/sharpness")
    assert set(steps_of("train_loss")) <= {0, 1, 2, 3} and max(steps_of("train_loss")) == 3
    lr_key = next(k for k in logged[0] if k.startswith("lr-SGD"))
    assert steps_of(lr_key) == [0, 1, 2, 3]
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))  # one file, one header, both optimizers
    assert [(int(r["step"]), int(r["optimizer_index"])) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1)]


def test_resume_from_checkpoint_continues_history_warm_started(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(cb, max_steps, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4,
                                                           save_top_k=-1)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Module("adam"), loader(), ckpt_path=ckpt_path)

    first = SharpnessCallback(F.cross_entropy, every=2, tol=1e-5, probe_batch=next(iter(loader())))
    run(first, 4)
    assert [r["step"] for r in first.history] == [0, 2]
    ckpt = next((tmp_path / "ck").glob("*step=4*.ckpt"))
    again = SharpnessCallback(F.cross_entropy, every=2, tol=1e-5, probe_batch=next(iter(loader())))
    run(again, 8, ckpt_path=str(ckpt))
    assert [r["step"] for r in again.history] == [0, 2, 4, 6]
    assert again.history[1]["sharpness"] == pytest.approx(first.history[1]["sharpness"])
    assert again.history[2]["warm_start"] is True


def test_sinks_only_on_global_rank_zero(tmp_path):
    cb = SharpnessCallback(F.cross_entropy, every=1, sinks=[tmp_path / "rows.csv"])

    class Rank1:  # what the callback reads of a Trainer on global rank 1
        global_rank = 1
        optimizers: list = []

    cb.on_train_start(Rank1(), None)
    assert cb.tracker.sinks == []

