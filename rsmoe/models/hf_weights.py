"""Load real weights from local directories, with errors that say which path and what is wrong.

Everything reads local files only (``local_files_only=True``); nothing here downloads or imports
DeepSpeed. Paths may also be offline asset specs such as ``"asset:smollm2-135m-instruct"``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsmoe.assets import ASSET_PREFIX, resolve_path

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def ensure_pad_token(tokenizer: Any) -> Any:
    """rsmoe's one pad-token rule: keep the tokenizer's pad token, else use eos, else unk.

    Padding never needs a token of its own (padded positions are masked and carry no loss), and
    adding one would grow the frozen embedding matrix with an untrained row."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, eos or unk token; "
                "set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
        logger.info("%s: tokenizer has no pad token; using %r", getattr(tokenizer, "name_or_path", ""), fallback)
    return tokenizer


def _local_dir(path: PathLike, what: str) -> Path:
    """Resolve an asset spec or check that a directory with a config.json exists."""
    text = os.fspath(path)
    if text.startswith(ASSET_PREFIX):
        directory = resolve_path(text)
    else:
        directory = Path(text).expanduser()
        if not directory.exists():
            raise FileNotFoundError(
                f"{what} directory {directory} does not exist. Models load from local directories only "
                f"(download once elsewhere, copy it here, and point the setting at it)."
            )
    if not directory.is_dir():
        raise NotADirectoryError(f"{what} path {directory} is not a directory (expected a save_pretrained folder)")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} directory {directory} has no config.json; expected a Hugging Face save_pretrained folder "
            f"(found: {', '.join(sorted(p.name for p in directory.iterdir())[:10]) or 'nothing'})"
        )
    return directory


def resolve_attn_implementation(requested: str) -> str:
    if requested == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            logger.warning("flash_attention_2 requested but flash-attn is not available here; using sdpa")
            return "sdpa"
    return requested


def load_causal_lm(
    path: PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local directory (Llama / Vicuna / SmolLM2 layout).

    The tokenizer gets a pad token by `ensure_pad_token` and pads on the right, which is what the
    training collator and the visual-prefix concatenation assume.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    directory = _local_dir(path, "LLM")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{directory}: config.json has model_type '{config.model_type}', which is not a causal LM "
            f"(expected e.g. 'llama'); point the LLM setting at the language model's own directory"
        )
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            f"copy the tokenizer files that belong to this model into the directory"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)

    attn = resolve_attn_implementation(attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=attn, local_files_only=True
    )

    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s from %s (%s, %s)", type(model).__name__, directory, dtype, attn)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------
# InstructBLIP visual side (vision encoder, Q-Former, query tokens, projection) without the LLM
# ---------------------------------------------------------------------------------------------------

_VISUAL_PREFIXES = ("vision_model.", "qformer.", "query_tokens", "language_projection.")


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            # Only the shards that hold visual tensors: a 7B checkpoint's LLM shards stay unread.
            wanted = {f for k, f in weight_map.items() if _strip_model_prefix(k).startswith(_VISUAL_PREFIXES)}
            return [directory / f for f in sorted(wanted)]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    return []


def _strip_model_prefix(key: str) -> str:
    # Some transformers versions nest the composite under "model."; the checkpoints on the Hub do not.
    return key[len("model.") :] if key.startswith("model.") else key


def _read_visual_tensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    short = _strip_model_prefix(key)
                    if short.startswith(_VISUAL_PREFIXES):
                        tensors[short] = f.get_tensor(key)
        else:  # legacy .bin: mmap so the LLM part is never paged in
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key, value in state.items():
                short = _strip_model_prefix(key)
                if short.startswith(_VISUAL_PREFIXES):
                    tensors[short] = value.clone()
            del state
    return tensors


