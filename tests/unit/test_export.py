"""rsmoe export: the exported files load in plain transformers + peft and reproduce the training model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsmoe.config import load_config
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.io.adapters import read_adapter
from rsmoe.io.export import ExportError, export_run
from rsmoe.models.multi_lora import adapters_active
from rsmoe.training.state import TrainState
from tests.helpers import REPO, free_port

EXPERTS = ("theme", "objects", "relations")


def _train(overrides: list[str]) -> dict:
    from rsmoe.training.loop import train

    os.environ["MASTER_PORT"] = str(free_port())
    try:
        return train(load_config("tiny", overrides))
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_shards) -> dict[str, Path]:
    """Tiny Stage I (ZeRO-2) then Stage II (ZeRO-3), 3 steps each, one process; exported from final/ with --merge."""
    root = tmp_path_factory.mktemp("export")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    data = [f"data.train_shards={sample_shards['train']}", f"data.val_shards={sample_shards['val']}",
            "train.steps=3", "checkpoint.every=3", "train.num_eval_samples=0"]
    s1, s2 = root / "stage1", root / "stage2"
    _train(data + [f"run_dir={s1}", f"deepspeed_config={REPO}/ds_configs/zero2.json"])
    _train(data + ["stage=2", f"run_dir={s2}", f"init_from={s1}", f"deepspeed_config={REPO}/ds_configs/zero3.json"])
    export_run(s2, root / "export", merge=True)
    return {"root": root, "stage1": s1, "stage2": s2, "export": root / "export"}


def _trained_model(final: Path, stage: int):
    """The model as training left it: rebuilt from the config and the final/ directory train.py wrote."""
    import yaml

    from rsmoe.config import from_dict
    from rsmoe.io.model_dir import load_finished_stage
    from rsmoe.models.build import build_model

    args = from_dict(yaml.safe_load((final / "config.yaml").read_text()))
    assert args.stage == stage
    model, llm_tok, q_tok = build_model(args.model, args.seed)
    load_finished_stage(final, model, args)
    return model.eval(), llm_tok, q_tok, args


def _inputs(model, llm_tok, q_tok, args, sample_shards):
    """Visual prefix of real sample images + a tokenised prompt: the embeddings an expert reads."""
    from rsmoe.data.loader import build_loader
    from rsmoe.data.processor import Processor

    v = args.model.vision
    batch = next(iter(build_loader(sample_shards["val"], batch_size=2, image_size=v.image_size,
                                   image_mean=tuple(v.image_mean), image_std=tuple(v.image_std))))
    proc = Processor(llm_tok, q_tok, args.model.experts, args.model.max_prompt_len, args.model.max_target_len,
                     args.model.qformer.max_instruction_len)
    rows = proc.stage2_inputs(batch, random.Random(0), [0, 1, 2])
    with torch.no_grad():
        prefix = model.visual(rows["pixel_values"], rows["qformer_input_ids"], rows["qformer_attention_mask"])
        # Every row (each sample x each expert's prompt and target), each to be run under one adapter.
        embeds = model.experts.embed_rows(prefix[rows["row_sample"]], rows["input_ids"])
    mask = torch.cat([rows["attention_mask"].new_ones(embeds.shape[0], prefix.shape[1]), rows["attention_mask"]], dim=1)
    return embeds, mask, rows, prefix


def test_stage2_export_layout_and_manifest(runs):
    ex = runs["export"]
    manifest = json.loads((ex / "export.json").read_text())
    assert manifest["stage"] == 2 and manifest["source"]["kind"] == "final"
    assert [e["name"] for e in manifest["experts"]] == list(EXPERTS)
    for e in EXPERTS:
        cfg = json.loads((ex / "adapters" / e / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(ex / "base")
        assert (ex / "merged" / e / "model.safetensors").exists() and (ex / "merged" / e / "tokenizer.json").exists()
    visual = load_file(ex / "visual" / "model.safetensors")
    heads = {k.split(".")[0] for k in visual}
    assert heads == {"qformer", "query_tokens", "language_projection", "vision_model"}, heads
    assert (ex / "base" / "config.json").exists() and (ex / "README.md").read_text().startswith("# RS-MoE export")


def test_exported_experts_match_the_training_model(runs, sample_shards):
    """peft on the exported base, and the --merge directory, give the training model's logits (fp32, 1e-5)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ex = runs["export"]
    model, llm_tok, q_tok, args = _trained_model(runs["stage2"] / "final", stage=2)
    embeds, mask, _, _ = _inputs(model, llm_tok, q_tok, args, sample_shards)
    base_only = AutoModelForCausalLM.from_pretrained(ex / "base").eval()
    with torch.no_grad():
        plain = base_only(inputs_embeds=embeds, attention_mask=mask).logits
    seen = []
    for slot, name in enumerate(EXPERTS):
        with torch.no_grad(), adapters_active(model.experts.lora_layers, torch.full((embeds.shape[0],), slot)):
            ref = model.experts.base(inputs_embeds=embeds, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ex / "base"), ex / "adapters" / name).eval()
        merged = AutoModelForCausalLM.from_pretrained(ex / "merged" / name).eval()
        with torch.no_grad():
            got_peft = peft_model(inputs_embeds=embeds, attention_mask=mask).logits
            got_merged = merged(inputs_embeds=embeds, attention_mask=mask).logits
        d_peft, d_merged = (got_peft - ref).abs().max().item(), (got_merged - ref).abs().max().item()
        print(f"{name}: max |logit diff| peft {d_peft:.2e}, merged {d_merged:.2e} (max |logit| {ref.abs().max():.1f}); "
              f"adapter vs base-only {(ref - plain).abs().max():.2e}")
        # Merging rounds W + BA once in fp32, so the merged model is equal up to fp32 noise relative to the logits.
        torch.testing.assert_close(got_peft, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_merged, ref, rtol=1e-5, atol=1e-5)
        assert (ref - plain).abs().max() > 1e-3, f"{name}: the adapter does nothing; the comparison would be vacuous"
        seen.append(ref)
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # experts really differ


