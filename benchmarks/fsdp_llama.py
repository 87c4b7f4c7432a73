"""Sharpness of an HF Llama trained with FSDP2 (``fully_shard``), built from a config (no downloads).

    torchrun --nproc_per_node 2 benchmarks/fsdp_llama.py                 # CPU, gloo
    torchrun --nproc_per_node 8 benchmarks/fsdp_llama.py --device cuda --hidden 2048 --layers 16   # GPUs, nccl

Each rank holds 1/world of the parameters and of every curvature vector; HVPs are finite differences through
FSDP's own forward and backward (fused SDPA attention, as in training).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from curvature.sharded import ShardedHessianOperator, sharded_lanczos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="Lanczos steps")
    args = ap.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, rank % max(torch.cuda.device_count(), 1)) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial model on every rank
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq, tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(1 + rank)  # this rank's data shard
    def batch():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        return {"input_ids": ids, "labels": ids}, ids

    def loss_fn(out, _targets):  # the model's own (fused) loss
        return out.loss

    for step in range(3):  # a few training steps
        inputs, _ = batch()
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()

    t0 = time.perf_counter()
    op = ShardedHessianOperator(model, loss_fn, batch())
    eigenvalues, basis = sharded_lanczos(op, k=3, steps=args.steps)
    if rank == 0:
        print(f"n = {op.global_n:,} parameters, {op.shape[0]:,} on this rank; loss {op.loss:.4f}")
        print(f"top-3 Hessian eigenvalues {[round(float(x), 4) for x in eigenvalues]} "
              f"({op.num_hvps} HVPs, {time.perf_counter() - t0:.1f} s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
