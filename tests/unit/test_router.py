"""Instruction Router modes (none / template / learned): prompts, question routes, the learned router's
training signal against a direct computation, and each mode trained, generated, saved, loaded and exported."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.helpers import REPO, free_port

from rsmoe.config import ConfigError, GenerationArgs, load_config
from rsmoe.data.processor import Processor
from rsmoe.models.build import build_model
from rsmoe.models.router import DEFAULT_CAPTION_INSTRUCTION, LearnedRouter, make_router

EXPERTS = ["theme", "objects", "relations"]


def batch_with_questions(n_images: int = 3) -> dict:
    parts = [{"theme": "A harbour.", "objects": "Two boats.", "relations": "The boats are next to the pier."},
             {"theme": "A field.", "objects": "", "relations": ""},
             {"theme": "An airport.", "objects": "Three planes.", "relations": ""}][:n_images]
    qa = [[{"question": "How many boats are there?", "answer": "2", "type": "count"}],
          [{"question": "Is it a rural area?", "answer": "yes", "type": "rural_urban"}],
          [{"question": "Are there more planes than runways?", "answer": "no", "type": "comp"}]][:n_images]
    return {"pixel_values": torch.randn(n_images, 3, 64, 64), "caption": ["c"] * n_images, "instruction": [None] * n_images,
            "parts": parts, "qa": qa}


def tiny_model(router: str, seed: int = 0, **over):
    args = load_config("tiny", [f"model.router={router}", *[f"{k}={v}" for k, v in over.items()]])
    model, llm_tok, q_tok = build_model(args.model, seed=seed)
    model.to_stage2([0, 1, 2], seed, args.model.experts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial adapters and router (B, W_out and the route head start at zero)
        for p in model.experts.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if model.router is not None:
            for p in model.router.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), Processor.for_model(args.model, llm_tok, q_tok), args


# ---------------------------------------------------------------- prompts and routes


def test_none_gives_every_expert_the_users_instruction():
    r = make_router("none", EXPERTS)
    assert r.caption_prompts("Describe the harbour.") == ["Describe the harbour."] * 3
    assert r.caption_prompts(None) == [DEFAULT_CAPTION_INSTRUCTION] * 3
    assert r.route_with_reason("How many boats?", "count") == ("theme", "first")  # no routing: the first expert
    t = make_router("template", EXPERTS).caption_prompts("Describe the harbour.")
    assert len(set(t)) == 3 and all(p.startswith("Describe the harbour. ") for p in t)


def test_none_rows_and_generation_use_one_prompt_for_all_experts(monkeypatch):
    from rsmoe.inference.generate import caption

    model, proc, _ = tiny_model("none")
    batch = batch_with_questions(1)
    rows = proc.stage2_inputs(batch, random.Random(0), [0, 1, 2])
    assert rows["adapter_index"].tolist() == [0, 1, 2]
    prompt_ids = proc._prompt_ids(proc.instruction_for(batch, 0, random.Random(0)))
    for r in range(3):  # each row: the same instruction tokens, then that expert's own target
        assert rows["input_ids"][r, : len(prompt_ids)].tolist() == prompt_ids
        assert (rows["labels"][r, : len(prompt_ids)] == -100).all()
    seen = []
    original = proc.generation_rows
    monkeypatch.setattr(proc, "generation_rows", lambda prompts: (seen.append(list(prompts)), original(prompts))[1])
    caption(model, proc, torch.randn(1, 3, 64, 64), ["Describe the harbour."], GenerationArgs(max_new_tokens=2))
    assert seen[0] == ["Describe the harbour."] * 3


def test_expert_parts_merge_targets_and_follow_routes():
    tok_args = load_config("tiny")
    _, llm_tok, q_tok = build_model(tok_args.model, seed=0)
    two = load_config("tiny", ["model.experts=[theme,objects_relations]", "model.expert_parts={objects_relations: [objects, relations]}"])
    proc = Processor.for_model(two.model, llm_tok, q_tok)
    batch = batch_with_questions(2)
    assert proc.expert_target(batch["parts"][0], "objects_relations") == "Two boats. The boats are next to the pier."
    assert proc.expert_target(batch["parts"][1], "objects_relations") == ""  # both parts empty: no row for it
    rows = proc.stage2_inputs(batch, random.Random(0), [0, 1])
    assert rows["adapter_index"].tolist() == [0, 1, 0]
    prompt = proc.router.caption_prompts("x")[1]
    assert prompt == "x Describe the objects (kinds, counts, colours) and their arrangement."  # both parts, one sentence
    assert proc.router.route_question("q", "count") == "objects_relations"
    assert proc.router.route_question("q", "comp") == "objects_relations"
    assert proc.router.route_question("q", "rural_urban") == "theme"
    one = load_config("tiny", ["model.experts=[caption]", "model.expert_parts={caption: [theme, objects, relations]}"])
    p1 = Processor.for_model(one.model, llm_tok, q_tok)
    assert p1.expert_target(batch["parts"][0], "caption") == "A harbour. Two boats. The boats are next to the pier."


def test_config_rejects_bad_router_settings():
    with pytest.raises(ConfigError, match="model.router"):
        load_config("tiny", ["model.router=gated"])
    with pytest.raises(ConfigError, match="model.expert_parts.scene.*not a caption part"):
        load_config("tiny", ["model.experts=[scene,objects]"])
    with pytest.raises(ConfigError, match="unknown caption part"):
        load_config("tiny", ["model.experts=[a]", "model.expert_parts={a: [theme, colour]}"])
    with pytest.raises(ConfigError, match="not in model.experts"):
        load_config("tiny", ["model.expert_parts={other: [theme]}"])
    with pytest.raises(ConfigError, match="stage2_init"):
        load_config("tiny", ["stage=2", "stage2_init=untrained", "init_from=runs/x"])


# ---------------------------------------------------------------- the learned router's training signal


def test_route_targets_are_the_argmin_of_each_experts_answer_loss_alone():
    """The route target of each question = the expert whose teacher-forced answer loss is lowest, checked by
    running each expert alone on that question's row (its own prefix, its own soft prompts, its adapter)."""
    model, proc, _ = tiny_model("learned")
    batch = batch_with_questions(3)
    inputs = proc.stage2_inputs(batch, random.Random(0), [0, 1, 2], vqa_prob=1.0)
    nq = inputs["question_rows"].shape[1]
    assert nq == 3 and inputs["question_rows"].shape == (3, 3)
    # Training rows: one per question on the typed expert (count -> objects, rural_urban -> theme, comp -> relations).
    w = inputs["row_weight"]
    trained = [int(inputs["adapter_index"][inputs["question_rows"][:, q][w[inputs["question_rows"][:, q]] == 1]]) for q in range(nq)]
    assert trained == [1, 0, 2]
    with torch.no_grad():
        out = model(**inputs)
        direct = torch.zeros(3, nq)
        prefix = model.visual(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                              inputs.get("prefix_image"))
        for q in range(nq):
            p = int(inputs["question_prefix"][q])
            ids, mask = proc.encode_router_instructions([proc.router.question_prompt(batch["qa"][q][0]["question"])])
            emb = model.experts.base.get_input_embeddings()(ids)
            for e in range(3):
                # A fresh router call on this one prefix (not the batched one), this expert only.
                soft, _ = model.router(prefix[p : p + 1], emb, mask)
                row = int(inputs["question_rows"][e, q])
                one = slice(row, row + 1)
                loss, tokens = model.experts(torch.cat([prefix[p : p + 1], soft[:, e]], dim=1), inputs["input_ids"][one],
                                             inputs["attention_mask"][one], inputs["labels"][one], torch.tensor([e]))
                direct[e, q] = loss[0] / tokens[0]
    torch.testing.assert_close(out["route_losses"], direct, rtol=1e-5, atol=1e-6)
    assert out["route_target"].tolist() == direct.argmin(dim=0).tolist()
    assert len(set(direct.argmin(dim=0).tolist())) > 1 or direct.std() > 0  # the experts really differ
    # The LM loss counts only the training rows: the probe rows change the route target, not the experts' losses.
    plain = model(**{k: v for k, v in inputs.items() if k not in ("question_rows", "question_prefix")})
    torch.testing.assert_close(plain["expert_loss"], out["expert_loss"])


