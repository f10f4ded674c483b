"""The training objective's options: per-sample loss normalisation, the visual side's learning rate,
training on a sample's references."""

from __future__ import annotations

import random

import pytest
import torch

from rsmoe.config import load_config
from rsmoe.models.build import build_model
from rsmoe.training.builders import build_processor
from rsmoe.training.engine import param_groups


def _rows_model():
    args = load_config("tiny", ["stage=2"])
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts)
    return model, build_processor(args, llm_tok, q_tok)


def test_sample_normalisation_is_the_mean_of_each_rows_token_mean():
    model, proc = _rows_model()
    g = torch.Generator().manual_seed(0)
    b = 3
    lengths = [2, 9, 30]  # one expert's targets of very different lengths
    ids = torch.randint(5, 100, (b, 34), generator=g)
    mask = torch.zeros(b, 34, dtype=torch.long)
    labels = torch.full((b, 34), -100)
    for i, n in enumerate(lengths):
        mask[i, : n + 4] = 1
        labels[i, 4 : n + 4] = ids[i, 4 : n + 4]
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, adapter_index=torch.zeros(b, dtype=torch.long),
                  row_sample=torch.arange(b), pixel_values=torch.randn(b, 3, 64, 64, generator=g),
                  qformer_input_ids=torch.randint(5, 100, (b, 6), generator=g), qformer_attention_mask=torch.ones(b, 6, dtype=torch.long))
    with torch.no_grad():
        token = model(**inputs)
        row_means = []
        for i in range(b):  # each row alone: its own token mean (the direct computation)
            one = {k: (v[i : i + 1] if torch.is_tensor(v) and v.shape[0] == b else v) for k, v in inputs.items()}
            one["adapter_index"], one["row_sample"] = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
            row_means.append(model(**one)["expert_loss"][0])
        model.loss_per_sample = True
        sample = model(**inputs)
    torch.testing.assert_close(sample["expert_loss"][0], torch.stack(row_means).mean(), rtol=1e-5, atol=1e-6)
    weights = torch.tensor(lengths, dtype=torch.float32)
    torch.testing.assert_close(token["expert_loss"][0], (torch.stack(row_means) * weights).sum() / weights.sum(),
                               rtol=1e-5, atol=1e-6)
    assert sample["expert_loss"][1] == 0 and torch.equal(sample["expert_tokens"], token["expert_tokens"])  # logging unchanged


def test_visual_lr_scale_makes_two_groups():
    args = load_config("tiny", ["optim.visual_lr_scale=10", "optim.lr=1e-3"])
    model, _, _ = build_model(args.model, seed=0)
    groups = param_groups(model, args)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_" in names[id(p)] for p in groups[0]["params"])
    assert all(names[id(p)].startswith("visual.") for p in groups[1]["params"]) and groups[1]["params"]
    assert isinstance(param_groups(model, load_config("tiny")), list)  # scale 1: one plain list, as before


def test_references_as_targets_draw_one_reference_and_split_it():
    args = load_config("tiny", ["data.caption_source=references"])
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    proc = build_processor(args, llm_tok, q_tok)
    refs = ["A plane is parked on the airport.", "There are two planes on the runway.", "Two white planes are next to the terminal."]
    batch = {"caption": [refs[0]], "parts": [{"theme": refs[0], "objects": "", "relations": ""}], "references": [refs]}
    seen = {proc.target_for(batch, 0, random.Random(s))[0] for s in range(40)}
    assert seen == set(refs)
    caption, parts = next(proc.target_for(batch, 0, random.Random(s)) for s in range(40)
                          if proc.target_for(batch, 0, random.Random(s))[0] == refs[2])
    assert parts == {"theme": refs[2], "objects": "", "relations": ""}  # one sentence: the theme (splitter rule)
    with pytest.raises(Exception, match="data.caption_source"):
        load_config("tiny", ["data.caption_source=all"])
