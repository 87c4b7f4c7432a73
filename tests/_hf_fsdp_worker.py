"""Run under ``torchrun --nproc_per_node 2`` by ``tests/test_framework_fsdp.py``: a real ``transformers.Trainer``
with FSDP2 through accelerate (``fsdp="full_shard"``, ``fsdp_config={"version": 2}``, ``use_cpu=True``) on
CPU/gloo, a tiny GPT-2 built from a config, our HF ``SharpnessCallback``. Each rank saves its rows, its probe
batch, and at every measured step the gathered parameters, for the single-process exact reference."""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformers  # noqa: E402

from curvature.integrations.transformers import SharpnessCallback  # noqa: E402
from test_transformers_callback import ByteChunks, make_model  # noqa: E402  (the tiny GPT-2 and its bytes)

EVERY, MAX_STEPS = 2, 4


class Snapshot(transformers.TrainerCallback):
    """Before the SharpnessCallback at the same event: the global θ in ``named_parameters`` order (collective)."""

    def __init__(self):
        self.points: dict[int, dict] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step % EVERY:
            return
        params = list(model.parameters())
        self.points[state.global_step] = {
            "theta": torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                                for p in params]).clone(),
            "dtensor": any(type(p).__name__ == "DTensor" for p in params)}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "out"), max_steps=MAX_STEPS, per_device_train_batch_size=2,
        learning_rate=1e-3, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, fsdp="full_shard",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}, ddp_timeout=60)
    snap = Snapshot()
    cb = SharpnessCallback(every=EVERY, k=1, tol=1e-4)
    trainer = transformers.Trainer(model=make_model(), args=args, train_dataset=ByteChunks(32),
                                   callbacks=[snap, cb])
    cb.attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    rows = [{k: r.get(k) for k in ("step", "sharpness", "loss", "error", "converged")} for r in cb.history]
    probe = {k: v.clone() for k, v in cb.probe_batch.items()} if isinstance(cb.probe_batch, dict) else cb.probe_batch
    rank = dist.get_rank()
    torch.save({"rows": rows, "points": snap.points, "probe": probe, "world": dist.get_world_size(),
                "distributed_type": str(trainer.accelerator.state.distributed_type),
                "fsdp_plugin_given": trainer.args.fsdp_plugin_args is not None,
                "model_type": type(trainer.model_wrapped).__name__},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
