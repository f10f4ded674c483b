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


def test_vqa_sampling_by_type_draws_each_type_equally_often():
    """RSVQA-LR-like sample: 1 rural/urban question among 60. 'question' trains it ~1/60 of the VQA rows,
    'type' 1/3 (a type uniformly, then a question of it); both rows carry the drawn question and answer."""
    qa = ([{"question": "Is it a rural or an urban area", "answer": "rural", "type": "rural_urban"}]
          + [{"question": f"Is there a road {k}?", "answer": "yes", "type": "presence"} for k in range(30)]
          + [{"question": f"How many buildings {k}?", "answer": str(k), "type": "count"} for k in range(29)])
    counts = {}
    for mode in ("question", "type"):
        args = load_config("tiny", [f"data.vqa_sampling={mode}", "data.vqa_prob=1.0"])
        model, llm_tok, q_tok = build_model(args.model, seed=0)
        proc = build_processor(args, llm_tok, q_tok)
        rng = random.Random(0)
        drawn = [proc.question_for(qa, rng)["type"] for _ in range(3000)]
        counts[mode] = {t: drawn.count(t) / len(drawn) for t in ("rural_urban", "presence", "count")}
        batch = {"caption": ["A caption."], "parts": [{}], "qa": [qa[:1]], "pixel_values": torch.zeros(1, 3, 32, 32)}
        out = proc.stage1_inputs(batch, random.Random(0), vqa_prob=1.0)
        assert not out["caption_row"][0]
        text = llm_tok.decode(out["input_ids"][0][out["attention_mask"][0].bool()])
        assert "rural or an urban" in text and "rural" in llm_tok.decode(out["labels"][0][out["labels"][0] >= 0])
    assert counts["question"]["rural_urban"] == pytest.approx(1 / 60, abs=0.01)
    assert counts["question"]["presence"] == pytest.approx(30 / 60, abs=0.03)
    for t in ("rural_urban", "presence", "count"):
        assert counts["type"][t] == pytest.approx(1 / 3, abs=0.03)
    assert proc.question_for(qa[1:3], random.Random(1))["type"] == "presence"  # one type: a question of it
    with pytest.raises(Exception, match="data.vqa_sampling"):
        load_config("tiny", ["data.vqa_sampling=balanced"])


def test_adapter_delay_holds_the_adapters_then_runs_their_own_schedule():
    from rsmoe.config import ConfigError
    from rsmoe.training.engine import build_optimizer, warmup_cosine

    args = load_config("tiny", ["optim.adapter_delay_steps=4", "optim.warmup_steps=2", "train.steps=12", "optim.lr=1e-3"])
    model, _, _ = build_model(args.model, seed=0)
    model.trainable_stage1()
    opt, sched = build_optimizer(param_groups(model, args), args)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_" in names[id(p)] for p in opt.param_groups[0]["params"])
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    visual_ref = warmup_cosine(2, 12, args.optim.min_lr_ratio)
    adapter_ref = warmup_cosine(2, 8, args.optim.min_lr_ratio)
    for step, (adapter_lr, visual_lr) in enumerate(lrs):
        assert visual_lr == pytest.approx(1e-3 * visual_ref(step))
        assert adapter_lr == (0.0 if step < 4 else pytest.approx(1e-3 * adapter_ref(step - 4)))
    # Stage II with the visual side frozen: nothing would train during the delay.
    args2 = load_config("tiny", ["stage=2", "optim.adapter_delay_steps=4", "train.steps=12"])
    model.to_stage2([0, 1, 2], 0, args2.model.experts)
    with pytest.raises(ConfigError, match="adapter_delay_steps"):
        param_groups(model, args2)
    with pytest.raises(ConfigError, match="adapter_delay_steps"):
        load_config("tiny", ["optim.adapter_delay_steps=12", "train.steps=12"])


def test_token_norm_layer_norms_each_encoder_token_before_the_qformer():
    from rsmoe.io.feature_cache import fingerprint

    args = load_config("tiny", ["model.vision.token_norm=true"])
    model, _, _ = build_model(args.model, seed=0)
    plain, _, _ = build_model(load_config("tiny").model, seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 5, model.visual.vision.hidden_size, generator=g) * 7 + 3
    ids = torch.randint(5, 50, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.long)
    mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    direct = (tokens - mean) / torch.sqrt(var + 1e-5)  # the direct computation
    with torch.no_grad():
        torch.testing.assert_close(model.visual.from_image_embeds(tokens, ids, mask),
                                   plain.visual.from_image_embeds(direct, ids, mask), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain.visual.from_image_embeds(tokens, ids, mask),
                                  model.visual.from_image_embeds(tokens, ids, mask), atol=1e-3)
    # The feature cache's prefix keys must tell the two apart.
    assert fingerprint(model.visual, "prefix", skip="vision") != fingerprint(plain.visual, "prefix", skip="vision")


