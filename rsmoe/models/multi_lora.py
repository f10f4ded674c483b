"""Several LoRA adapters on one frozen linear layer, selected per batch row.

All experts share one frozen base; each row of a batch carries the index of the adapter it
uses, so all experts run in one batched forward (and one batched `generate`) instead of N model
copies in turn. Adapters are stacked as A: (n, r, in), B: (n, out, r); a row's delta is
x @ A[i]^T @ B[i]^T * alpha / r, the same as one peft LoRA layer with that adapter active.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, n_adapters: int, r: int, alpha: int, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, r, device=dev, dtype=dt))
        # (rows,) adapter slot per batch row; None = base only. Set by `adapters_active`.
        self.adapter_index: torch.Tensor | None = None

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.adapter_index
        if idx is None:
            return y
        if idx.shape[0] != x.shape[0]:
            # generate() with beams repeats each row num_beams times, consecutively.
            idx = idx.repeat_interleave(x.shape[0] // idx.shape[0])
        if self.n_adapters == 1:
            h = F.linear(F.linear(self.dropout(x), self.lora_A[0]), self.lora_B[0])
        else:
            h = self._multi_adapter_delta(self.dropout(x), idx)
        return y + h * self.scaling

    def _multi_adapter_delta(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """All adapters as two dense GEMMs: x @ [A_0;..;A_n]^T, zero the slices of other adapters, @ [B_0|..|B_n]^T.

        Exact per row (the zeroed slices add exact zeros). Costs n x the (rank-r, ~1-2% of the
        layer) LoRA FLOPs, but builds no per-row weight copies: gathering A[idx]/B[idx] saves a
        (rows, in+out, r) tensor per layer for backward (~0.4 GB at the RS-MoE-1B shape, batch 16),
        this saves (rows, L, n*r). Speed on CPU: on par with the gather (bench/train_step.py --lora-micro).
        """
        n, r = self.n_adapters, self.r
        h = F.linear(x, self.lora_A.reshape(n * r, -1))  # (rows, ..., n*r)
        keep = F.one_hot(idx, n).to(h.dtype).repeat_interleave(r, dim=1)  # (rows, n*r)
        h = h * keep.view(keep.shape[0], *([1] * (h.dim() - 2)), n * r)
        return F.linear(h, self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], n * r))

    @torch.no_grad()
    def init_adapter(self, slot: int, generator: torch.Generator) -> None:
        """peft's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter is a no-op."""
        fan_in = self.lora_A.shape[2]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) reduces to this
        a = torch.empty(self.lora_A.shape[1:], dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A[slot].copy_(a.to(self.lora_A.dtype))
        self.lora_B[slot].zero_()

    @torch.no_grad()
    def delta_weight(self, slot: int) -> torch.Tensor:
        """Adapter `slot` as a dense (out, in) weight update in fp32: B @ A * alpha / r."""
        return self.lora_B[slot].detach().float() @ self.lora_A[slot].detach().float() * self.scaling

    @torch.no_grad()
    def merge_adapter(self, slot: int) -> None:
        """Fold adapter `slot` into the base weight (Stage I -> Stage II)."""
        self.base.weight.add_(self.delta_weight(slot).to(self.base.weight.dtype))

    def resize(self, n_adapters: int) -> None:
        """Replace the adapters with `n_adapters` zero slots (init them with `init_adapter`)."""
        dev, dt = self.base.weight.device, self.base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, self.r, self.base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, self.base.out_features, self.r, device=dev, dtype=dt))


def inject_multi_lora(
    model: nn.Module, target_modules: list[str], n_adapters: int, r: int, alpha: int, dropout: float
) -> dict[str, MultiLoRALinear]:
    """Wrap every nn.Linear whose last name is in `target_modules`; returns {module path: wrapper}."""
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]
    if not targets:
        raise ValueError(f"LoRA target_modules {target_modules} match no nn.Linear in {type(model).__name__}")
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoRALinear(mod, n_adapters, r, alpha, dropout)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


@contextmanager
def adapters_active(layers: dict[str, MultiLoRALinear], index: torch.Tensor | None) -> Iterator[None]:
    for layer in layers.values():
        layer.adapter_index = index
    try:
        yield
    finally:
        for layer in layers.values():
            layer.adapter_index = None