def _empty_weights() -> AbstractContextManager[Any]:
    # Parameters on the meta device (no random init of a 1B-param ViT-g); real buffers, because
    # non-persistent ones such as the Q-Former's position_ids are not in the checkpoint.
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _load_submodule(module: nn.Module, state: dict[str, torch.Tensor], name: str, directory: Path) -> None:
    expected = set(module.state_dict().keys())
    found = set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyError(
            f"{directory}: the {name} weights do not match the {name} built from its config.json: "
            f"expected {len(expected)} tensors, found {len(found)}; "
            f"missing from checkpoint: {missing[:5]}{' …' if len(missing) > 5 else ''}; "
            f"unexpected in checkpoint: {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    own = module.state_dict()
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise ValueError(
                f"{directory}: {name}.{key} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the model built from config.json"
            )
    module.load_state_dict(state, strict=True, assign=True)


def load_instructblip_visual(path: PathLike) -> dict[str, Any]:
    """Vision encoder, Q-Former, query tokens and projection of a local InstructBLIP checkpoint.

    ``path`` is a directory written by ``InstructBlipForConditionalGeneration.save_pretrained`` (or the
    Hub's Salesforce/instructblip-* layout). Only the visual tensors are read; the LLM is never built.
    Returns ``vision_model``, ``qformer``, ``query_tokens`` ([1, 32, H]), ``language_projection_state``
    (``{"weight", "bias"}`` or None), ``qformer_tokenizer`` (or None) and ``config``.
    """
    from transformers import (
        InstructBlipConfig,
        InstructBlipQFormerModel,
        InstructBlipVisionModel,
    )

    directory = _local_dir(path, "InstructBLIP")
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != "instructblip":
        raise ValueError(
            f"{directory}: expected an InstructBLIP checkpoint (model_type 'instructblip'), "
            f"found model_type '{raw.get('model_type')}'"
        )
    config = InstructBlipConfig.from_pretrained(directory, local_files_only=True)
    files = _weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no model.safetensors / pytorch_model.bin (or sharded index) found")
    tensors = _read_visual_tensors(files)

    groups: dict[str, dict[str, torch.Tensor]] = {"vision_model": {}, "qformer": {}, "language_projection": {}}
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
        if head in groups:
            groups[head][rest] = tensor
    if "query_tokens" not in tensors:
        raise KeyError(f"{directory}: expected a 'query_tokens' tensor in the checkpoint, found none")
    query_tokens = tensors["query_tokens"]
    expected_q = (1, config.num_query_tokens, config.qformer_config.hidden_size)
    if tuple(query_tokens.shape) != expected_q:
        raise ValueError(f"{directory}: query_tokens has shape {tuple(query_tokens.shape)}, expected {expected_q}")

    with _empty_weights():
        vision_model = InstructBlipVisionModel(config.vision_config)
        qformer = InstructBlipQFormerModel(config.qformer_config)
    _load_submodule(vision_model, groups["vision_model"], "vision_model", directory)
    _load_submodule(qformer, groups["qformer"], "qformer", directory)
    vision_model.eval()
    qformer.eval()

    projection = groups["language_projection"] or None
    if projection is not None and set(projection) != {"weight", "bias"}:
        raise KeyError(
            f"{directory}: expected language_projection.weight and .bias, found {sorted(projection)}"
        )

    qformer_tokenizer = None
    tok_dir = directory / "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts it
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        qformer_tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    logger.info(
        "loaded InstructBLIP visual side from %s: vision %d, Q-Former %d, %d queries, projection %s",
        directory,
        config.vision_config.hidden_size,
        config.qformer_config.hidden_size,
        config.num_query_tokens,
        "yes" if projection is not None else "no",
    )
    return {
        "vision_model": vision_model,
        "qformer": qformer,
        "query_tokens": query_tokens,
        "language_projection_state": projection,
        "qformer_tokenizer": qformer_tokenizer,
        "config": config,
    }


def check_projection_shapes(
    projection_state: dict[str, torch.Tensor] | None,
    *,
    qformer_hidden_size: int,
    llm_hidden_size: int,
    reinit_on_mismatch: bool = False,
    log_level: int = logging.WARNING,
) -> dict[str, torch.Tensor] | None:
    """Return the checkpoint's projection if it maps Q-Former width → LLM width, else decide what to do.

    A mismatch (e.g. InstructBLIP-Vicuna's 4096-wide projection in front of Llama-3.2-1B's 2048) raises
    a ``ValueError`` naming both widths, unless ``reinit_on_mismatch`` is set: then it logs (at ``log_level``:
    a warning when the model is built to train, debug when a trained projection is loaded over it) and
    returns None, meaning "initialise a fresh projection" (Stage I trains it anyway).
    """
    if projection_state is None:
        return None
    weight = projection_state["weight"]
    found = (int(weight.shape[0]), int(weight.shape[1]))  # nn.Linear: [out = LLM width, in = Q-Former width]
    expected = (llm_hidden_size, qformer_hidden_size)
    if found == expected:
        return projection_state
    message = (
        f"the checkpoint's language projection maps Q-Former width {found[1]} to LLM width {found[0]}, "
        f"but this model needs Q-Former width {qformer_hidden_size} to expert LLM width {llm_hidden_size}"
    )
    if reinit_on_mismatch:
        logger.log(log_level, "%s; initialising a new projection instead", message)
        return None
    raise ValueError(message + "; set the projection to be re-initialised (reinit_on_mismatch=True) to train a new one")


# ---------------------------------------------------------------------------------------------------
# Q-Former from BERT (how BLIP-2 / InstructBLIP initialised it)
# ---------------------------------------------------------------------------------------------------


def _read_bert_state(bert_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(bert_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
    elif (bert_dir / "pytorch_model.bin").is_file():
        state = torch.load(bert_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{bert_dir}: no *.safetensors or pytorch_model.bin with BERT weights")
    # BertForPreTraining checkpoints (bert-base-uncased) prefix the encoder with "bert."; BertModel does not.
    return {k[len("bert.") :] if k.startswith("bert.") else k: v for k, v in state.items()}


def _bert_key_for(qformer_key: str) -> str | None:
    """BERT parameter name that initialises a Q-Former parameter, or None (stays random)."""
    if qformer_key.startswith("embeddings."):
        if qformer_key.startswith("embeddings.layernorm."):
            return qformer_key.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        return qformer_key
    if not qformer_key.startswith("encoder.layer.") or ".crossattention." in qformer_key:
        return None  # cross-attention (and anything outside the BERT layers) has no BERT counterpart
    key = qformer_key.replace(".attention.attention.", ".attention.self.")
    # BLIP-2 copies the text FFN into the query FFN (intermediate_query / output_query) at init.
    return key.replace(".intermediate_query.", ".intermediate.").replace(".output_query.", ".output.")


def init_qformer_from_bert(qformer: nn.Module, bert_dir: PathLike) -> dict[str, list[str]]:
    """Copy BERT embeddings, self-attention and FFN weights into an ``InstructBlipQFormerModel``.

    The Q-Former config must use BERT's hidden size, heads, intermediate size and vocabulary (see
    :func:`qformer_config_from_bert`); a shape mismatch raises naming both shapes. Cross-attention and
    Q-Former layers beyond BERT's depth stay randomly initialised and are listed under ``skipped``.
    """
    directory = _local_dir(bert_dir, "BERT")
    bert = _read_bert_state(directory)
    loaded: list[str] = []
    skipped: list[str] = []
    with torch.no_grad():
        for name, param in qformer.state_dict().items():
            source = _bert_key_for(name)
            if source is None or source not in bert:
                skipped.append(name)
                continue
            tensor = bert[source]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{directory}: BERT tensor {source} has shape {tuple(tensor.shape)} but Q-Former {name} "
                    f"has {tuple(param.shape)}; build the Q-Former config from BERT's config "
                    f"(qformer_config_from_bert)"
                )
            param.copy_(tensor.to(param.dtype))
            loaded.append(name)
    if not loaded:
        raise ValueError(f"{directory}: no BERT tensor matched the Q-Former's parameter names; is it a BERT checkpoint?")
    logger.info("initialised %d Q-Former tensors from BERT %s (%d left random)", len(loaded), directory, len(skipped))
    return {"loaded": loaded, "skipped": skipped}


def qformer_config_from_bert(
    bert_dir: PathLike, *, encoder_hidden_size: int, cross_attention_frequency: int = 2, num_hidden_layers: int | None = None
) -> Any:
    """An ``InstructBlipQFormerConfig`` whose shapes match a local BERT, so it can initialise the Q-Former."""
    from transformers import InstructBlipQFormerConfig

    directory = _local_dir(bert_dir, "BERT")
    bert = json.loads((directory / "config.json").read_text())
    if bert.get("model_type") != "bert":
        raise ValueError(f"{directory}: expected a BERT config (model_type 'bert'), found '{bert.get('model_type')}'")
    return InstructBlipQFormerConfig(
        vocab_size=bert["vocab_size"],
        hidden_size=bert["hidden_size"],
        num_hidden_layers=num_hidden_layers or bert["num_hidden_layers"],
        num_attention_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"],
        hidden_act=bert.get("hidden_act", "gelu"),
        max_position_embeddings=bert["max_position_embeddings"],
        layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
        pad_token_id=bert.get("pad_token_id", 0),
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
    )


__all__ = [
    "TOKENIZER_FILES",
    "resolve_attn_implementation",
    "check_projection_shapes",
    "ensure_pad_token",
    "init_qformer_from_bert",
    "load_causal_lm",
    "load_instructblip_visual",
    "qformer_config_from_bert",
]
