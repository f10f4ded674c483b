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
from transformers import (
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from rsmoe.config import ModelArgs
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
        self.vision.eval()  # frozen: no dropout, running stats untouched
        with torch.no_grad():
            image_embeds = self.vision(pixel_values.to(self.proj.weight.dtype))
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
        # Optional replacement for `self.visual(...)` in training forwards, called as
        # prefix_fn(visual, pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image). Expert
        # parallelism sets one that splits the frozen visual work over the ranks sharing a batch.
        self.prefix_fn: Callable[..., torch.Tensor] | None = None

    # ------------------------------------------------------------ stages
    def trainable_stage1(self) -> None:
        self.requires_grad_(False)
        self.visual.qformer.requires_grad_(True)
        self.visual.proj.requires_grad_(True)
        for p in self.experts.lora_parameters():
            p.requires_grad_(True)

    def to_stage2(self, expert_ids: list[int], seed: int, train_qformer: bool = False) -> None:
        """Merge the Stage I adapter into the base; one fresh adapter per (local) expert."""
        self.experts.merge_and_reset(expert_ids, seed)
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
        'expert_tokens' (n_local,)}. A plain dict so ZeRO-3's hooks can see the tensors.
        """
        if prefix is None:
            v_in = (pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image)
            prefix = self.visual(*v_in) if self.prefix_fn is None else self.prefix_fn(self.visual, *v_in)
        row_loss, row_tokens = self.experts(prefix[row_sample], input_ids, attention_mask, labels, adapter_index)
        n = len(self.experts.expert_ids)
        tok = torch.zeros(n, device=row_loss.device, dtype=row_loss.dtype).index_add(0, adapter_index, row_tokens.to(row_loss.dtype))
        summed = torch.zeros(n, device=row_loss.device, dtype=row_loss.dtype).index_add(0, adapter_index, row_loss)
        expert_loss = summed / tok.clamp(min=1)
        # Sum (not mean) over experts: each adapter's gradient is that of its own loss, whatever the layout.
        loss = expert_loss.sum()
        return {"loss": loss, "expert_loss": expert_loss.detach(), "expert_tokens": tok.detach()}


# ---------------------------------------------------------------- builders


def _resolve(spec: str):
    from rsmoe.assets import resolve_path

    return resolve_path(spec)


def build_tokenizers(m: ModelArgs):
    """(llm tokenizer, qformer tokenizer) from local paths only."""
    from transformers import AutoTokenizer

    llm_tok_path = m.llm.path or m.llm.tokenizer
    if not llm_tok_path:
        raise ValueError("config: set model.llm.path (a local causal LM) or model.llm.tokenizer for a random base")
    llm_tok = AutoTokenizer.from_pretrained(str(_resolve(llm_tok_path)))
    if llm_tok.pad_token is None:
        llm_tok.pad_token = llm_tok.eos_token
    q_path = m.qformer.tokenizer or m.qformer.path or m.qformer.bert_init or llm_tok_path
    q_dir = _resolve(q_path)
    if not m.qformer.tokenizer and m.qformer.path and (q_dir / "qformer_tokenizer").is_dir():
        q_dir = q_dir / "qformer_tokenizer"  # InstructBLIP keeps the BERT tokenizer there; the top level is the LLM's
    q_tok = AutoTokenizer.from_pretrained(str(q_dir))
    if q_tok.pad_token is None:
        q_tok.pad_token = q_tok.eos_token or q_tok.unk_token
    return llm_tok, q_tok


_INSTRUCTBLIP_CACHE: dict[str, dict] = {}


def _instructblip_parts(path: str) -> dict:
    """Read a local InstructBLIP checkpoint once, even when vision and Q-Former both come from it."""
    from rsmoe.models.loading import load_instructblip_visual

    key = str(_resolve(path))
    if key not in _INSTRUCTBLIP_CACHE:
        _INSTRUCTBLIP_CACHE.clear()
        _INSTRUCTBLIP_CACHE[key] = load_instructblip_visual(key)
    return _INSTRUCTBLIP_CACHE[key]


def _build_vision(m: ModelArgs) -> nn.Module:
    v = m.vision
    if v.type == "efficientnet":
        from rsmoe.models.efficientnet import EfficientNetEncoder

        return EfficientNetEncoder(str(_resolve(v.path)) if v.path else None)
    if v.path:
        return VisionTokens(_instructblip_parts(v.path)["vision_model"])
    cfg = InstructBlipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    return VisionTokens(InstructBlipVisionModel(cfg))


def _build_qformer(m: ModelArgs, vision_hidden: int, qformer_vocab: int) -> QFormer:
    q = m.qformer
    if q.path:
        parts = _instructblip_parts(q.path)
        qf = QFormer(parts["qformer"].config, q.num_query_tokens, parts["qformer"])
        if parts["query_tokens"].shape[1] != q.num_query_tokens:
            raise ValueError(
                f"model.qformer.num_query_tokens={q.num_query_tokens} but {q.path} has "
                f"{parts['query_tokens'].shape[1]} query tokens"
            )
        qf.query_tokens.data.copy_(parts["query_tokens"])
        return qf
    if q.bert_init:
        from rsmoe.models.loading import init_qformer_from_bert, qformer_config_from_bert

        # Shapes come from the BERT checkpoint (hidden, heads, vocab); the preset's sizes must agree.
        cfg = qformer_config_from_bert(
            str(_resolve(q.bert_init)),
            encoder_hidden_size=vision_hidden,
            cross_attention_frequency=q.cross_attention_frequency,
        )
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
        qf = QFormer(cfg, q.num_query_tokens)
        report = init_qformer_from_bert(qf.qformer, str(_resolve(q.bert_init)))
        log.info("Q-Former initialised from %s: %d tensors loaded", q.bert_init, len(report["loaded"]))
        return qf
    cfg = InstructBlipQFormerConfig(
        vocab_size=qformer_vocab,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=vision_hidden,
        # No dropout: Q-Former fine-tuning on a few thousand captions; also keeps layouts bit-comparable.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=max(512, q.max_instruction_len + q.num_query_tokens),
    )
    return QFormer(cfg, q.num_query_tokens)


def _build_base_llm(m: ModelArgs, vocab_size: int, pad_id: int) -> nn.Module:
    if m.llm.path:
        from rsmoe.models.loading import load_causal_lm

        lm, _ = load_causal_lm(str(_resolve(m.llm.path)), attn_implementation=m.llm.attn_implementation)
        return lm
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=m.llm.hidden_size,
        intermediate_size=m.llm.intermediate_size,
        num_hidden_layers=m.llm.num_layers,
        num_attention_heads=m.llm.num_heads,
        num_key_value_heads=m.llm.num_kv_heads,
        max_position_embeddings=m.max_prompt_len + m.max_target_len + m.qformer.num_query_tokens + 64,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        initializer_range=m.llm.init_std,
    )
    from rsmoe.models.loading import _attn_implementation

    cfg._attn_implementation = _attn_implementation(m.llm.attn_implementation)
    return LlamaForCausalLM(cfg)


def build_model(m: ModelArgs, seed: int, tokenizers=None) -> tuple[RSMoE, object, object]:
    """Stage I structure (one adapter). Returns (model, llm_tokenizer, qformer_tokenizer).

    Random parts are drawn from `seed`, so the same config and seed build the same weights.
    """
    llm_tok, q_tok = tokenizers or build_tokenizers(m)
    torch.manual_seed(seed)
    vision = _build_vision(m)
    qformer = _build_qformer(m, vision.hidden_size, len(q_tok))
    base = _build_base_llm(m, len(llm_tok), llm_tok.pad_token_id)
    experts = ExpertLM(
        base,
        [0],
        r=m.lora.r,
        alpha=m.lora.alpha,
        dropout=m.lora.dropout,
        target_modules=m.lora.target_modules,
        seed=seed,
    )
    if m.gradient_checkpointing:
        experts.enable_gradient_checkpointing()
    visual = VisualPrefix(vision, qformer, experts.hidden_size)
    if m.qformer.path:
        from rsmoe.models.loading import check_projection_shapes

        # InstructBLIP-Vicuna's projection is 4096 wide; in front of another LLM width it is re-initialised.
        proj = check_projection_shapes(
            _instructblip_parts(m.qformer.path)["language_projection_state"],
            qformer_hidden_size=qformer.hidden_size,
            llm_hidden_size=experts.hidden_size,
            reinit_on_mismatch=True,
        )
        if proj is not None:
            visual.proj.load_state_dict(proj)
    _INSTRUCTBLIP_CACHE.clear()
    model = RSMoE(visual, experts, ["llm"])
    model.trainable_stage1()
    return model, llm_tok, q_tok
