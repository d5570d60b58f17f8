"""Model factories for the demo and the benchmarks.

Each factory is an importable callable returning an ``nn.Module``; a group in the
config names it as ``"examples.models:<name>"``. Keep them free of global state:
cohort builds each one on the ``meta`` device first, then on the worker's device.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int = 64, hidden: int = 128, d_out: int = 10, depth: int = 2) -> nn.Module:
    """A plain ReLU MLP: ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def cnn(channels: int = 3, width: int = 16, classes: int = 10) -> nn.Module:
    """A small CIFAR-sized CNN (input ``[B, channels, 32, 32]``), no batch norm."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def bn_cnn(channels: int = 3, width: int = 16, classes: int = 10) -> nn.Module:
    """The small CNN with batch norm after each convolution (input ``[B, channels, 32, 32]``).

    In training, batch norm updates its running statistics in place, which vmap cannot
    batch: cohort trains such a group model by model."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


class TinyTransformer(nn.Module):
    """A tiny causal language model over integer tokens ``[B, T]`` -> logits ``[B, T, vocab]``."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(seq_len, d_model))
        block = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.seq_len = seq_len

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(h)


def tiny_transformer(
    vocab: int = 128, d_model: int = 64, heads: int = 4, layers: int = 2, seq_len: int = 32
) -> nn.Module:
    """A two-layer causal transformer small enough to run many copies at once."""
    return TinyTransformer(vocab, d_model, heads, layers, seq_len)


class Scale(nn.Module):
    """A learnable scale per feature: the smallest model, for measuring the data path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def scale(d: int = 1024) -> nn.Module:
    return Scale(d)
