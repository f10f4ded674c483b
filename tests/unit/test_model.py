"""Model: batched multi-adapter forward/generate equal per-expert runs and plain peft; router; composition."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from rsmoe.config import load_config
from rsmoe.data.processor import Processor
from rsmoe.inference.generate import caption
from rsmoe.io.adapters import save_expert_adapter
from rsmoe.models.build import build_model
from rsmoe.models.compose import compose_caption
from rsmoe.models.multi_lora import adapters_active
from rsmoe.models.router import TemplateRouter
from tests.helpers import random_adapters


@pytest.fixture(scope="module")
def stage2_model():
    args = load_config("tiny")
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts)
    random_adapters(model)
    proc = Processor(llm_tok, q_tok, args.model.experts, 40, 48, 24)
    return model.eval(), proc


def test_build_is_deterministic_under_seed():
    args = load_config("tiny")
    a, _, _ = build_model(args.model, seed=3)
    b, _, _ = build_model(args.model, seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_trainable_sets_per_stage():
    args = load_config("tiny")
    model, _, _ = build_model(args.model, seed=0)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual.qformer", "visual.proj", "experts.base"}  # base = only its lora_ params
    assert all(".lora_" in n for n, p in model.experts.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.visual.vision.parameters())
    model.to_stage2([0, 1, 2], 0, args.model.experts)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)


def test_batched_rows_equal_one_expert_at_a_time(stage2_model):
    model, _ = stage2_model
    torch.manual_seed(0)
    rows, q, h = 6, 8, model.experts.hidden_size
    prefix = torch.randn(rows, q, h)
    ids = torch.randint(5, 100, (rows, 10))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    slots = torch.tensor([0, 1, 2, 2, 0, 1])
    loss, tokens = model.experts(prefix, ids, mask, labels, slots)
    for r in range(rows):
        l1, _ = model.experts(prefix[r : r + 1], ids[r : r + 1], mask[r : r + 1], labels[r : r + 1], slots[r : r + 1])
        torch.testing.assert_close(loss[r], l1[0], rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == [10] * rows
    # Different adapters really give different results on the same row.
    same_row = model.experts(prefix[:1].repeat(3, 1, 1), ids[:1].repeat(3, 1), mask[:1].repeat(3, 1), labels[:1].repeat(3, 1), torch.tensor([0, 1, 2]))[0]
    assert len({round(float(x), 5) for x in same_row}) == 3


def test_exported_adapter_matches_plain_peft(stage2_model, tmp_path):
    model, _ = stage2_model
    base_cfg = model.experts.base.config
    plain = LlamaForCausalLM(base_cfg)
    missing, unexpected = plain.load_state_dict(model.experts.base_state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(5, 100, (2, 12))
    for slot in range(3):
        d = save_expert_adapter(model.experts, slot, tmp_path / f"expert{slot}")
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM(base_cfg), d)
        peft_model.base_model.model.load_state_dict(
            {k.replace(".weight", ".base_layer.weight") if _is_target(k, model) else k: v
             for k, v in model.experts.base_state_dict().items()},
            strict=False,
        )
        with torch.no_grad(), adapters_active(model.experts.lora_layers, torch.full((2,), slot)):
            ours = model.experts.base(input_ids=ids).logits
        theirs = peft_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _is_target(key: str, model) -> bool:
    return any(key == f"{p}.weight" for p in model.experts.lora_layers)


def test_batched_generation_equals_experts_in_turn(stage2_model):
    model, proc = stage2_model
    pixels = torch.randn(2, 3, 64, 64)
    batched = caption(model, proc, pixels, ["Describe this image in detail.", None], sequential=False)
    in_turn = caption(model, proc, pixels, ["Describe this image in detail.", None], sequential=True)
    assert batched == in_turn
    assert set(batched[0]["experts"]) == {"theme", "objects", "relations"}


def test_router_prompts_and_question_routing():
    r = TemplateRouter(["theme", "objects", "relations"])
    prompts = r.caption_prompts("Describe this image.")
    assert len(prompts) == 3 and all(p.startswith("Describe this image.") for p in prompts)
    assert len(set(prompts)) == 3
    assert r.route_question("How many buildings are there?", "count") == "objects"
    assert r.route_question("Are there more roads than buildings?", "comp") == "relations"
    assert r.route_question("Is it a rural or an urban area?", "rural_urban") == "theme"
    assert r.route_question("Is there a road next to the river?") == "relations"
    assert r.route_question("How many ships are there?") == "objects"


def test_compose_orders_and_dedupes():
    parts = {
        "relations": "A road runs along the river.",
        "theme": "This is an aerial image of a harbour. Many boats.",
        "objects": "Many boats. there are two piers",
    }
    out = compose_caption(parts, ["theme", "objects", "relations"])
    assert out == "This is an aerial image of a harbour. Many boats. there are two piers. A road runs along the river."
    # An expert stopped by the token limit: its unfinished last sentence is a fragment, left out; a
    # single unfinished sentence is all that expert said, kept.
    cut = {"theme": "A harbour.", "objects": "Two piers. There are", "relations": "Boats along the"}
    assert compose_caption(cut, ["theme", "objects", "relations"], ["objects", "relations"]) == "A harbour. Two piers. Boats along the."
    assert compose_caption(cut, ["theme", "objects", "relations"]) == "A harbour. Two piers. There are. Boats along the."


def test_stage2_rows_skip_empty_parts_and_route_questions(stage2_model):
    import random

    _, proc = stage2_model
    batch = {
        "pixel_values": torch.randn(2, 3, 64, 64),
        "caption": ["a", "b"],
        "instruction": [None, None],
        "parts": [{"theme": "A harbour.", "objects": "Two boats.", "relations": ""},
                  {"theme": "A field.", "objects": "", "relations": ""}],
        "qa": [[{"question": "How many boats are there?", "answer": "2", "type": "count"}], []],
    }
    full = proc.stage2_inputs(batch, random.Random(0), [0, 1, 2], vqa_prob=1.0)
    # theme x2, objects x1, the count question on objects, and one label-free relations row so every adapter steps.
    assert full["adapter_index"].tolist() == [0, 1, 1, 0, 2]
    assert (full["labels"][4] == -100).all() and (full["labels"][:4] != -100).any(dim=1).all()
    # The question gets its own prefix (the Q-Former reads the question), of the same image: 3 prefixes, 2 images.
    assert full["qformer_input_ids"].shape[0] == 3 and full["pixel_values"].shape[0] == 2
    assert full["prefix_image"].tolist() == [0, 0, 1]
    assert full["row_sample"].tolist() == [0, 0, 1, 2, 0]
    # An EP rank holding only 'relations' draws the same prefixes, so the EP group's all-gather lines up.
    ep_rank = proc.stage2_inputs(batch, random.Random(0), [2], vqa_prob=1.0)
    assert torch.equal(ep_rank["pixel_values"], full["pixel_values"])
    assert torch.equal(ep_rank["prefix_image"], full["prefix_image"])
    assert torch.equal(ep_rank["qformer_input_ids"], full["qformer_input_ids"])
    assert ep_rank["adapter_index"].tolist() == [0]
    # That rank's expert has no target in this batch: it still runs a forward/backward, with zero loss.
    rank_model, _, _ = build_model(load_config("tiny").model, seed=0)
    rank_model.to_stage2([2], 0, load_config("tiny").model.experts)
    out = rank_model(**ep_rank)
    assert out["expert_tokens"].tolist() == [0] and out["loss"].item() == 0.0
    out["loss"].backward()


def test_processor_rows_are_prompt_then_target_eos_tokens_truncated(stage2_model):
    """The batched, cached tokenization equals tokenizing each row on its own: prompt (format_prompt, cut at
    max_prompt_len) then ' ' + target cut at max_target_len - 1, then eos; labels only on the target."""
    import random

    from rsmoe.data.processor import format_prompt

    _, proc = stage2_model
    tok = proc.llm_tokenizer
    long = " ".join(["buildings"] * 80)  # longer than max_target_len
    batch = {"pixel_values": torch.randn(3, 3, 64, 64), "caption": ["x", "y", "z"], "instruction": [None, "Describe it.", None],
             "parts": [{"theme": "A harbour.", "objects": long, "relations": "Boats along the pier. "},
                       {"theme": "A field.", "objects": "", "relations": "Roads cross it."},
                       {"theme": long, "objects": "Trees.", "relations": ""}],
             "qa": [[], [], []]}
    for _ in range(2):  # second pass: every prompt from the cache
        out = proc.stage2_inputs(batch, random.Random(5), [0, 1, 2])
        rng = random.Random(5)
        expected = []
        for i in range(3):
            prompts = proc.router.caption_prompts(proc.instruction_for(batch, i, rng))
            for eid, name in enumerate(proc.experts):
                target = batch["parts"][i][name].strip()
                if target:
                    p = tok(format_prompt(prompts[eid]), add_special_tokens=False)["input_ids"][: proc.max_prompt_len]
                    t = tok(" " + target, add_special_tokens=False)["input_ids"][: proc.max_target_len - 1] + [tok.eos_token_id]
                    expected.append((eid, p, t))
        assert out["adapter_index"].tolist() == [e for e, _, _ in expected]
        for row, (_, p, t) in enumerate(expected):
            n = len(p) + len(t)
            assert out["input_ids"][row, :n].tolist() == p + t
            assert out["labels"][row, len(p):n].tolist() == t and (out["labels"][row, : len(p)] == -100).all()
            assert out["attention_mask"][row].sum().item() == n
        assert any(len(t) == proc.max_target_len for _, _, t in expected)  # the truncation case is exercised


def test_prefixes_sharing_an_image_encode_it_once_with_the_same_result(stage2_model):
    """prefix_image: two instructions about one image give the prefixes of that image passed twice, while
    the frozen vision encoder sees it once (training forward and VQA inference)."""
    model, proc = stage2_model
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    qids, qmask = proc.encode_instructions(["Describe it.", "Is there a road?", "How many houses are there?"])
    calls = []
    hook = model.visual.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            shared = model.visual(pixels, qids, qmask, torch.tensor([0, 0, 1]))
            repeated = model.visual(pixels[[0, 0, 1]], qids, qmask)
        assert calls == [2, 3]
        torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)
        answers_shared = inference_answer(model, proc, pixels, [0, 0, 1, 1])
        answers_repeated = inference_answer(model, proc, pixels[[0, 0, 1, 1]], None)
        assert answers_shared == answers_repeated
    finally:
        hook.remove()


def inference_answer(model, proc, pixels, image_index):
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import answer

    qs = ["Is there a road?", "How many houses are there?", "Is it a rural area?", "What is the area covered by buildings?"]
    return answer(model, proc, pixels, qs, ["presence", "count", "rural_urban", "area"], GenerationArgs(max_new_tokens=6),
                  image_index=image_index)


def test_projection_reinit_warning_only_when_building_to_train(tmp_path, caplog):
    """An InstructBLIP projection of the wrong width is re-initialised: said once, when Stage I builds the
    model to train it; builds that load a trained stage over it (fresh=False: eval, caption, export) stay quiet."""
    import logging

    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        LlamaConfig,
    )

    text = LlamaConfig(vocab_size=1500, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    cfg = InstructBlipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, image_size=32, patch_size=8),
                             qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, vocab_size=1500, encoder_hidden_size=32),
                             text_config=text.to_dict(), num_query_tokens=8)
    InstructBlipForConditionalGeneration(cfg).save_pretrained(tmp_path / "iblip")
    m = load_config("tiny", [f"model.vision.path={tmp_path / 'iblip'}", f"model.qformer.path={tmp_path / 'iblip'}",
                             "model.vision.image_size=32"]).model
    for fresh, expected in ((True, 1), (False, 0)):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="rsmoe.models.hf_weights"):
            build_model(m, seed=0, fresh=fresh)
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "initialising a new projection" in r.getMessage()]
        assert len(warned) == expected, (fresh, [r.getMessage() for r in caplog.records])
    assert any("initialising a new projection" in r.getMessage() for r in caplog.records)  # still there, at debug