def test_route_loss_gradient_is_the_cross_entropy_gradient():
    """The loss the model back-propagates (LM loss of the training rows + the route surrogate) has exactly the
    gradient of LM loss + cross-entropy(route logits, argmin target), recomputed here from the parts."""
    model, proc, _ = tiny_model("learned")
    inputs = proc.stage2_inputs(batch_with_questions(3), random.Random(0), [0, 1, 2], vqa_prob=1.0)
    out = model(**inputs)
    model.zero_grad()
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.router.named_parameters()}
    model.zero_grad()

    prefix = model.visual(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                          inputs.get("prefix_image"))
    soft, logits = model.router_outputs(prefix, inputs["router_input_ids"], inputs["router_attention_mask"])
    rows = model.expert_rows(prefix, inputs["row_sample"], inputs["adapter_index"], soft)
    row_loss, row_tokens = model.experts(rows, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                         inputs["adapter_index"])
    keep = inputs["row_weight"] > 0
    lm = sum(row_loss[keep & (inputs["adapter_index"] == s)].sum() / row_tokens[keep & (inputs["adapter_index"] == s)].sum()
             for s in range(3))
    ce = F.cross_entropy(logits[inputs["question_prefix"]].float(), out["route_target"])
    torch.testing.assert_close(ce.detach(), out["route_loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm.detach(), out["expert_loss"].sum(), rtol=1e-6, atol=1e-6)
    (lm + ce).backward()
    for n, p in model.router.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-8, msg=n)
    assert got["w_route"].abs().sum() > 0 and got["soft_base"].abs().sum() > 0 and got["w_out"].abs().sum() > 0


def test_untrained_route_head_falls_back_to_the_typed_route():
    from rsmoe.inference.generate import answer

    model, proc, _ = tiny_model("learned")
    with torch.no_grad():
        model.router.w_route.zero_()
        model.router.b_route.zero_()
    assert not model.router.route_trained()
    qs, types = ["How many boats?", "Is it rural?"], ["count", "rural_urban"]
    gen = GenerationArgs(max_new_tokens=2)
    out = answer(model, proc, torch.randn(2, 3, 64, 64), qs, types, gen)
    assert [(o["expert"], o["route"], o["confidence"]) for o in out] == [("objects", "type", None), ("theme", "type", None)]
    with torch.no_grad():
        model.router.b_route.copy_(torch.tensor([0.0, 0.0, 5.0]))  # a trained head that prefers 'relations'
    out = answer(model, proc, torch.randn(2, 3, 64, 64), qs, types, gen)
    assert [o["route"] for o in out] == ["learned", "learned"] and {o["expert"] for o in out} == {"relations"}
    assert all(0.9 < o["confidence"] <= 1.0 for o in out)


# ---------------------------------------------------------------- train, generate, save, load, export


@pytest.fixture(scope="module")
def stage1_run(sample_shards, tmp_path_factory) -> Path:
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.training.loop import train

    root = tmp_path_factory.mktemp("router")
    os.environ["MASTER_PORT"] = str(free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    try:
        train(load_config("tiny", [f"data.train_shards={sample_shards['train']}", f"run_dir={root / 'stage1'}",
                                   f"deepspeed_config={REPO}/ds_configs/zero2.json", "train.steps=2", "train.num_eval_samples=0"]))
    finally:
        shutdown_distributed()
    return root / "stage1"


@pytest.mark.parametrize("mode", ["none", "template", "learned"])
def test_each_mode_trains_generates_saves_loads_and_exports(mode, stage1_run, sample_shards, tmp_path):
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.inference.generate import answer, caption
    from rsmoe.inference.load import load_trained
    from rsmoe.io.export import export_run
    from rsmoe.training.loop import train

    run = tmp_path / mode
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        result = train(load_config("tiny", [f"data.train_shards={sample_shards['train']}", f"run_dir={run}", "stage=2",
                                            f"data.val_shards={sample_shards['val']}",
                                            f"init_from={stage1_run}", f"deepspeed_config={REPO}/ds_configs/zero3.json",
                                            f"model.router={mode}", "data.vqa_prob=1.0", "train.steps=3",
                                            "checkpoint.every=3", "train.num_eval_samples=1"]))
    finally:
        shutdown_distributed()
    final = run / "final"
    assert (final / "router").is_dir() == (mode == "learned")
    if mode == "learned":
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "route/questions" in result  # the run's summary reports the head, even for a step with no question
        assert sum(r["route/questions"] for r in rows) > 0 and any("route/loss" in r for r in rows)
    t = load_trained(run, "cpu")
    pixels = torch.randn(2, 3, 64, 64)
    caps = caption(t.model, t.processor, pixels, None, GenerationArgs(max_new_tokens=3))
    assert [set(c["experts"]) for c in caps] == [set(EXPERTS)] * 2
    ans = answer(t.model, t.processor, pixels, ["How many roads are there?", "Is it rural?"], ["count", "rural_urban"],
                 GenerationArgs(max_new_tokens=2))
    routes = {"none": ["first", "first"], "template": ["type", "type"], "learned": ["learned", "learned"]}[mode]
    assert [a["route"] for a in ans] == routes
    assert all((a["confidence"] is None) == (mode != "learned") for a in ans)

    # Exported from final/ and from the last checkpoint tag: the same adapters and router, both trained.
    from_final = export_run(run, tmp_path / "export_final")
    from_tag = export_run(run, tmp_path / "export_tag", tag="latest")
    manifest = json.loads((from_final / "export.json").read_text())
    assert manifest["router"]["mode"] == mode
    for e in EXPERTS:
        a, b = (load_file(d / "adapters" / e / "adapter_model.safetensors") for d in (from_final, from_tag))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if mode != "learned":
        assert not (from_final / "router").exists()
        return
    cfg = json.loads((from_final / "router" / "config.json").read_text())
    assert cfg["format"] == "rsmoe-learned-router" and cfg["expert_order"] == EXPERTS and cfg["route_trained"]
    fresh = LearnedRouter(t.model.experts.hidden_size, [0, 1, 2], soft_tokens=t.cfg.model.learned_router.soft_tokens,
                          width=t.cfg.model.learned_router.hidden, seed=t.cfg.seed,
                          token_embeddings=t.model.experts.base.get_input_embeddings().weight)
    for slot, e in enumerate(EXPERTS):
        saved = load_file(final / "router" / f"{e}.safetensors")
        exported, tagged = (load_file(d / "router" / f"{e}.safetensors") for d in (from_final, from_tag))
        for k, v in saved.items():
            assert torch.equal(v, exported[k]) and torch.equal(v, tagged[k]), (e, k)
            assert torch.equal(v, t.model.router.slot_state(slot)[k].float()), (e, k)  # loaded = saved
        assert not torch.equal(saved["soft_base"], fresh.slot_state(slot)["soft_base"]), f"{e}: soft prompts did not train"
        assert saved["w_route"].abs().sum() > 0, f"{e}: route head did not train"


def test_one_stage_trains_from_an_untrained_start_and_loads(sample_shards, tmp_path):
    """stage2_init=untrained: no Stage I run; the Q-Former trains with the experts; final/ has a no-op
    stage1_adapter and loads like any Stage II directory."""
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.inference.load import load_trained
    from rsmoe.training.loop import train

    run = tmp_path / "one"
    ov = [f"data.train_shards={sample_shards['train']}", f"run_dir={run}", "stage=2", "stage2_init=untrained",
          "model.train_qformer_stage2=true", f"deepspeed_config={REPO}/ds_configs/zero2.json", "train.steps=3",
          "train.num_eval_samples=0"]
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        train(load_config("tiny", ov))
    finally:
        shutdown_distributed()
    s1 = load_file(run / "final" / "stage1_adapter" / "adapter_model.safetensors")
    assert s1 and all(v.abs().sum() == 0 for v in s1.values())
    fresh, _, _ = build_model(load_config("tiny").model, seed=42)
    visual = load_file(run / "final" / "visual.safetensors")
    assert not torch.equal(visual["proj.weight"], fresh.visual.proj.weight)  # trained in the one stage
    t = load_trained(run, "cpu")
    torch.testing.assert_close(t.model.visual.proj.weight, visual["proj.weight"])
    base_fresh = fresh.experts.base_state_dict()
    for k, v in t.model.experts.base_state_dict().items():
        assert torch.equal(v, base_fresh[k]), k  # the no-op Stage I adapter left the base as built


def test_eval_report_shows_the_expert_and_the_routers_confidence(tmp_path):
    from rsmoe.eval.report import write_report

    items = [{"key": "k", "qa": [
        {"question": "How many?", "type": "count", "answer": "2", "prediction": "2", "expert": "objects", "route": "learned",
         "confidence": 0.8312},
        {"question": "Rural?", "type": "rural_urban", "answer": "yes", "prediction": "no", "expert": "theme", "route": "type",
         "confidence": None}]}]
    paths = write_report(tmp_path, {"meta": {"router": "learned"}}, items)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "| How many? | count | objects (0.83) |" in md and "| Rural? | rural_urban | theme |" in md
    assert "<td>objects (0.83)</td>" in page
    saved = json.loads(paths["json"].read_text())["items"][0]["qa"]
    assert [(q["route"], q["confidence"]) for q in saved] == [("learned", 0.8312), ("type", None)]
