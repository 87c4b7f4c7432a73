"""Run under ``torchrun --nproc_per_node 2`` by ``tests/test_framework_fsdp.py``: a real Lightning ``Trainer.fit``
with ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` in ``configure_model``) on CPU/gloo, our ``SharpnessCallback``
measuring every few steps. Each rank saves its rows plus, at every measured step, the gathered parameters and the
union of the ranks' batches, so the test can compute the single-process exact value at the same point."""
from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from curvature.integrations.lightning import SharpnessCallback  # noqa: E402

EVERY, MAX_STEPS = 2, 5


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g)
    return torch.utils.data.TensorDataset(X, X[:, :3].argmax(1))


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


class Snapshot(L.Callback):
    """Before the SharpnessCallback at the same hook: the global θ and the union batch (collectives, all ranks)."""

    def __init__(self):
        self.points: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step % EVERY:
            return
        theta = torch.cat([p.full_tensor().reshape(-1) for p in pl_module.parameters()]).detach().clone()
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, [t.clone() for t in self.batch])
        self.points[step] = {"theta": theta, "batches": parts,
                             "dtensor": all(type(p).__name__ == "DTensor" for p in pl_module.parameters())}


def main(out_dir: str, which: str = "model_parallel") -> None:
    torch.set_num_threads(1)
    snap = Snapshot()
    cb = SharpnessCallback(F.cross_entropy, every=EVERY, k=1, tol=1e-4)
    if which == "fsdp1":  # Lightning's FSDPStrategy: FSDP1 FullyShardedDataParallel (flat parameters)
        from lightning.pytorch.strategies import FSDPStrategy
        strategy = FSDPStrategy(timeout=timedelta(seconds=60))
        Module.configure_model = L.LightningModule.configure_model
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=MAX_STEPS, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[snap, cb], num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=8, shuffle=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Module(), loader)
    rows = [{k: r.get(k) for k in ("step", "sharpness", "loss", "error", "converged")} for r in cb.history]
    torch.save({"rows": rows, "points": snap.points, "world": dist.get_world_size()},
               os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