def test_prefix_norm_puts_each_prefix_token_at_the_word_embeddings_rms():
    args = load_config("tiny", ["model.prefix_norm=true"])
    model, _, _ = build_model(args.model, seed=0)
    plain, _, _ = build_model(load_config("tiny").model, seed=0)
    emb = model.experts.base.get_input_embeddings().weight.detach()
    target = float(emb.pow(2).mean(-1).sqrt().mean())  # the direct computation
    assert model.visual.prefix_rms == pytest.approx(target, rel=1e-5)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 5, model.visual.vision.hidden_size, generator=g)
    ids, mask = torch.randint(5, 50, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        raw = plain.visual.from_image_embeds(tokens, ids, mask)
        got = model.visual.from_image_embeds(tokens, ids, mask)
    torch.testing.assert_close(got, raw / raw.pow(2).mean(-1, keepdim=True).sqrt() * target, rtol=1e-4, atol=1e-6)


ITC_CAPTIONS = ["Many planes at the airport.", "A beach next to the sea.", "Green farmland.", "Dense houses."]


def _itc_setup(overrides: list[str]):
    """A tiny Stage I model with the contrastive term (weight 0.5), its processor and tokenizer, and a batch
    of four captioned images of which the second has one question."""
    args = load_config("tiny", ["train.itc_weight=0.5", *overrides])
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.trainable_stage1()
    model.enable_itc(0.5)
    size = args.model.vision.image_size
    g = torch.Generator().manual_seed(3)
    batch = {"caption": list(ITC_CAPTIONS), "parts": [None] * 4, "pixel_values": torch.randn(4, 3, size, size, generator=g),
             "qa": [[], [{"question": "Is there water?", "answer": "yes", "type": "presence"}], [], []]}
    return model, build_processor(args, llm_tok, q_tok), llm_tok, batch


def test_itc_loss_is_symmetric_infonce_of_prefix_and_caption_words():
    model, proc, _, batch = _itc_setup([])
    inputs = proc.stage1_inputs(batch, random.Random(0), vqa_prob=1.0)
    assert inputs["caption_row"].tolist() == [True, False, True, True]  # the question row is not a caption
    out = model(**inputs)
    no_itc = dict(inputs, caption_row=None)
    base = model(**no_itc)
    # The direct computation, from the same prefix.
    with torch.no_grad():
        prefix = model.visual(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
        emb = model.experts.base.get_input_embeddings().weight
        rows = [0, 2, 3]
        texts, images = [], []
        for r in rows:
            sel = inputs["labels"][r] != -100
            texts.append(emb[inputs["input_ids"][r][sel]].mean(0) - emb.mean(0))
            images.append(prefix[r].mean(0))
        t = torch.nn.functional.normalize(torch.stack(texts), dim=-1)
        i = torch.nn.functional.normalize(torch.stack(images), dim=-1)
        logits = i @ t.T / 0.07
        want = (torch.nn.functional.cross_entropy(logits, torch.arange(3)) +
                torch.nn.functional.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(out["itc_loss"], want, rtol=1e-4, atol=1e-5)
    assert float(out["itc_rows"]) == 3
    torch.testing.assert_close(out["loss"], base["loss"] + 0.5 * want, rtol=1e-4, atol=1e-5)
    # Its gradient reaches the visual side only (the word embeddings are frozen targets).
    model.zero_grad()
    (out["loss"] - base["loss"]).backward()
    assert model.visual.proj.weight.grad is not None and model.visual.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if ".lora_" in n)
    # Fewer than two caption rows: no contrast, a zero term.
    one = proc.stage1_inputs({**batch, "caption": batch["caption"][:1], "parts": [None], "qa": [[]],
                              "pixel_values": batch["pixel_values"][:1]}, random.Random(0))
    assert float(model(**one)["itc_loss"]) == 0.0


def test_itc_questions_pair_a_question_rows_prefix_with_its_samples_caption():
    """train.itc_questions: the question row's prefix (Q-Former read the question) joins the contrast with
    its sample's caption as the text; a direct computation over all four rows gives the same loss."""
    model, proc, llm_tok, batch = _itc_setup(["train.itc_questions=true"])
    captions = ITC_CAPTIONS
    plain = proc.stage1_inputs(batch, random.Random(0), vqa_prob=1.0)
    assert "question_caption_ids" not in plain  # off: nothing changes for the caption-only term
    inputs = proc.stage1_inputs(batch, random.Random(0), vqa_prob=1.0, question_captions=True)
    assert inputs["caption_row"].tolist() == [True, False, True, True]
    assert inputs["question_caption_mask"].sum(1).tolist()[0] == 0 and inputs["question_caption_mask"][1].sum() > 0
    out = model(**inputs)
    with torch.no_grad():
        prefix = model.visual(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
        emb = model.experts.base.get_input_embeddings().weight
        beach = llm_tok(" " + captions[1], add_special_tokens=False)["input_ids"] + [llm_tok.eos_token_id]
        texts = []
        for r in range(4):
            ids = torch.tensor(beach) if r == 1 else inputs["input_ids"][r][inputs["labels"][r] != -100]
            texts.append(emb[ids].mean(0) - emb.mean(0))
        t = torch.nn.functional.normalize(torch.stack(texts), dim=-1)
        i = torch.nn.functional.normalize(prefix.mean(1), dim=-1)
        logits = i @ t.T / 0.07
        want = (torch.nn.functional.cross_entropy(logits, torch.arange(4)) +
                torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(out["itc_loss"], want, rtol=1e-4, atol=1e-5)
    assert float(out["itc_rows"]) == 4
    caption_only = model(**plain)
    assert float(caption_only["itc_rows"]) == 3  # the question row's text is its answer: left out
    with pytest.raises(Exception, match="itc_questions"):
        load_config("tiny", ["train.itc_questions=maybe"])


def test_loss_window_reports_itc_per_caption_row():
    from rsmoe.training.metrics import LossWindow

    w = LossWindow(["llm"])
    w.add(torch.tensor([10.0]), torch.tensor([5.0]), itc=torch.tensor([6.0, 3.0]))
    w.add(torch.tensor([2.0]), torch.tensor([5.0]), itc=torch.tensor([1.0, 1.0]))
    s = w.scalars()
    assert s["loss/itc"] == pytest.approx(7.0 / 4.0) and s["loss/total"] == pytest.approx(12.0 / 10.0)


def test_itc_bank_adds_recent_captions_as_negatives():
    args = load_config("tiny")
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.trainable_stage1()
    model.enable_itc(1.0, bank=8)
    proc = build_processor(args, llm_tok, q_tok)
    size = args.model.vision.image_size
    g = torch.Generator().manual_seed(4)

    def batch(captions):
        return {"caption": captions, "parts": [None] * len(captions), "qa": [[]] * len(captions),
                "pixel_values": torch.randn(len(captions), 3, size, size, generator=g)}

    first = proc.stage1_inputs(batch(["Many planes at the airport.", "A beach next to the sea."]), random.Random(0))
    model(**first)
    assert model.itc_bank_size == 2
    stored = model.itc_bank[-2:].clone()
    one = proc.stage1_inputs(batch(["Green farmland."]), random.Random(0))  # one row: only the bank contrasts
    out = model(**one)
    out["loss"].backward()  # the bank is updated in place after use: the backward must still work
    with torch.no_grad():
        prefix = model.visual(one["pixel_values"], one["qformer_input_ids"], one["qformer_attention_mask"])
        emb = model.experts.base.get_input_embeddings().weight
        sel = one["labels"][0] != -100
        text = torch.nn.functional.normalize(emb[one["input_ids"][0][sel]].mean(0) - emb.mean(0), dim=-1)
        image = torch.nn.functional.normalize(prefix[0].mean(0), dim=-1)
        logits = torch.cat([(image @ text)[None], image @ stored.T]) / 0.07
        want = torch.nn.functional.cross_entropy(logits[None], torch.tensor([0]))
    torch.testing.assert_close(out["itc_loss"], want, rtol=1e-4, atol=1e-5)
    assert model.itc_bank_size == 3
    torch.testing.assert_close(model.itc_bank[-1], text)
