"""Tiny transformer classifier for scikit-learn's 8x8 digits, read as 8 row-patches of 8 pixels.

Input (N, 8, 8) float32 in [0, 1], output 10 logits. Attention is written with plain Linear/matmul/softmax
(no nn.MultiheadAttention) so the exported ONNX graph has ordinary MatMul nodes with 2-D weights.
"""
import math

import torch
from torch import nn

D_MODEL, HEADS, FF, LAYERS, SEQ, PATCH, CLASSES = 64, 4, 128, 2, 8, 8, 10


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.k = nn.Linear(D_MODEL, D_MODEL)
        self.v = nn.Linear(D_MODEL, D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.ff1 = nn.Linear(D_MODEL, FF)
        self.ff2 = nn.Linear(FF, D_MODEL)

    def heads(self, t: torch.Tensor) -> torch.Tensor:   # (N, S, D) -> (N, H, S, D/H)
        return t.reshape(t.shape[0], SEQ, HEADS, D_MODEL // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D_MODEL // HEADS), dim=-1)
        ctx = torch.matmul(att, v).transpose(1, 2).reshape(x.shape[0], SEQ, D_MODEL)
        x = x + self.out(ctx)
        return x + self.ff2(torch.relu(self.ff1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(PATCH, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(1, SEQ, D_MODEL))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def build() -> nn.Module:
    """The untrained network; load weights.pt into it with load_state_dict."""
    model = TinyTransformer()
    nn.init.normal_(model.pos, std=0.02)
    return model


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(1, SEQ, PATCH, dtype=torch.float32),)
