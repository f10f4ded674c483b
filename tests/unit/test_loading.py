"""Local-directory loaders: tiny checkpoints written with save_pretrained, round-tripped and broken."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
)

from rsmoe.assets import resolve_path
from rsmoe.models import hf_weights as loading
from rsmoe.models.hf_weights import (
    check_projection_shapes,
    init_qformer_from_bert,
    load_causal_lm,
    load_instructblip_visual,
    qformer_config_from_bert,
)


def _tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=1500, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_llama_config()).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_path("asset:tiny-tokenizer")).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_instructblip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-instructblip")
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1500, encoder_hidden_size=32),
        text_config=_tiny_llama_config().to_dict(),
        num_query_tokens=32,
    )
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------- causal LM


def test_load_causal_lm_round_trip(tiny_llama_dir: Path) -> None:
    model, tok = load_causal_lm(tiny_llama_dir)
    saved = load_file(str(tiny_llama_dir / "model.safetensors"))
    state = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert model.dtype == torch.float32
    assert tok.padding_side == "right" and tok.pad_token == "<pad>"
    assert model.config._attn_implementation == "sdpa"


def test_load_causal_lm_sets_missing_pad_token(tiny_llama_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_llama_dir, tmp_path / "nopad")
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    model, tok = load_causal_lm(directory, dtype=torch.bfloat16)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert model.config.pad_token_id is not None and model.dtype == torch.bfloat16


def test_flash_attention_falls_back_to_sdpa(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="rsmoe.models.hf_weights"):
        model, _ = load_causal_lm(tiny_llama_dir, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert "flash_attention_2 requested" in caplog.text


def test_load_causal_lm_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "llama-missing"
    with pytest.raises(FileNotFoundError, match=f"LLM directory {missing} does not exist"):
        load_causal_lm(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} has no config.json"):
        load_causal_lm(empty)

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    with pytest.raises(ValueError, match="model_type 'vit', which is not a causal LM"):
        load_causal_lm(vit)

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, no_tok / name)
    with pytest.raises(FileNotFoundError, match=f"{no_tok} has no tokenizer"):
        load_causal_lm(no_tok)


# ------------------------------------------------------------------------------------- InstructBLIP


def test_load_instructblip_visual_round_trip(tiny_instructblip_dir: Path) -> None:
    parts = load_instructblip_visual(tiny_instructblip_dir)
    full = InstructBlipForConditionalGeneration.from_pretrained(tiny_instructblip_dir).eval()
    ref = full.state_dict()
    for name in ("vision_model", "qformer"):
        for key, tensor in parts[name].state_dict().items():
            assert torch.equal(tensor, ref[f"{name}.{key}"]), f"{name}.{key}"
    assert parts["query_tokens"].shape == (1, 32, 32)
    assert torch.equal(parts["query_tokens"], ref["query_tokens"])
    proj = parts["language_projection_state"]
    assert torch.equal(proj["weight"], ref["language_projection.weight"]) and proj["weight"].shape == (48, 32)
    assert parts["qformer_tokenizer"] is None and parts["config"].num_query_tokens == 32
    # Non-persistent buffers were built, not left on the meta device.
    assert not any(t.is_meta for t in [*parts["qformer"].buffers(), *parts["qformer"].parameters()])

    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = parts["vision_model"](pixels).last_hidden_state
        theirs = full.vision_model(pixels).last_hidden_state
        assert torch.allclose(ours, theirs)
        ids = torch.tensor([[5, 6, 7]])
        query = parts["query_tokens"]
        q_ours = parts["qformer"](input_ids=ids, query_embeds=query, encoder_hidden_states=ours).last_hidden_state
        q_theirs = full.qformer(input_ids=ids, query_embeds=query, encoder_hidden_states=theirs).last_hidden_state
        assert torch.allclose(q_ours, q_theirs)


def test_load_instructblip_visual_sharded_with_qformer_tokenizer(tiny_instructblip_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    model = InstructBlipForConditionalGeneration.from_pretrained(tiny_instructblip_dir)
    model.save_pretrained(directory, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    AutoTokenizer.from_pretrained(resolve_path("asset:tiny-tokenizer")).save_pretrained(directory / "qformer_tokenizer")
    parts = load_instructblip_visual(directory)
    assert torch.equal(parts["query_tokens"], model.query_tokens.detach())
    assert parts["qformer_tokenizer"] is not None and parts["qformer_tokenizer"].pad_token == "<pad>"


def test_load_instructblip_visual_errors(tiny_instructblip_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "ib-missing"
    with pytest.raises(FileNotFoundError, match=f"InstructBLIP directory {missing} does not exist"):
        load_instructblip_visual(missing)

    with pytest.raises(ValueError, match="expected an InstructBLIP checkpoint .*found model_type 'llama'"):
        load_instructblip_visual(tiny_llama_dir)

    broken = _copy(tiny_instructblip_dir, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["qformer.encoder.layer.0.attention.attention.query.weight"]
    state["qformer.extra.weight"] = torch.zeros(1)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError) as err:
        load_instructblip_visual(broken)
    message = str(err.value)
    assert "missing from checkpoint: ['encoder.layer.0.attention.attention.query.weight']" in message
    assert "unexpected in checkpoint: ['extra.weight']" in message and str(broken) in message

    del state["query_tokens"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="expected a 'query_tokens' tensor"):
        load_instructblip_visual(broken)


def test_check_projection_shapes(caplog: pytest.LogCaptureFixture) -> None:
    state = {"weight": torch.zeros(4096, 768), "bias": torch.zeros(4096)}
    assert check_projection_shapes(state, qformer_hidden_size=768, llm_hidden_size=4096) is state
    assert check_projection_shapes(None, qformer_hidden_size=768, llm_hidden_size=2048) is None
    with pytest.raises(ValueError, match="LLM width 4096.*expert LLM width 2048.*reinit_on_mismatch"):
        check_projection_shapes(state, qformer_hidden_size=768, llm_hidden_size=2048)
    with caplog.at_level(logging.WARNING, logger="rsmoe.models.hf_weights"):
        assert check_projection_shapes(state, qformer_hidden_size=768, llm_hidden_size=2048, reinit_on_mismatch=True) is None
    assert "initialising a new projection" in caplog.text


# ---------------------------------------------------------------------------------- Q-Former from BERT


def test_init_qformer_from_minilm_bert() -> None:
    bert_dir = resolve_path("asset:minilm-l6")
    config = qformer_config_from_bert(bert_dir, encoder_hidden_size=1280)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (384, 6, 30522)
    torch.manual_seed(0)
    qformer = InstructBlipQFormerModel(config)
    cross_before = qformer.encoder.layer[0].crossattention.attention.key.weight.clone()

    report = init_qformer_from_bert(qformer, "asset:minilm-l6")
    bert = load_file(str(bert_dir / "model.safetensors"))
    layer = qformer.encoder.layer[3]
    assert torch.equal(qformer.embeddings.word_embeddings.weight, bert["embeddings.word_embeddings.weight"])
    assert torch.equal(qformer.embeddings.layernorm.weight, bert["embeddings.LayerNorm.weight"])
    assert torch.equal(layer.attention.attention.query.weight, bert["encoder.layer.3.attention.self.query.weight"])
    assert torch.equal(layer.output.LayerNorm.bias, bert["encoder.layer.3.output.LayerNorm.bias"])
    # BLIP-2's init: the query FFN starts as a copy of the text FFN.
    assert torch.equal(layer.intermediate_query.dense.weight, bert["encoder.layer.3.intermediate.dense.weight"])
    assert torch.equal(layer.output_query.dense.weight, bert["encoder.layer.3.output.dense.weight"])
    # Cross-attention (every 2nd layer) has no BERT counterpart and stays random.
    assert torch.equal(qformer.encoder.layer[0].crossattention.attention.key.weight, cross_before)
    assert report["skipped"] and all(".crossattention." in k for k in report["skipped"])
    assert len(report["loaded"]) == 4 + 6 * 16 + 6 * 6  # embeddings + (self-attn + FFN) + query FFN per layer


def test_init_qformer_from_bert_shape_mismatch_names_both(tmp_path: Path) -> None:
    config = qformer_config_from_bert("asset:minilm-l6", encoder_hidden_size=32, num_hidden_layers=1)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 32, 64, 4
    qformer = InstructBlipQFormerModel(config)
    with pytest.raises(ValueError, match=r"BERT tensor embeddings\.word_embeddings\.weight has shape \(30522, 384\) but Q-Former .* has \(30522, 32\)"):
        init_qformer_from_bert(qformer, "asset:minilm-l6")
    with pytest.raises(FileNotFoundError, match="BERT directory"):
        init_qformer_from_bert(qformer, tmp_path / "no-bert")


def test_loading_module_does_not_import_deepspeed() -> None:
    import ast

    tree = ast.parse(Path(loading.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "deepspeed" for name in imported)


def test_vision_checkpoint_at_another_image_size_is_one_line_naming_the_key(tiny_instructblip_dir: Path) -> None:
    """A ViT trained at 32 px read at 64 px would fail in its forward (position embeddings for another
    number of patches: 'The size of tensor a (17) must match ... (65)'); the build names the setting."""
    from rsmoe.config import ConfigError, load_config
    from rsmoe.models.build import build_model

    args = load_config("tiny", [f"model.vision.path={tiny_instructblip_dir}", "model.vision.image_size=64"])
    with pytest.raises(ConfigError, match=r"config key 'model.vision.image_size': 64, but the vision checkpoint .* "
                                          r"trained at 32 px; set model.vision.image_size=32"):
        build_model(args.model, args.seed)