def test_exported_visual_side_matches_in_transformers(runs, sample_shards):
    """visual/ loads as an InstructBLIP visual checkpoint; its modules reproduce the training model's prefix."""
    from rsmoe.models.hf_weights import load_instructblip_visual

    model, llm_tok, q_tok, args = _trained_model(runs["stage2"] / "final", stage=2)
    _, _, rows, prefix = _inputs(model, llm_tok, q_tok, args, sample_shards)
    parts = load_instructblip_visual(runs["export"] / "visual")
    proj = torch.nn.Linear(*parts["language_projection_state"]["weight"].shape[::-1])
    proj.load_state_dict(parts["language_projection_state"])
    with torch.no_grad():
        image = parts["vision_model"](pixel_values=rows["pixel_values"]).last_hidden_state
        q = parts["query_tokens"].expand(image.shape[0], -1, -1)
        qmask = torch.cat([rows["qformer_attention_mask"].new_ones(q.shape[:2]), rows["qformer_attention_mask"]], 1)
        out = parts["qformer"](input_ids=rows["qformer_input_ids"], attention_mask=qmask, query_embeds=q,
                               encoder_hidden_states=image).last_hidden_state[:, : q.shape[1]]
        got = proj(out)
    diff = (got - prefix).abs().max().item()
    print(f"visual prefix max |diff| {diff:.2e}")
    assert diff <= 1e-5


def test_export_from_checkpoint_tags_equals_export_from_final(runs):
    """ZeRO-3 (Stage II) and ZeRO-2 (Stage I) tags: the same files, bit for bit, as final/."""
    root = runs["root"]
    for stage, ref_dir in (("stage2", runs["export"]), ("stage1", None)):
        if ref_dir is None:
            ref_dir = export_run(runs[stage], root / f"{stage}_final")
        tag_dir = export_run(runs[stage], root / f"{stage}_tag", tag="latest")
        assert json.loads((tag_dir / "export.json").read_text())["source"]["tag"] == "step00000003"
        for f in sorted(tag_dir.rglob("*.safetensors")):
            a, b = load_file(f), load_file(ref_dir / f.relative_to(tag_dir))
            assert a.keys() == b.keys(), f
            assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: {f.relative_to(tag_dir)} differs"


