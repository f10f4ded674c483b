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
import torch.nn.functional as F
from torch import nn
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from rsmoe.models.experts import ExpertLM
from rsmoe.models.router import LearnedRouter, route_targets

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
    def __init__(self, vision: nn.Module, qformer: QFormer, llm_hidden: int, token_norm: bool = False,
                 prefix_rms: float | None = None):
        super().__init__()
        self.token_norm = token_norm
        self.prefix_rms = prefix_rms
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
        if self.token_norm:
            # Parameter-free LayerNorm per encoder token (InstructBLIP's ViT ends in one): a CNN's
            # post-activation features (EfficientNet: norm ~26) otherwise saturate the Q-Former's fresh
            # cross-attention. Applied here, not in encode(), so cached encoder tokens stay raw.
            image_embeds = nn.functional.layer_norm(image_embeds, image_embeds.shape[-1:])
        if not self.trainable():
            # Stage II: the prefix is a constant of (image, instruction); computed once per sample
            # (rows index into it) and with no autograd bookkeeping.
            with torch.no_grad():
                return self._project(self.qformer(image_embeds, input_ids, attention_mask))
        return self._project(self.qformer(image_embeds, input_ids, attention_mask))

    def _project(self, queries: torch.Tensor) -> torch.Tensor:
        out = self.proj(queries)
        if self.prefix_rms is not None:
            # Each prefix token at the RMS of the LLM's word embeddings: a fresh projection writes tokens
            # ~5x larger (demo: norm 15 vs 3.2), which the LLM's blocks barely change on their way up, so
            # what differs between images never gets read.
            out = out * (self.prefix_rms * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"token_norm={self.token_norm}, prefix_rms={self.prefix_rms}"  # in repr: feature-cache keys hash it

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.qformer.parameters()) or any(p.requires_grad for p in self.proj.parameters())


