"""`rsmoe caption` / `rsmoe ask` on real sample images: JSON output, training-identical preprocessing,
batched experts == experts in turn, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import REPO

IMAGE = os.path.join(REPO, "data", "sample", "ucm_captions", "images", "91.png")  # UCM-Captions_91 in val shards


@pytest.fixture(scope="module")
def run_dirs(tiny_runs):
    return tiny_runs


@pytest.fixture(scope="module")
def trained(run_dirs):
    from rsmoe.inference.load import load_trained

    return load_trained(run_dirs["stage2"], "cpu")


def test_image_preprocessing_matches_the_training_loader(trained, sample_shards):
    from rsmoe.data.loader import build_loader
    from rsmoe.inference.load import read_image

    v = trained.cfg.model.vision
    for batch in build_loader(sample_shards["val"], batch_size=8, image_size=v.image_size,
                              image_mean=v.image_mean, image_std=v.image_std):
        if "UCM-Captions_91" in batch["key"]:
            ref = batch["pixel_values"][batch["key"].index("UCM-Captions_91")]
            break
    else:
        pytest.fail("UCM-Captions_91 not in the val shards")
    assert torch.equal(torch.from_numpy(read_image(IMAGE, trained.cfg)), ref)


def test_caption_cli_json_on_a_real_image(run_dirs, capsys):
    from rsmoe.cli import main
    from rsmoe.models.compose import compose_caption

    assert main(["caption", IMAGE, IMAGE, "--model", str(run_dirs["stage2"]), "--json", "--max-new-tokens", "10",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and out[0]["image"] == IMAGE
    r = out[0]
    assert list(r["experts"]) == ["theme", "objects", "relations"]
    assert all(isinstance(t, str) for t in r["experts"].values())
    assert r["caption"] == compose_caption(r["experts"], ["theme", "objects", "relations"], r["truncated"])
    assert set(r["truncated"]) <= set(r["experts"])
    assert out[1]["experts"] == r["experts"]  # same image twice in one batch -> same text


def test_caption_cli_matches_eval_on_the_same_image(run_dirs, sample_shards, tmp_path, capsys):
    """What `rsmoe caption` says about a file equals what `rsmoe eval` generated for its shard sample."""
    from rsmoe.cli import main
    from rsmoe.eval.run import EvalOptions, evaluate

    evaluate(EvalOptions(model=str(run_dirs["stage2"]), shards=sample_shards["val"], out=str(tmp_path), task="caption",
                         max_new_tokens=10, bootstrap=0, meteor=False, java=False, progress=False, thumbnails=False))
    items = {it["key"]: it for it in json.loads((tmp_path / "results.json").read_text())["items"]}
    assert main(["caption", IMAGE, "--model", str(run_dirs["stage2"] / "final"), "--json", "--max-new-tokens", "10"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["experts"] == items["UCM-Captions_91"]["experts"]


def test_batched_experts_equal_experts_in_turn_greedy_and_beam(trained):
    from rsmoe.cli.caption import caption_images
    from rsmoe.config import GenerationArgs

    paths = [IMAGE, os.path.join(REPO, "data", "sample", "ucm_captions", "images", "1010.png")]
    for gen in (GenerationArgs(max_new_tokens=8), GenerationArgs(max_new_tokens=8, num_beams=2, repetition_penalty=1.3)):
        batched = caption_images(trained, paths, None, gen)
        in_turn = caption_images(trained, paths, None, gen, sequential=True)
        assert batched == in_turn


def test_ask_cli_json_routes_by_type(run_dirs, capsys):
    from rsmoe.cli import main

    for qtype, expert in (("presence", "objects"), ("comp", "relations"), ("rural_urban", "theme")):
        assert main(["ask", IMAGE, "Is a building present?", "--model", str(run_dirs["stage2"]), "--type", qtype,
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["expert"] == expert and out["type"] == qtype and isinstance(out["answer"], str)
    assert main(["ask", IMAGE, "How many roads are there?", "--model", str(run_dirs["stage1"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expert"] == "llm"  # Stage I: one expert answers everything


def test_stage1_model_captions_with_its_single_expert(run_dirs, capsys):
    from rsmoe.cli import main

    assert main(["caption", IMAGE, "--model", str(run_dirs["stage1"]), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == IMAGE and lines[1].strip().startswith("llm") and lines[2].strip().startswith("caption")


def test_clear_errors(run_dirs, tmp_path, capsys):
    from rsmoe.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["caption", str(bad), "--model", str(run_dirs["stage2"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsmoe caption: error: cannot read image") and len(err.strip().splitlines()) == 1
    assert main(["ask", str(tmp_path / "missing.png"), "q?", "--model", str(run_dirs["stage2"])]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["caption", IMAGE, "--model", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["ask", IMAGE, "q?", "--model", str(tmp_path / "run")]) == 2
    assert "without a finished model" in capsys.readouterr().err
    assert main(["caption", IMAGE, "--model", str(run_dirs["stage2"]), "--num-beams", "0"]) == 2
    assert "--num-beams must be >= 1" in capsys.readouterr().err


def test_repetition_penalty_applies_to_every_row_whatever_its_padding(trained):
    """transformers' own repetition_penalty with inputs_embeds skips a left-padded row's first
    n_pad generated tokens; rsmoe.inference passes its own processor so every row is penalised."""
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import generate_kwargs
    from rsmoe.inference.load import read_image

    p, m = trained.processor, trained.model
    prompts = p.router.caption_prompts(None)
    ids, mask = p.generation_rows(prompts)
    assert len(set((mask == 0).sum(dim=1).tolist())) > 1  # the expert prompts pad differently
    qids, qmask = p.encode_instructions(["Describe this remote sensing image in detail."])
    prefix = m.visual(torch.from_numpy(read_image(IMAGE, trained.cfg))[None], qids, qmask)
    kw = generate_kwargs(GenerationArgs(max_new_tokens=12, repetition_penalty=1e4), p)
    batched = m.experts.generate(prefix[[0, 0, 0]], ids, mask, torch.tensor([0, 1, 2]), **kw)
    for slot in range(3):
        alone_ids, alone_mask = p.generation_rows([prompts[slot]])
        alone = m.experts.generate(prefix[[0]], alone_ids, alone_mask, torch.tensor([slot]), **kw)[0]
        row = batched[slot][: len(alone)]
        assert torch.equal(row, alone), slot
        toks = [t for t in row.tolist() if t not in (p.llm_tokenizer.pad_token_id, p.llm_tokenizer.eos_token_id)]
        assert len(toks) == len(set(toks)), f"expert {slot} repeated a token: {toks}"
