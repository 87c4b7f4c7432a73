"""Reference workloads for the benchmarks: ``(model, loss_fn, batch)`` triples, seeded, no downloads.

Each factory takes ``size`` (``"tiny"`` for the test suite, ``"small"`` for CPU runs, ``"gpu"`` for the
full-size GPU runs: ResNet-18 at 32x32, a GPT-2-small-shaped decoder), ``seed``, ``device`` and ``dtype``
and returns ``Workload(name, model, loss_fn, batch)``:

- ``loss_fn(outputs, targets) -> scalar`` is an ``nn.Module`` with ``reduction="mean"`` (curvlinops needs a
  module with a ``reduction`` attribute; everyone else only calls it);
- ``batch = (inputs, targets)``.

Workloads
---------
``mlp``             digits (sklearn's bundled 8x8 images) -> MLP with tanh -> 10 classes.
``cnn``             digits upsampled to ``res x res`` x 3 channels -> ResNet-style CNN with BatchNorm, in
                    ``train()`` mode (BatchNorm uses batch statistics, as the optimizer sees it).
``gpt``             GPT-2-style pre-LN decoder (LayerNorm, causal ``F.scaled_dot_product_attention``, tied
                    embeddings) on bytes of the Python standard library's own ``.py`` sources.
``ln_transformer``  a one-block pre-LN Transformer classifier on digits (8 rows = 8 tokens) with explicit
                    softmax attention: every peer can differentiate it twice, but curvlinops' ``jvp(jacrev)``
                    Hessian is wrong through affine ``layer_norm`` (see shared/README.md, "Known autograd traps").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from curvature.peers import trainable_params  # our flat parameter order, one definition

__all__ = ["Workload", "WORKLOADS", "SIZES", "make", "mlp", "cnn", "gpt", "ln_transformer",
           "trainable_params", "num_params", "digits", "stdlib_bytes", "SeqCrossEntropy"]

SIZES = ("tiny", "small", "gpu")


@dataclass
class Workload:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    size: str = "small"
    notes: str = ""

    @property
    def num_params(self) -> int:
        return num_params(self.model)

    @property
    def batch_size(self) -> int:
        return int(self.batch[0].shape[0])

    def as_tuple(self) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        return self.model, self.loss_fn, self.batch


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_params(model))


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


# ---------------------------------------------------------------------------------------------- data
def digits(n: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(X, y)`` from ``sklearn.datasets.load_digits`` (1,797 bundled images), standardised, shuffled."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float64)
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X, y = X[perm], y[perm]
    if n is not None:
        if n > len(y):  # repeat (with a different shuffle) to reach large batches
            reps = math.ceil(n / len(y))
            idx = torch.cat([torch.randperm(len(y), generator=g) for _ in range(reps)])[:n]
            X, y = X[idx], y[idx]
        else:
            X, y = X[:n], y[:n]
    return X.to(dtype), y


_STDLIB_CACHE: dict[int, bytes] = {}


def stdlib_bytes(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated bytes of the ``.py`` files in the directory of the ``os`` module (sorted by name)."""
    if max_bytes in _STDLIB_CACHE:
        return _STDLIB_CACHE[max_bytes]
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), "rb") as fh:
                b = fh.read()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if len(data) < 10_000:
        raise RuntimeError(f"found only {len(data)} bytes of stdlib source in {root}")
    _STDLIB_CACHE[max_bytes] = data
    return data


def byte_batch(batch_size: int, seq_len: int, seed: int = 0):
    """``(x, y)`` of shape ``(B, T)``: random windows of stdlib source, ``y`` shifted by one byte."""
    data = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    win = data[idx]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


class SeqCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy over ``(B, T, V)`` logits and ``(B, T)`` targets, mean over all tokens."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return super().forward(input.reshape(-1, input.shape[-1]), target.reshape(-1))


# ---------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, d_out: int):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


_MLP = {"tiny": (16, 1, 64), "small": (128, 2, 512), "gpu": (1024, 4, 1797)}


def mlp(size: str = "small", seed: int = 0, device="cpu", dtype=torch.float32, width: int | None = None,
        depth: int | None = None, batch_size: int | None = None) -> Workload:
    _check_size(size)
    w, dpt, b = _MLP[size]
    w, dpt, b = width or w, depth or dpt, batch_size or b
    torch.manual_seed(seed)
    model = MLP(64, w, dpt, 10).to(device=device, dtype=dtype)
    X, y = digits(b, seed=seed, dtype=dtype)
    return Workload("mlp", model, nn.CrossEntropyLoss(), (X.to(device), y.to(device)), size,
                    f"MLP 64-{w}x{dpt}-10 tanh, digits batch {b}")