def test_per_expert_engine_folders_export_each_adapter(runs, tmp_path):
    """A tag with one engine folder per expert (expert-parallel layout): each adapter lands in its slot."""
    import shutil

    import yaml

    from rsmoe.config import from_dict
    from rsmoe.distributed.env import init_distributed
    from rsmoe.distributed.layout import ParallelLayout
    from rsmoe.models.build import build_model
    from rsmoe.training.checkpointer import CheckpointManager
    from rsmoe.training.engine import build_engine, load_ds_json

    run = tmp_path / "ep_run"
    run.mkdir()
    shutil.copyfile(runs["stage2"] / "config.yaml", run / "config.yaml")
    args = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed()
    try:
        engines, want = [], {}
        for eid in (2, 0, 1):  # not in slot order on purpose
            from rsmoe.io.model_dir import load_stage1_parts

            model, _, _ = build_model(args.model, args.seed)
            load_stage1_parts(runs["stage1"] / "final", model)
            model.to_stage2([eid], args.seed, EXPERTS)
            with torch.no_grad():
                for layer in model.experts.lora_layers.values():
                    layer.lora_B.normal_(generator=torch.Generator().manual_seed(eid))
            want[EXPERTS[eid]] = model.experts.adapter_state(0)
            engine, _ = build_engine(model, args, ParallelLayout(3, 1, 1, 0), load_ds_json(f"{REPO}/ds_configs/zero2.json"))
            engines.append(engine)
        CheckpointManager(run, subdirs=["ep2", "ep0", "ep1"]).save(engines, TrainState(step=7))
    finally:
        shutdown_distributed()
    out = export_run(run, tmp_path / "ep_export", tag="7")
    for name, state in want.items():
        got = {f"{p}.lora_{ab}": t for p, pair in read_adapter(model.experts, out / "adapters" / name).items()
               for ab, t in zip("AB", pair)}
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in got), name


def test_export_errors_name_the_problem(runs, tmp_path):
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match="add --tag latest"):
        export_run(tmp_path / "unfinished", tmp_path / "x")
    with pytest.raises(ExportError, match="available: step00000003"):
        export_run(runs["stage2"], tmp_path / "x", tag="step99")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(runs["stage2"], runs["export"])
    with pytest.raises(ExportError, match=r"unknown expert\(s\) \['colour'\]"):
        export_run(runs["stage2"], tmp_path / "y", experts=["colour"])


def _peft_with_all_experts(ex: Path):
    """One PeftModel on the exported base with every exported adapter loaded under its expert name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ex / "base"), ex / "adapters" / EXPERTS[0],
                                   adapter_name=EXPERTS[0])
    for name in EXPERTS[1:]:
        pm.load_adapter(ex / "adapters" / name, adapter_name=name)
    return pm.eval()


def test_merged_exports_are_peft_merge_and_unload(runs):
    """merged/<e> is peft's merge_and_unload of base + adapter, and equals W + B·A·alpha/r computed from the
    training model's own adapter slots (an independent fp32 computation)."""
    from transformers import AutoModelForCausalLM

    from rsmoe.io.adapters import merged_model

    ex = runs["export"]
    model, *_ = _trained_model(runs["stage2"] / "final", stage=2)
    base = model.experts.base_state_dict()
    for slot, name in enumerate(EXPERTS):
        merged = AutoModelForCausalLM.from_pretrained(ex / "merged" / name).state_dict()
        again = merged_model(ex / "base", ex / "adapters" / name).state_dict()
        assert merged.keys() == again.keys()
        assert all(torch.equal(merged[k], again[k]) for k in merged), f"{name}: merged/ is not merge_and_unload's"
        worst, changed = 0.0, 0
        for path, layer in model.experts.lora_layers.items():
            want = base[f"{path}.weight"] + layer.delta_weight(slot)
            worst = max(worst, (merged[f"{path}.weight"] - want).abs().max().item())
            changed += not torch.equal(merged[f"{path}.weight"], base[f"{path}.weight"])
        print(f"{name}: merged vs W + BA*alpha/r max |weight diff| {worst:.2e} over {len(model.experts.lora_layers)} layers")
        assert changed == len(model.experts.lora_layers)  # every adapted layer really moved
        assert worst <= 1e-6, f"{name}: merged weights differ from W + BA*alpha/r by {worst}"
        untouched = [k for k in merged if not any(k == f"{p}.weight" for p in model.experts.lora_layers)]
        assert all(torch.equal(merged[k], again[k]) for k in untouched)


