"""Held-out models for the peer benchmark: small networks trained here on the shared MNIST images.

No onnxopt default was chosen on them (they were added after every default was set), so they test
whether the defaults generalize. Each is a different family from the shared models:

* ``mnist_vit``  -- a small vision transformer (patch-embedding Conv, 2 pre-norm encoder layers
  with 4-head attention, GELU MLP, LayerNorm, mean-pooled tokens), dynamo exporter, dynamic batch;
* ``mnist_mbv2`` -- a MobileNetV2-style CNN (inverted residuals, depthwise convs, ReLU6, unfused
  BatchNorm), TorchScript exporter, dynamic batch;
* ``mnist_gru``  -- a recurrent classifier ("sequential MNIST": the 28 rows are 28 time steps): a
  Linear row embedding, a 2-layer GRU and a Linear head on the last step, TorchScript exporter,
  dynamic batch. The GRU ops stay float in every quantizer; the Gemm/MatMul around them do not.

The shared MNIST folder holds the official *test* set only (10000 images): the first 8000 train,
every 40th of them (200) calibrates, and the last 2000 are the evaluation images, which the
training never saw. Inputs are ``(x / 255 - 0.1307) / 0.3081``, the usual MNIST normalization.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

TRAIN, CALIB_EVERY = 8000, 40
MODELS = ("mnist_vit", "mnist_mbv2", "mnist_gru")


def load_mnist(folder: Path):
    """(images float32 [N,1,28,28] normalized, labels int64 [N]) from the IDX files in ``folder``."""
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, rows, cols).astype(np.float32)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return (x / 255.0 - 0.1307) / 0.3081, y


def _vit(nn, torch):
    class Encoder(nn.Module):
        def __init__(self, dim, heads, hidden):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, t):
            h = self.n1(t)
            t = t + self.attn(h, h, h, need_weights=False)[0]
            return t + self.mlp(self.n2(t))

    class ViT(nn.Module):
        def __init__(self, dim=64, depth=2, heads=4, hidden=128, patch=4):
            super().__init__()
            self.embed = nn.Conv2d(1, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, (28 // patch) ** 2, dim) * 0.02)
            self.blocks = nn.Sequential(*[Encoder(dim, heads, hidden) for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(t)).mean(1))

    return ViT()


def _mbv2(nn, torch):
    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand=4):
            super().__init__()
            mid = cin * expand
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.res = stride == 1 and cin == cout

        def forward(self, t):
            return t + self.body(t) if self.res else self.body(t)

    return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                         Inverted(16, 16, 1), Inverted(16, 24, 2), Inverted(24, 24, 1), Inverted(24, 32, 2),
                         Inverted(32, 32, 1), nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _gru(nn, torch):
    class RowGRU(nn.Module):
        def __init__(self, dim=64, hidden=96):
            super().__init__()
            self.embed = nn.Linear(28, dim)
            self.rnn = nn.GRU(dim, hidden, num_layers=2, batch_first=True)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x):
            seq, _ = self.rnn(torch.relu(self.embed(x.flatten(1, 2))))   # [N, 28 rows, 28] -> [N, 28, hidden]
            return self.head(seq[:, -1])

    return RowGRU()


def build(name: str, folder: Path, log=print, seed=0, epochs=6):
    """(float onnx.ModelProto, calibration feeds, evaluation feeds, evaluation labels) of ``name``."""
    import onnx
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if name not in MODELS:
        raise ValueError(f"unknown model {name}: one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    x, y = load_mnist(folder)
    xtr, ytr = torch.from_numpy(x[:TRAIN]), torch.from_numpy(y[:TRAIN])
    net = {"mnist_vit": _vit, "mnist_mbv2": _mbv2, "mnist_gru": _gru}[name](nn, torch)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.05)
    steps = epochs * ((TRAIN + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(TRAIN, generator=g)
        for i in range(0, TRAIN, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    xev, yev = x[TRAIN:], y[TRAIN:]
    with torch.no_grad():
        acc = float((net(torch.from_numpy(xev)).argmax(1).numpy() == yev).mean())
    log(f"{name}: float accuracy on the {len(yev)} held-out images {100 * acc:.2f} %")
    sample = xtr[:2]
    if name == "mnist_vit":   # the dynamo exporter (torch's default), as a user of a recent torch gets it
        prog = torch.onnx.export(net, (sample,), input_names=["input"], output_names=["logits"], opset_version=18,
                                 dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=1024)}}, dynamo=True)
        model = prog.model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(net, sample, buf, input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
        model = onnx.load_from_string(buf.getvalue())
    calib = [{"input": x[i:i + 1]} for i in range(0, TRAIN, CALIB_EVERY)]
    evalf = [{"input": xev[i:i + 1]} for i in range(len(xev))]
    return model, calib, evalf, yev