class RSMoE(nn.Module):
    def __init__(self, visual: VisualPrefix, experts: ExpertLM, expert_names: list[str],
                 learned_router: dict | None = None):
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
        # train.itc_weight: weight of the image-text contrastive term on caption rows (0 = off; enable_itc).
        self.itc_weight = 0.0
        # `model.router=learned`: LearnedRouter's settings ({soft_tokens, width, route_loss_weight}); the
        # module itself exists from Stage II on (`to_stage2` builds it for the local experts).
        self.learned_router = dict(learned_router) if learned_router else None
        self.router: LearnedRouter | None = None
        # (n_local, ...) per-expert tensor -> (n_experts, ...) in expert order. Expert parallelism sets an
        # all-gather over the EP group (the route head's targets need every expert's answer loss); None =
        # this process holds every expert.
        self.expert_gather: Callable[[torch.Tensor], torch.Tensor] | None = None

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
        if self.learned_router is not None:
            emb = self.experts.base.get_input_embeddings().weight
            spec = self.learned_router
            self.router = LearnedRouter(self.experts.hidden_size, expert_ids, soft_tokens=spec["soft_tokens"],
                                        width=spec["width"], seed=seed, route_loss_weight=spec["route_loss_weight"],
                                        token_embeddings=emb).to(device=emb.device, dtype=emb.dtype)
        self.requires_grad_(False)
        if train_qformer:
            self.visual.qformer.requires_grad_(True)
            self.visual.proj.requires_grad_(True)
        for p in self.experts.lora_parameters():
            p.requires_grad_(True)
        if self.router is not None:
            self.router.requires_grad_(True)

    # ------------------------------------------------------------ compute
    def router_outputs(self, prefix: torch.Tensor, router_input_ids: torch.Tensor | None,
                       router_attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The learned router on P prefixes: (soft prompts (P, n_local, k, H), route logits (P, n_local)),
        or (None, None) without one. `router_input_ids`: each prefix's instruction in LLM tokens."""
        if self.router is None:
            return None, None
        if router_input_ids is None:
            raise ValueError("the learned router needs router_input_ids (Processor adds them when model.router=learned)")
        with torch.no_grad():  # the frozen token embeddings of the instruction
            embeds = self.experts.base.get_input_embeddings()(router_input_ids)
        return self.router(prefix, embeds, router_attention_mask)

    @staticmethod
    def expert_rows(prefix: torch.Tensor, row_sample: torch.Tensor, adapter_index: torch.Tensor,
                    soft: torch.Tensor | None) -> torch.Tensor:
        """What each row's expert reads before its prompt: its visual prefix, then (learned router) that
        expert's soft prompts for that prefix. (R, Q[+k], H)."""
        rows = prefix[row_sample]
        if soft is None or soft.shape[2] == 0:
            return rows
        return torch.cat([rows, soft[row_sample, adapter_index].to(rows.dtype)], dim=1)

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
        router_input_ids: torch.Tensor | None = None,
        router_attention_mask: torch.Tensor | None = None,
        row_weight: torch.Tensor | None = None,
        question_rows: torch.Tensor | None = None,
        question_prefix: torch.Tensor | None = None,
        caption_row: torch.Tensor | None = None,
        question_caption_ids: torch.Tensor | None = None,
        question_caption_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rows (R) index prefixes (P) through `row_sample`; give images or a precomputed `prefix` (P,Q,H).
        A prefix is one (image, Q-Former instruction) pair: `prefix_image` (P,) picks its image from
        `pixel_values` (None: one image per prefix).

        Learned router: `router_input_ids`/`mask` (P, L) are the prefixes' instructions in LLM tokens;
        `row_weight` (R,) is 0 for probe rows (a question answered by an expert that does not train on it:
        its loss only picks the route target); `question_rows` (n_local, Nq) the row of each local expert's
        answer to question q, whose prefix is `question_prefix` (Nq,).

        Returns {'loss', 'expert_loss' (n_local,) token-mean per local expert (detached),
        'expert_loss_sum' (n_local,) summed token loss, 'expert_tokens' (n_local,)}, plus with the learned
        router 'route_loss' (the route head's cross-entropy), 'route_acc', 'route_target' (Nq,) and
        'route_losses' (n_experts, Nq), all detached. With `itc_weight` > 0 and `caption_row` (R,) marking
        the rows whose target is a caption, 'itc_loss' (detached) and 'itc_rows'; `question_caption_ids`/`mask`
        (R, T) add the question rows (mask non-empty) to it, each paired with its sample's caption
        (train.itc_questions). A plain dict so ZeRO-3's
        hooks can see the tensors.
        """
        if prefix is None:
            v_in = (pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image)
            prefix = self.visual(*v_in) if self.prefix_fn is None else self.prefix_fn(self.visual, *v_in)
        soft, logits = self.router_outputs(prefix, router_input_ids, router_attention_mask)
        rows = self.expert_rows(prefix, row_sample, adapter_index, soft)
        row_loss, row_tokens = self.experts.forward_by_length(rows, input_ids, attention_mask, labels, adapter_index,
                                                              self.length_groups)
        n = len(self.experts.expert_ids)
        # Probe rows (weight 0) only pick the learned router's targets; they train no adapter.
        weight = torch.ones_like(row_loss) if row_weight is None else row_weight.to(row_loss.dtype)
        zeros = torch.zeros(n, device=row_loss.device, dtype=row_loss.dtype)
        tok = zeros.index_add(0, adapter_index, row_tokens.to(row_loss.dtype) * weight)
        summed = zeros.index_add(0, adapter_index, row_loss * weight)
        if self.loss_per_sample:
            has = (row_tokens > 0).to(row_loss.dtype) * weight
            row_mean = row_loss / row_tokens.clamp(min=1).to(row_loss.dtype)
            expert_loss = zeros.index_add(0, adapter_index, row_mean * weight) / zeros.index_add(0, adapter_index, has).clamp(min=1)
        else:
            expert_loss = summed / tok.clamp(min=1)
        # Sum (not mean) over experts: each adapter's gradient is that of its own loss, whatever the layout.
        loss = expert_loss.sum()
        out = {"loss": loss, "expert_loss": expert_loss.detach(), "expert_loss_sum": summed.detach(),
               "expert_tokens": tok.detach()}
        if self.itc_weight > 0 and caption_row is not None and prefix.requires_grad:
            itc, n_rows = self.itc_loss(prefix, row_sample, input_ids, labels, caption_row,
                                        question_caption=(question_caption_ids, question_caption_mask))
            out["loss"] = out["loss"] + self.itc_weight * itc
            out.update({"itc_loss": itc.detach(), "itc_rows": n_rows})
        if self.router is not None:
            route = self.route_loss(logits, row_loss.detach() / row_tokens.clamp(min=1), question_rows, question_prefix)
            out["loss"] = loss + self.router.route_loss_weight * route.pop("surrogate")
            out.update(route)
        return out

    def enable_itc(self, weight: float, bank: int = 0) -> None:
        """Turn on the contrastive term; `bank`: how many recent caption vectors to keep as extra negatives.
        Call before DeepSpeed wraps the model: the vocabulary's mean word embedding is read once here
        (ZeRO-3 partitions the embedding later). Both are buffers that checkpoints do not save."""
        self.itc_weight = float(weight)
        emb = self.experts.base.get_input_embeddings().weight.detach()
        self.register_buffer("itc_vocab_mean", emb.float().mean(0), persistent=False)
        self.register_buffer("itc_bank", torch.zeros(bank, emb.shape[1]), persistent=False)
        self.itc_bank_size = 0  # filled entries (the newest last)

    def itc_loss(self, prefix: torch.Tensor, row_sample: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                 caption_row: torch.Tensor, temperature: float = 0.07,
                 question_caption: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-text contrastive loss (BLIP-2's ITC) over the caption rows.

        Image side: the row's visual prefix averaged over its queries. Text side: its caption's frozen LLM
        word embeddings, averaged, minus the vocabulary's mean embedding (what every caption shares). No
        new parameters: each prefix is pulled toward its own caption's words in the LLM's input space and
        away from the other captions'. Image-to-text contrasts with the batch's captions and the bank of
        recent ones (the text side is frozen, so a stored vector never goes stale; entries equal to a
        positive are left out); text-to-image with the batch's images. `question_caption` (ids, mask), (R, T):
        a question row whose mask is non-empty joins with its sample's caption as the text, so the prefix
        the Q-Former builds for a question also tells its image apart. Returns (loss, contrasted rows)."""
        q_ids, q_mask = question_caption
        q_row = q_mask.bool().any(1) & ~caption_row if q_mask is not None else None
        rows = (caption_row | q_row if q_row is not None else caption_row).nonzero().flatten()
        n = torch.tensor(float(rows.numel()), device=prefix.device)
        bank = self.itc_bank[self.itc_bank.shape[0] - self.itc_bank_size:].float().clone() if self.itc_bank_size else None
        emb = self.experts.base.get_input_embeddings()
        ids, target = input_ids[rows], labels[rows] != -100
        if q_row is not None:  # a question row's text: its caption's tokens, not its answer's
            use = q_row[rows].unsqueeze(1)
            ids = torch.cat([ids, q_ids[rows]], 1)
            target = torch.cat([target & ~use, q_mask[rows].bool() & use], 1)
        # Exactly one call on every rank, even with no rows: under ZeRO-3 each call all-gathers the table.
        words = emb(ids).float().detach()
        if rows.numel() < 2 and bank is None or rows.numel() == 0:
            return prefix.sum() * 0.0, n  # keeps the graph (ZeRO-3 expects every rank's backward)
        words = (words * target.unsqueeze(-1)).sum(1) / target.sum(1, keepdim=True).clamp(min=1)
        text = F.normalize(words - self.itc_vocab_mean, dim=-1)
        image = F.normalize(prefix[row_sample[rows]].float().mean(1), dim=-1)
        same = torch.arange(rows.numel(), device=prefix.device)
        logits = image @ text.T / temperature
        terms = [F.cross_entropy(logits.T, same)] if rows.numel() >= 2 else []
        if bank is not None:
            extra = image @ bank.T / temperature
            extra = extra.masked_fill((text @ bank.T > 0.999).any(0, keepdim=True), float("-inf"))
            logits = torch.cat([logits, extra], dim=1)
        terms.append(F.cross_entropy(logits, same))
        if self.training and self.itc_bank.shape[0]:
            k = self.itc_bank.shape[0]
            self.itc_bank.copy_(torch.cat([self.itc_bank, text.detach().to(self.itc_bank.dtype)])[-k:])
            self.itc_bank_size = min(k, self.itc_bank_size + rows.numel())
        return sum(terms) / len(terms), n

    def route_loss(self, logits: torch.Tensor, row_mean_loss: torch.Tensor, question_rows: torch.Tensor | None,
                   question_prefix: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The route head's loss: cross-entropy of softmax(logits over every expert) toward the expert whose
        teacher-forced answer loss is lowest.

        Under expert parallelism each rank holds some experts' logits and losses: both are gathered over
        the EP group (`expert_gather`), and this rank's term is the surrogate sum((p - y) * logit) over its
        own experts' logits, with p, y constants: its gradient is exactly the cross-entropy's gradient for
        those logits, so the EP ranks together take the one-process gradient. 'surrogate' is what goes
        into the loss; 'route_loss' is the cross-entropy's value, for logging."""
        zero = logits.sum() * 0.0  # every router parameter stays in the graph (ZeRO reduces them on every rank)
        nq = 0 if question_rows is None else question_rows.shape[1]
        if nq == 0:
            none = torch.zeros((), device=logits.device)
            return {"surrogate": zero, "route_loss": none, "route_acc": none, "route_questions": none}
        gather = self.expert_gather or (lambda t: t)
        losses = gather(row_mean_loss[question_rows].float().contiguous())  # (n_experts, Nq)
        local_logits = logits[question_prefix].t()  # (n_local, Nq)
        all_logits = gather(local_logits.detach().float().contiguous())  # (n_experts, Nq)
        target = route_targets(losses)
        log_p = torch.log_softmax(all_logits, dim=0)
        y = F.one_hot(target, all_logits.shape[0]).t().to(log_p.dtype)
        coeff = (log_p.exp() - y) / nq
        mine = torch.tensor(self.experts.expert_ids if self.expert_gather is not None else range(len(self.experts.expert_ids)),
                            device=coeff.device)
        surrogate = (coeff[mine].to(local_logits.dtype) * local_logits).sum() + zero
        ce = -(log_p * y).sum(dim=0).mean()
        acc = (all_logits.argmax(dim=0) == target).float().mean()
        return {"surrogate": surrogate, "route_loss": ce.detach(), "route_acc": acc.detach(),
                "route_questions": torch.tensor(float(nq), device=logits.device),
                "route_target": target.detach(), "route_losses": losses.detach()}