def test_peft_mixed_batch_equals_rsmoe_batched_forward_and_generate(runs, sample_shards):
    """rsmoe's one batched forward/generate over rows of different experts == peft's own mixed batch
    (adapter_names=[...]) on one PeftModel holding the exported adapters.

    Tolerance (fp32): both compute x·W^T + (x·A^T)·B^T·alpha/r per row. rsmoe's mixed batch is one GEMM over
    all adapters' stacked ranks with the other adapters' slices zeroed (exact zeros), peft runs each
    adapter's sub-batch; measured 0 for the forward (also at SmolLM2-135M, bench/export_parity.py) and
    ~2e-6 for generate (decode steps). 2e-5 * max|logit| is a few fp32 ulps per layer of headroom over that
    and far below what a wrong adapter per row gives (> 1e-3, asserted)."""
    model, llm_tok, q_tok, args = _trained_model(runs["stage2"] / "final", stage=2)
    embeds, mask, rows, prefix = _inputs(model, llm_tok, q_tok, args, sample_shards)
    n = embeds.shape[0]
    slots = torch.tensor([(i * 2 + i // 3) % 3 for i in range(n)])  # every expert, interleaved, not in row order
    names = [EXPERTS[s] for s in slots.tolist()]
    pm = _peft_with_all_experts(runs["export"])
    with torch.no_grad(), adapters_active(model.experts.lora_layers, slots):
        ours = model.experts.base(inputs_embeds=embeds, attention_mask=mask).logits
    with torch.no_grad():
        theirs = pm(inputs_embeds=embeds, attention_mask=mask, adapter_names=names).logits
        wrong = pm(inputs_embeds=embeds, attention_mask=mask, adapter_names=[EXPERTS[(s + 1) % 3] for s in slots.tolist()]).logits
    scale = ours.abs().max().item()
    d = (ours - theirs).abs().max().item()
    print(f"mixed batch of {n} rows: max |logit diff| rsmoe vs peft {d:.2e} (max |logit| {scale:.1f}); "
          f"wrong adapters {(ours - wrong).abs().max():.2e}")
    assert d <= 2e-5 * scale
    assert (ours - wrong).abs().max() > 1e-3

    # generate: rsmoe's batched ExpertLM.generate vs peft's generate(adapter_names=...) on the same inputs.
    gen_rows = 6
    ids, am = rows["input_ids"][:gen_rows], rows["attention_mask"][:gen_rows]
    # left-pad the prompts (ExpertLM.generate's contract) and build the layout it documents: [pad | prefix | prompt]
    lens = am.sum(1)
    left = torch.full_like(ids, llm_tok.pad_token_id)
    left_mask = torch.zeros_like(am)
    for i, L in enumerate(lens.tolist()):
        left[i, ids.shape[1] - L:] = ids[i, :L]
        left_mask[i, ids.shape[1] - L:] = 1
    pre = prefix[rows["row_sample"][:gen_rows]]
    g_slots = slots[:gen_rows]
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=llm_tok.pad_token_id, eos_token_id=None)
    ours_g = model.experts.generate(pre, left, left_mask, g_slots, **kw)
    tok = model.experts.base.get_input_embeddings()(left)
    emb = torch.stack([torch.cat([tok[i, :ids.shape[1] - L], pre[i], tok[i, ids.shape[1] - L:]]) for i, L in enumerate(lens.tolist())])
    m = torch.stack([torch.cat([left_mask[i, :ids.shape[1] - L], torch.ones(pre.shape[1], dtype=am.dtype),
                                left_mask[i, ids.shape[1] - L:]]) for i, L in enumerate(lens.tolist())])
    with torch.no_grad():
        theirs_g = pm.generate(inputs_embeds=emb, attention_mask=m, adapter_names=names[:gen_rows], **kw)
    ol, tl = torch.stack(ours_g.logits), torch.stack(theirs_g.logits)
    dg = (ol - tl).abs().max().item()
    print(f"generate, {gen_rows} rows x 6 tokens: max |logit diff| {dg:.2e} (max |logit| {ol.abs().max():.1f}); "
          f"tokens equal: {torch.equal(ours_g.sequences, theirs_g.sequences)}")
    assert torch.equal(ours_g.sequences, theirs_g.sequences)
    assert dg <= 2e-5 * ol.abs().max().item()


def _pixels(args, sample_shards, n: int = 2) -> torch.Tensor:
    from rsmoe.data.loader import build_loader

    v = args.model.vision
    return next(iter(build_loader(sample_shards["val"], batch_size=n, image_size=v.image_size,
                                  image_mean=tuple(v.image_mean), image_std=tuple(v.image_std))))["pixel_values"]


@pytest.mark.parametrize("transformers_major", [5, 4])
def test_export_loads_in_plain_transformers_4_and_5(runs, sample_shards, tmp_path, transformers_major):
    """The documented snippet (docs/examples/load_export.py) in a process without rsmoe: tokenizers give
    rsmoe's ids, and the visual prefix, base, each peft expert, each merged expert and peft's mixed batch
    give the training model's numbers, under the pinned transformers 5.x and under a 4.x venv."""

    from tests.helpers.export_check import assert_loads, python_for, run_check, write_reference

    python = python_for(transformers_major)
    model, llm_tok, q_tok, args = _trained_model(runs["stage2"] / "final", stage=2)
    ref = write_reference(model, llm_tok, q_tok, args, _pixels(args, sample_shards), runs["export"], tmp_path)
    result = run_check(python, runs["export"], ref)
    print(json.dumps(result))
    assert result["transformers"].split(".")[0] == str(transformers_major)
    assert_loads(result)


def test_export_doc_includes_the_tested_snippet():
    """docs/export.md shows docs/examples/load_export.py verbatim: the code the tests above run."""
    doc = Path(REPO, "docs", "export.md").read_text()
    snippet = Path(REPO, "docs", "examples", "load_export.py").read_text()
    assert f"```python\n{snippet}```" in doc, "docs/export.md no longer includes docs/examples/load_export.py verbatim"


def test_export_snippet_applies_token_norm_and_prefix_norm(tmp_path):
    """The two parameter-free steps (model.vision.token_norm, model.prefix_norm) are in export.json and the
    documented snippet reproduces rsmoe's prefix with them."""
    import importlib.util

    from rsmoe.io.export import write_visual
    from rsmoe.models.build import build_model

    args = load_config("tiny", ["model.vision.token_norm=true", "model.prefix_norm=true"])
    model, _, q_tok = build_model(args.model, seed=0)
    info = write_visual(model, q_tok, tmp_path / "visual")
    assert info["token_norm"] is True and info["prefix_rms"] == model.visual.prefix_rms > 0
    (tmp_path / "export.json").write_text(json.dumps({"visual": info}))
    spec = importlib.util.spec_from_file_location("load_export", Path(REPO, "docs", "examples", "load_export.py"))
    snippet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snippet)
    g = torch.Generator().manual_seed(0)
    size = args.model.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    ids, mask = torch.randint(5, 50, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        want = model.visual(pixels, ids, mask)
    got = snippet.load_visual(str(tmp_path))(pixels, ids, mask)
    assert (got - want).abs().max().item() <= 1e-5
