"""Building an RS-MoE from its config: tokenizers, vision encoder, Q-Former, base LLM, adapters.

Everything loads from local paths or offline assets; random parts are drawn from the seed, so the
same config and seed build the same weights (runs with random frozen parts rely on it).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import (
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from rsmoe.assets import resolve_path
from rsmoe.config import ConfigError, ModelArgs
from rsmoe.models import hf_weights
from rsmoe.models.efficientnet import EfficientNetEncoder
from rsmoe.models.experts import ExpertLM
from rsmoe.models.model import QFormer, RSMoE, VisionTokens, VisualPrefix

log = logging.getLogger(__name__)


def build_tokenizers(m: ModelArgs):
    """(llm tokenizer, qformer tokenizer) from local paths only."""
    from transformers import AutoTokenizer

    llm_tok_path = m.llm.path or m.llm.tokenizer
    if not llm_tok_path:
        raise ConfigError("config key 'model.llm.tokenizer': set model.llm.path (a local causal LM) "
                          "or model.llm.tokenizer for a randomly initialised base")
    llm_tok = hf_weights.ensure_pad_token(AutoTokenizer.from_pretrained(str(resolve_path(llm_tok_path)), local_files_only=True))
    q_path = m.qformer.tokenizer or m.qformer.path or m.qformer.bert_init or llm_tok_path
    q_dir = resolve_path(q_path)
    if not m.qformer.tokenizer and m.qformer.path and (q_dir / "qformer_tokenizer").is_dir():
        q_dir = q_dir / "qformer_tokenizer"  # InstructBLIP keeps the BERT tokenizer there; the top level is the LLM's
    q_tok = hf_weights.ensure_pad_token(AutoTokenizer.from_pretrained(str(q_dir), local_files_only=True))
    return llm_tok, q_tok


_INSTRUCTBLIP_CACHE: dict[str, dict] = {}


def _instructblip_parts(path: str) -> dict:
    """Read a local InstructBLIP checkpoint once, even when vision and Q-Former both come from it."""
    key = str(resolve_path(path))
    if key not in _INSTRUCTBLIP_CACHE:
        _INSTRUCTBLIP_CACHE.clear()
        _INSTRUCTBLIP_CACHE[key] = hf_weights.load_instructblip_visual(key)
    return _INSTRUCTBLIP_CACHE[key]


def _build_vision(m: ModelArgs) -> nn.Module:
    v = m.vision
    if v.type == "efficientnet":
        return EfficientNetEncoder(str(resolve_path(v.path)) if v.path else None)
    if v.path:
        vit = _instructblip_parts(v.path)["vision_model"]
        if vit.config.image_size != v.image_size:
            # Images are resized to model.vision.image_size; a ViT trained at another size has position
            # embeddings for another number of patches, and the forward would fail on a shape mismatch.
            raise ConfigError(
                f"config key 'model.vision.image_size': {v.image_size}, but the vision checkpoint {v.path} was "
                f"trained at {vit.config.image_size} px; set model.vision.image_size={vit.config.image_size}"
            )
        return VisionTokens(vit)
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
        # Shapes come from the BERT checkpoint (hidden, heads, vocab); the preset's sizes must agree.
        cfg = hf_weights.qformer_config_from_bert(
            str(resolve_path(q.bert_init)),
            encoder_hidden_size=vision_hidden,
            cross_attention_frequency=q.cross_attention_frequency,
        )
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
        qf = QFormer(cfg, q.num_query_tokens)
        report = hf_weights.init_qformer_from_bert(qf.qformer, str(resolve_path(q.bert_init)))
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
        lm, _ = hf_weights.load_causal_lm(str(resolve_path(m.llm.path)), attn_implementation=m.llm.attn_implementation)
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
    cfg._attn_implementation = hf_weights.resolve_attn_implementation(m.llm.attn_implementation)
    return LlamaForCausalLM(cfg)


def build_model(m: ModelArgs, seed: int, tokenizers=None, *, fresh: bool = True) -> tuple[RSMoE, object, object]:
    """Stage I structure (one adapter). Returns (model, llm_tokenizer, qformer_tokenizer).

    Random parts are drawn from `seed`, so the same config and seed build the same weights.
    `fresh=False`: the model is built to load a trained stage into it (Stage II, eval, caption, export),
    so notes about how its trainable parts start (a re-initialised projection) are not repeated: they
    were logged once, when Stage I built it to train.
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
    prefix_rms = None
    if m.prefix_norm:  # from the frozen word embeddings, so every build of this base gets the same number
        emb = experts.base.get_input_embeddings().weight.detach().float()
        prefix_rms = round(float(emb.pow(2).mean(-1).sqrt().mean()), 6)
    visual = VisualPrefix(vision, qformer, experts.hidden_size, token_norm=m.vision.token_norm, prefix_rms=prefix_rms)
    if m.qformer.path:
        # InstructBLIP-Vicuna's projection is 4096 wide; in front of another LLM width it is re-initialised.
        proj = hf_weights.check_projection_shapes(
            _instructblip_parts(m.qformer.path)["language_projection_state"],
            qformer_hidden_size=qformer.hidden_size,
            llm_hidden_size=experts.hidden_size,
            reinit_on_mismatch=True,
            log_level=logging.WARNING if fresh else logging.DEBUG,
        )
        if proj is not None:
            visual.proj.load_state_dict(proj)
    _INSTRUCTBLIP_CACHE.clear()
    learned = None
    if m.router == "learned":
        lr = m.learned_router
        learned = {"soft_tokens": lr.soft_tokens, "width": lr.hidden, "route_loss_weight": lr.route_loss_weight}
    model = RSMoE(visual, experts, ["llm"], learned_router=learned)
    model.trainable_stage1()
    return model, llm_tok, q_tok
