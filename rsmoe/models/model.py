"""RS-MoE: frozen vision encoder -> instruction-aware Q-Former -> projection -> experts.

The visual side (`VisualPrefix`) turns (image, instruction) into Q prefix vectors in the LLM's
embedding space. The experts (`ExpertLM`) read [prefix | prompt | target] rows, each row with its
expert's adapter. Stage I has one adapter (the "LLM Block"); Stage II merges it into the base and
starts one fresh adapter per expert, so every expert begins as the Stage I model.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from rsmoe.models.experts import ExpertLM

log = logging.getLogger(__name__)


class QFormer(nn.Module):
    """InstructBLIP's Q-Former with its learned queries; the instruction shares self-attention."""

    def __init__(self, config: InstructBlipQFormerConfig, num_query_tokens: int, qformer: nn.Module | None = None):
        super().__init__()
        # A loaded checkpoint's Q-Former is used as is (no throw-away random one built first).
        self.qformer = qformer if qformer is not None else InstructBlipQFormerModel(config)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range)

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[-1]

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, q = image_embeds.shape[0], self.query_tokens.shape[1]
        queries = self.query_tokens.expand(b, -1, -1)
        mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        out = self.qformer(
            input_ids=input_ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return out.last_hidden_state[:, :q]


class VisionTokens(nn.Module):
    """Adapts a ViT (last_hidden_state) to the common (B, T, D) token-grid interface."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.hidden_size = vit.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values).last_hidden_state


class VisualPrefix(nn.Module):
    def __init__(self, vision: nn.Module, qformer: QFormer, llm_hidden: int):
        super().__init__()
        self.vision = vision
        self.vision.requires_grad_(False)
        self.qformer = qformer
        self.proj = nn.Linear(qformer.hidden_size, llm_hidden)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One prefix per instruction row. `image_index` (P,) names each row's image in `pixel_values`
        (several instructions about one image: the frozen encoder still sees that image once);
        None = row i reads image i."""
        return self.from_image_embeds(self.encode(pixel_values), input_ids, attention_mask, image_index)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen vision encoder's tokens (B, T, D), without autograd state."""
        self.vision.eval()  # frozen: no dropout, running stats untouched
        with torch.no_grad():
            return self.vision(pixel_values.to(self.proj.weight.dtype))

    def from_image_embeds(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q-Former + projection on encoder tokens (`encode`'s output; a feature cache may supply them)."""
        if image_index is not None:
            image_embeds = image_embeds[image_index]
        if not self.trainable():
            # Stage II: the prefix is a constant of (image, instruction); computed once per sample
            # (rows index into it) and with no autograd bookkeeping.
            with torch.no_grad():
                return self.proj(self.qformer(image_embeds, input_ids, attention_mask))
        return self.proj(self.qformer(image_embeds, input_ids, attention_mask))

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.qformer.parameters()) or any(p.requires_grad for p in self.proj.parameters())


class RSMoE(nn.Module):
    def __init__(self, visual: VisualPrefix, experts: ExpertLM, expert_names: list[str]):
        super().__init__()
        self.visual = visual
        self.experts = experts
        self.expert_names = list(expert_names)
        # Per-sample loss: each row's (a sample's target for one expert) mean token loss, then the mean over
        # the expert's rows; False: the mean over all of the expert's target tokens (long captions weigh more).
        self.loss_per_sample = False
        # Optional replacement for `self.visual(...)` in training forwards, called as
        # prefix_fn(visual, pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image). Expert
        # parallelism sets one that splits the frozen visual work over the ranks sharing a batch.
        self.prefix_fn: Callable[..., torch.Tensor] | None = None
        # Training rows run as this many sub-batches of similar length (train.length_groups; 1 = one batch).
        self.length_groups = 1

    # ------------------------------------------------------------ stages
    def trainable_stage1(self) -> None:
        self.requires_grad_(False)
        self.visual.qformer.requires_grad_(True)
        self.visual.proj.requires_grad_(True)
        for p in self.experts.lora_parameters():
            p.requires_grad_(True)

    def to_stage2(self, expert_ids: list[int], seed: int, all_names: list[str], train_qformer: bool = False) -> None:
        """Merge the Stage I adapter into the base; one fresh adapter per (local) expert.

        `expert_ids` index `all_names` (the config's experts); this model then answers to those names."""
        self.experts.merge_and_reset(expert_ids, seed)
        self.expert_names = [all_names[i] for i in expert_ids]
        self.requires_grad_(False)
        if train_qformer:
            self.visual.qformer.requires_grad_(True)
            self.visual.proj.requires_grad_(True)
        for p in self.experts.lora_parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------ compute
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        adapter_index: torch.Tensor,
        row_sample: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        prefix_image: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rows (R) index prefixes (P) through `row_sample`; give images or a precomputed `prefix` (P,Q,H).
        A prefix is one (image, Q-Former instruction) pair: `prefix_image` (P,) picks its image from
        `pixel_values` (None: one image per prefix).

        Returns {'loss', 'expert_loss' (n_local,) token-mean per local expert (detached),
        'expert_loss_sum' (n_local,) summed token loss, 'expert_tokens' (n_local,)}. A plain dict so
        ZeRO-3's hooks can see the tensors.
        """
        if prefix is None:
            v_in = (pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image)
            prefix = self.visual(*v_in) if self.prefix_fn is None else self.prefix_fn(self.visual, *v_in)
        row_loss, row_tokens = self.experts.forward_by_length(prefix[row_sample], input_ids, attention_mask, labels,
                                                              adapter_index, self.length_groups)
        n = len(self.experts.expert_ids)
        zeros = torch.zeros(n, device=row_loss.device, dtype=row_loss.dtype)
        tok = zeros.index_add(0, adapter_index, row_tokens.to(row_loss.dtype))
        summed = zeros.index_add(0, adapter_index, row_loss)
        if self.loss_per_sample:
            has = (row_tokens > 0).to(row_loss.dtype)
            row_mean = row_loss / row_tokens.clamp(min=1).to(row_loss.dtype)
            expert_loss = zeros.index_add(0, adapter_index, row_mean) / zeros.index_add(0, adapter_index, has).clamp(min=1)
        else:
            expert_loss = summed / tok.clamp(min=1)
        # Sum (not mean) over experts: each adapter's gradient is that of its own loss, whatever the layout.
        loss = expert_loss.sum()
        return {"loss": loss, "expert_loss": expert_loss.detach(), "expert_loss_sum": summed.detach(),
                "expert_tokens": tok.detach()}
