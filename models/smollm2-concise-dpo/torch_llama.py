"""A small PyTorch llama that runs a llama-architecture GGUF's own (dequantized) weights,
with LoRA on its projections: what train.py optimizes.

It reads tensors in llama.cpp's layout (Q/K rows already permuted for llama.cpp's "normal"
RoPE, which rotates adjacent pairs), so the trained LoRA A/B matrices export to llama.cpp's
adapter format without any re-permutation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import nn

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class LoraLinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen and A, B trained (B starts at zero)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        n_out, n_in = weight.shape
        self.lora_a = nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        if self.enabled:
            y = y + (x @ self.lora_a.T @ self.lora_b.T) * self.scale
        return y


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's normal RoPE: rotates (x0, x1), (x2, x3), ... by position-dependent angles."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)


class TorchLlama(nn.Module):
    def __init__(self, path: str | Path, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        reader = GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if f.types and len(f.data) == 1}
        self.n_layers = int(meta["llama.block_count"])
        self.n_head = int(meta["llama.attention.head_count"])
        self.n_head_kv = int(meta["llama.attention.head_count_kv"])
        self.eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
        self.rope_base = float(meta.get("llama.rope.freq_base", 10000.0))
        self.rank, self.alpha = rank, alpha
        tensors = {t.name: t for t in reader.tensors}

        def load(name: str) -> torch.Tensor:
            t = tensors[name]
            values = dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

        self.register_buffer("token_embd", load("token_embd.weight"), persistent=False)
        self.register_buffer("output_norm", load("output_norm.weight"), persistent=False)
        output = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        self.register_buffer("output", load(output), persistent=False)
        self.blocks = nn.ModuleList()
        for i in range(self.n_layers):
            block = nn.Module()
            block.attn_norm = nn.Parameter(load(f"blk.{i}.attn_norm.weight"), requires_grad=False)
            block.ffn_norm = nn.Parameter(load(f"blk.{i}.ffn_norm.weight"), requires_grad=False)
            for name in PROJECTIONS:
                setattr(block, name, LoraLinear(load(f"blk.{i}.{name}.weight"), rank, alpha))
            self.blocks.append(block)
        self.head_dim = self.token_embd.shape[1] // self.n_head

    def lora_enabled(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, LoraLinear):
                module.enabled = enabled

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """llama.cpp adapter tensor names -> values (lora_a: (r, in), lora_b: (out, r))."""
        out = {}
        for i, block in enumerate(self.blocks):
            for name in PROJECTIONS:
                layer = getattr(block, name)
                out[f"blk.{i}.{name}.weight.lora_a"] = layer.lora_a.detach()
                out[f"blk.{i}.{name}.weight.lora_b"] = layer.lora_b.detach()
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (batch, seq) -> logits (batch, seq, vocab); causal, positions from 0."""
        batch, seq = tokens.shape
        x = self.token_embd[tokens]
        positions = torch.arange(seq, dtype=torch.float32)
        inv_freq = self.rope_base ** (-torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = positions[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        group = self.n_head // self.n_head_kv
        for block in self.blocks:
            h = _rms_norm(x, block.attn_norm, self.eps)
            q = block.attn_q(h).view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
            k = block.attn_k(h).view(batch, seq, self.n_head_kv, self.head_dim).transpose(1, 2)
            v = block.attn_v(h).view(batch, seq, self.n_head_kv, self.head_dim).transpose(1, 2)
            q, k = _rope_adjacent(q, cos, sin), _rope_adjacent(k, cos, sin)
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.attn_output(attn.transpose(1, 2).reshape(batch, seq, -1))
            h = _rms_norm(x, block.ffn_norm, self.eps)
            x = x + block.ffn_down(nn.functional.silu(block.ffn_gate(h)) * block.ffn_up(h))
        return _rms_norm(x, self.output_norm, self.eps) @ self.output.T