# ---------------------------------------------------------------------------------------------- CNN
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max-pool); ``blocks=(2, 2, 2, 2), width=64`` is ResNet-18."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, num_classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c = [], width
        for i, nb in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(nb):
                layers.append(BasicBlock(c, c_out, 2 if (j == 0 and i > 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# size -> (blocks, width, resolution, batch)
_CNN = {"tiny": ((1, 1), 4, 8, 16), "small": ((1, 1, 1), 16, 16, 128), "gpu": ((2, 2, 2, 2), 64, 32, 256)}


def cnn(size: str = "small", seed: int = 0, device="cpu", dtype=torch.float32, train: bool = True,
        batch_size: int | None = None) -> Workload:
    _check_size(size)
    blocks, width, res, b = _CNN[size]
    b = batch_size or b
    torch.manual_seed(seed)
    model = ResNet(blocks, width).to(device=device, dtype=dtype)
    model.train(train)
    X, y = digits(b, seed=seed, dtype=dtype)
    img = X.view(-1, 1, 8, 8)
    if res != 8:
        img = F.interpolate(img, size=(res, res), mode="bilinear", align_corners=False)
    img = img.expand(-1, 3, -1, -1).contiguous()
    name = "resnet18" if size == "gpu" else "cnn"
    return Workload(name, model, nn.CrossEntropyLoss(), (img.to(device), y.to(device)), size,
                    f"ResNet blocks={blocks} width={width} BatchNorm ({'train' if train else 'eval'} mode), "
                    f"digits at {res}x{res}x3, batch {b}")


# ---------------------------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, attn: str):
        super().__init__()
        self.n_head, self.attn = n_head, attn
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attn == "sdpa":  # PyTorch's default dispatch: fused kernels (no double backward)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.attn == "sdpa_math":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.attn == "explicit":
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        else:
            raise ValueError(self.attn)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, attn: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head, attn)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LN GPT-2-style decoder over bytes (vocab 256) with tied input/output embeddings."""

    def __init__(self, d: int, n_layer: int, n_head: int, block_size: int, vocab: int = 256, attn: str = "sdpa"):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList([Block(d, n_head, attn) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied: appears once in named_parameters()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_attention(self, attn: str) -> None:
        for b in self.blocks:
            b.attn.attn = attn

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


# size -> (d, layers, heads, seq_len, batch)
_GPT = {"tiny": (32, 1, 2, 16, 4), "small": (128, 2, 4, 64, 16), "gpu": (768, 12, 12, 256, 8)}


def gpt(size: str = "small", seed: int = 0, device="cpu", dtype=torch.float32, attn: str = "sdpa",
        batch_size: int | None = None) -> Workload:
    _check_size(size)
    d, L, H, T, b = _GPT[size]
    b = batch_size or b
    torch.manual_seed(seed)
    model = GPT(d, L, H, T, attn=attn).to(device=device, dtype=dtype)
    x, y = byte_batch(b, T, seed=seed)
    name = "gpt2-small" if size == "gpu" else "gpt"
    return Workload(name, model, SeqCrossEntropy(), (x.to(device), y.to(device)), size,
                    f"pre-LN GPT d={d} L={L} H={H} T={T} tied embeddings, attention={attn}, "
                    f"stdlib bytes batch {b}")


# ---------------------------------------------------------------------------------------------- LN Transformer
class LNTransformer(nn.Module):
    """Digits as 8 tokens of 8 pixels; one pre-LN block with explicit softmax attention; mean-pool; linear."""

    def __init__(self, d: int, n_head: int, n_layer: int = 1):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.02 * torch.randn(8, d))
        self.blocks = nn.ModuleList([Block(d, n_head, "explicit") for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)
        with torch.no_grad():  # non-trivial affine LayerNorm parameters (as after some training)
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h).mean(1))


_LNT = {"tiny": (16, 2, 1, 32), "small": (64, 4, 1, 256), "gpu": (256, 8, 4, 1797)}


def ln_transformer(size: str = "small", seed: int = 0, device="cpu", dtype=torch.float32,
                   batch_size: int | None = None) -> Workload:
    _check_size(size)
    d, H, L, b = _LNT[size]
    b = batch_size or b
    torch.manual_seed(seed)
    model = LNTransformer(d, H, L).to(device=device, dtype=dtype)
    X, y = digits(b, seed=seed, dtype=dtype)
    return Workload("ln_transformer", model, nn.CrossEntropyLoss(), (X.to(device), y.to(device)), size,
                    f"pre-LN Transformer d={d} H={H} L={L}, explicit attention, affine LayerNorm, digits batch {b}")


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "mlp": mlp, "cnn": cnn, "gpt": gpt, "ln_transformer": ln_transformer,
}


def make(name: str, size: str = "small", seed: int = 0, device="cpu", dtype=torch.float32, **kw: Any) -> Workload:
    """Build workload ``name`` (a key of :data:`WORKLOADS`)."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name](size=size, seed=seed, device=device, dtype=dtype, **kw)
