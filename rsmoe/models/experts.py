"""The experts: one frozen base causal LM, one LoRA adapter per expert, one batched forward.

Rows of a batch are (visual prefix, prompt, target) triples, each tagged with the adapter slot
of the expert it trains or queries. Global expert ids (position in `model.experts`) map to local
slots, so a rank holding a subset of experts (expert parallelism) uses the same code.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from rsmoe.models.multi_lora import MultiLoRALinear, adapters_active, inject_multi_lora


def expert_generator(seed: int, expert_id: int, layer_id: int) -> torch.Generator:
    # Seeded by the *global* expert id, so an expert starts identical whichever rank holds it.
    return torch.Generator().manual_seed(seed * 1_000_003 + expert_id * 10_007 + layer_id)


class ExpertLM(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        expert_ids: list[int],
        *,
        r: int,
        alpha: int,
        dropout: float,
        target_modules: list[str],
        seed: int,
    ):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.expert_ids = list(expert_ids)
        self.target_modules = list(target_modules)
        self.lora_r, self.lora_alpha, self.lora_dropout = r, alpha, dropout
        self.lora_layers = inject_multi_lora(base, target_modules, len(expert_ids), r, alpha, dropout)
        self.init_adapters(seed)

    # ------------------------------------------------------------ adapters
    @property
    def hidden_size(self) -> int:
        return self.base.get_input_embeddings().weight.shape[1]

    def slot_of(self, expert_id: int) -> int:
        return self.expert_ids.index(expert_id)

    def init_adapters(self, seed: int) -> None:
        for layer_id, layer in enumerate(self.lora_layers.values()):
            for slot, eid in enumerate(self.expert_ids):
                layer.init_adapter(slot, expert_generator(seed, eid, layer_id))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward, with the adapters that were active in its forward.

        The adapter index is module state set only for the duration of the forward, so a plain
        checkpoint would recompute the layer without the adapters (and torch fails on the
        mismatch). `context_fn` captures the index at forward time and re-activates it for the
        recomputation.
        """
        layers = self.lora_layers

        def context_fn():
            first = next(iter(layers.values()), None)
            idx = first.adapter_index if first is not None else None
            return contextlib.nullcontext(), adapters_active(layers, idx)

        self.base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
        )

    def merge_and_reset(self, expert_ids: list[int], seed: int) -> None:
        """Stage I -> II: fold the single adapter into the base, then one fresh adapter per expert."""
        assert all(layer.n_adapters == 1 for layer in self.lora_layers.values()), "merge expects one adapter"
        for layer in self.lora_layers.values():
            layer.merge_adapter(0)
            layer.resize(len(expert_ids))
        self.expert_ids = list(expert_ids)
        self.init_adapters(seed)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.lora_layers.values() for p in (layer.lora_A, layer.lora_B)]

    def adapter_tensors(self, slot: int, state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module path: (A (r, in), B (out, r))} of adapter `slot`, from the live parameters or from
        `state` (this module's own state dict, e.g. gathered under ZeRO-3). The file format is
        rsmoe.io.adapters' business (peft's); this is only the slot layout."""
        if state is None:
            return {p: (l.lora_A[slot].detach(), l.lora_B[slot].detach()) for p, l in self.lora_layers.items()}
        return {p: (state[f"base.{p}.lora_A"][slot], state[f"base.{p}.lora_B"][slot]) for p in self.lora_layers}

    @torch.no_grad()
    def load_adapter_tensors(self, slot: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], where: str = "adapter") -> None:
        """Copy one adapter ({module path: (A, B)}, as `adapter_tensors` gives it) into `slot`."""
        missing = [p for p in self.lora_layers if p not in tensors]
        if missing:
            raise KeyError(f"{where}: adapter has no LoRA weights for {missing[:3]}; it was trained for another base")
        for path, layer in self.lora_layers.items():
            a, b = tensors[path]
            if a.shape != layer.lora_A.shape[1:] or b.shape != layer.lora_B.shape[1:]:
                raise ValueError(f"{where}: {path} has LoRA shapes {tuple(a.shape)}/{tuple(b.shape)}, this model "
                                 f"{tuple(layer.lora_A.shape[1:])}/{tuple(layer.lora_B.shape[1:])}")
            layer.lora_A[slot].copy_(a)
            layer.lora_B[slot].copy_(b)

    def adapter_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Adapter `slot` as a flat copy ({path}.lora_A / {path}.lora_B), for comparisons."""
        return {f"{p}.lora_{ab}": t.clone() for p, pair in self.adapter_tensors(slot).items() for ab, t in zip("AB", pair)}

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base LM's weights under its own key names (the LoRA wrappers' `.base.` removed), as fp32 copies."""
        return {
            k.replace(".base.weight", ".weight").replace(".base.bias", ".bias"): v.detach().clone().float()
            for k, v in self.base.state_dict().items()
            if ".lora_" not in k
        }

    # ------------------------------------------------------------ compute
    def embed_rows(self, prefix: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        tok = self.base.get_input_embeddings()(input_ids)
        return torch.cat([prefix.to(tok.dtype), tok], dim=1)

    def forward(
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        adapter_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row summed token loss and token count. prefix: (R,Q,H); ids/mask/labels: (R,L)."""
        rows, q = prefix.shape[:2]
        embeds = self.embed_rows(prefix, input_ids)
        mask = torch.cat([attention_mask.new_ones(rows, q), attention_mask], dim=1)
        if is_right_padded(attention_mask):
            # Causal attention never lets a real token see the right padding after it, and padded
            # positions carry no loss: the plain causal mask gives the same loss and lets SDPA use
            # its is_causal (flash) kernel instead of a materialised (rows, 1, L, L) mask.
            mask = None
        with adapters_active(self.lora_layers, adapter_index):
            hidden = self.base.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # Predict token t+1 from position t; only target positions go through the (large) LM head.
        shifted = torch.cat([labels.new_full((rows, q), -100), labels], dim=1)[:, 1:]
        hidden = hidden[:, :-1]
        sel = shifted != -100
        logits = self.base.get_output_embeddings()(hidden[sel]).float()
        tok_loss = F.cross_entropy(logits, shifted[sel], reduction="none")
        row_of_tok = torch.arange(rows, device=labels.device).unsqueeze(1).expand_as(shifted)[sel]
        row_loss = torch.zeros(rows, device=tok_loss.device, dtype=tok_loss.dtype).index_add(0, row_of_tok, tok_loss)
        row_tokens = sel.sum(dim=1)
        return row_loss, row_tokens

    def forward_by_length(
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        adapter_index: torch.Tensor,
        groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, with the rows run as `groups` sub-batches of similar length, each cut to its own
        longest row (`length_groups`) instead of the batch's. Right padding is never attended to and carries
        no loss, so each row's loss is the same function of its tokens as in `forward` (equal up to float
        rounding: the kernels see other shapes); only fewer padded positions are computed."""
        if groups <= 1 or input_ids.shape[0] <= 1 or not is_right_padded(attention_mask):
            return self.forward(prefix, input_ids, attention_mask, labels, adapter_index)
        lengths = attention_mask.sum(dim=1).tolist()
        parts = length_groups(lengths, groups)
        losses, tokens = [], []
        for rows in parts:
            idx = torch.tensor(rows, device=input_ids.device)
            cut = max(1, max(lengths[r] for r in rows))
            row_loss, row_tokens = self.forward(prefix[idx], input_ids[idx, :cut], attention_mask[idx, :cut],
                                                labels[idx, :cut], adapter_index[idx])
            losses.append(row_loss)
            tokens.append(row_tokens)
        back = torch.empty(len(lengths), dtype=torch.long, device=input_ids.device)
        back[torch.tensor([r for rows in parts for r in rows], device=input_ids.device)] = torch.arange(len(lengths), device=input_ids.device)
        return torch.cat(losses)[back], torch.cat(tokens)[back]

    @torch.no_grad()
    def generate(
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        adapter_index: torch.Tensor,
        **gen_kwargs,
    ) -> torch.Tensor:
        """Batched generation: every row with its own adapter, all rows in one `generate` call.

        `input_ids` are LEFT-padded prompts. The padding is moved in front of the visual prefix,
        so each row reads [pad.. | prefix | prompt] and generation continues right after the prompt.
        """
        rows, q = prefix.shape[:2]
        tok = self.base.get_input_embeddings()(input_ids)
        prefix = prefix.to(tok.dtype)
        n_pad = (attention_mask == 0).sum(dim=1).tolist()
        embeds = torch.stack([torch.cat([tok[i, :p], prefix[i], tok[i, p:]]) for i, p in enumerate(n_pad)])
        mask = torch.cat([attention_mask.new_ones(rows, q), attention_mask], dim=1)
        mask = torch.stack([torch.cat([mask[i, q : q + p], mask[i, :q], mask[i, q + p :]]) for i, p in enumerate(n_pad)])
        with adapters_active(self.lora_layers, adapter_index):
            return self.base.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)


def length_groups(lengths: list[int], k: int) -> list[list[int]]:
    """Rows split into exactly min(k, rows) groups of similar length, minimising the padded positions
    sum(len(group) * max length in group): the optimal split of the rows sorted by length (dynamic
    programme, O(k n^2), n = rows per batch). Each group is a list of row indices, longest group last."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, k = len(order), max(1, min(k, len(lengths)))
    srt = [lengths[i] for i in order]
    inf = float("inf")
    # best[g][j]: least cost of the first j sorted rows in g groups; cut[g][j]: where the last group starts.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for g in range(1, k + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):  # last group = sorted rows i..j-1, padded to srt[j-1]
                c = best[g - 1][i] + (j - i) * srt[j - 1]
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    groups, j = [], n
    for g in range(k, 0, -1):
        i = cut[g][j]
        groups.append(order[i:j])
        j = i
    return groups[::-1]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros (positions are then 0..L-1 with or without the mask)."""
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


__all__ = ["ExpertLM", "MultiLoRALinear", "expert_generator"]
