"""Training: what each stage trains, loss falls on a fixed batch, resume == uninterrupted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsmoe.config import load_config
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.distributed.layout import ParallelLayout
from rsmoe.models.build import build_model
from rsmoe.training.loop import train


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows}


def _run(preset_overrides: list[str], extra: list[str]) -> dict:
    args = load_config("tiny", preset_overrides + extra)
    try:
        return train(args)
    finally:
        shutdown_distributed()


def test_stage1_then_stage2_train_exactly_their_parameters(tiny_overrides, tmp_path, dist_env):
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _run(tiny_overrides, [f"run_dir={s1}", "train.steps=4"])
    _run(tiny_overrides, ["stage=2", f"run_dir={s2}", f"init_from={s1}", "train.steps=4"])

    fresh, _, _ = build_model(load_config("tiny").model, seed=42)
    fresh_state = {k: v for k, v in fresh.state_dict().items()}
    frozen1 = load_file(s1 / "final" / "frozen_random.safetensors")
    # Stage I: vision and LLM base untouched, bit for bit; Q-Former, projection and LoRA moved.
    for k, v in frozen1.items():
        assert torch.equal(v, fresh_state[k].float()), k
    visual1 = load_file(s1 / "final" / "visual.safetensors")
    assert not torch.equal(visual1["qformer.query_tokens"], fresh_state["visual.qformer.query_tokens"])
    assert not torch.equal(visual1["proj.weight"], fresh_state["visual.proj.weight"])
    a1 = load_file(s1 / "final" / "stage1_adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a1.items())

    # Stage II: the whole visual side is frozen and identical; every expert's adapter trained, all different.
    visual2 = load_file(s2 / "final" / "visual.safetensors")
    assert visual2.keys() == visual1.keys()
    for k in visual1:
        assert torch.equal(visual1[k], visual2[k]), k
    assert torch.equal(load_file(s2 / "final" / "frozen_random.safetensors")["experts.base.lm_head.weight"],
                       frozen1["experts.base.lm_head.weight"])
    adapters = {e: load_file(s2 / "final" / "adapters" / e / "adapter_model.safetensors") for e in ("theme", "objects", "relations")}
    for e, state in adapters.items():
        b_keys = [k for k in state if k.endswith("lora_B.weight")]
        assert b_keys and all(state[k].abs().sum() > 0 for k in b_keys), f"{e} adapter did not train"
        assert json.loads((s2 / "final" / "adapters" / e / "adapter_config.json").read_text())["peft_type"] == "LORA"
    names = list(adapters)
    for i in range(3):
        for j in range(i + 1, 3):
            k = next(iter(adapters[names[i]]))
            assert not torch.equal(adapters[names[i]][k], adapters[names[j]][k]), (names[i], names[j])


def test_stage2_without_stage1_is_a_clear_error(tiny_overrides, tmp_path, dist_env):
    with pytest.raises(FileNotFoundError, match="Stage II needs a finished Stage I run"):
        _run(tiny_overrides, ["stage=2", f"run_dir={tmp_path / 's2'}", f"init_from={tmp_path / 'nothing'}"])


def test_loss_falls_on_a_fixed_batch(sample_shards, dist_env):
    from rsmoe.data.loader import build_loader
    from rsmoe.data.processor import Processor
    from rsmoe.distributed.env import init_distributed
    from rsmoe.training.engine import build_engine, load_ds_json

    args = load_config("tiny", ["optim.lr=1e-2", "optim.warmup_steps=0", "train.steps=50", "optim.min_lr_ratio=1.0", "stage=2"])
    init_distributed()
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts, train_qformer=True)
    proc = Processor(llm_tok, q_tok, args.model.experts, 40, 48, 24)
    batch = next(iter(build_loader(sample_shards["train"], batch_size=2, image_size=64,
                                   image_mean=(0.5,) * 3, image_std=(0.5,) * 3)))
    inputs = proc.stage2_inputs(batch, random.Random(0), [0, 1, 2])
    engine, _ = build_engine(model, args, ParallelLayout(3, 1, 1, 0), load_ds_json("ds_configs/zero2.json"))
    first = last = None
    for _ in range(50):
        out = engine(**inputs)
        engine.backward(out["loss"])
        engine.step()
        first = first if first is not None else out["expert_loss"].clone()
        last = out["expert_loss"]
    print("fixed-batch loss per expert", first.tolist(), "->", last.tolist())
    assert (last < 0.5 * first).all(), (first, last)  # every expert memorises its own sub-caption


def test_resume_gives_the_same_run_as_uninterrupted(tiny_overrides, tmp_path, dist_env):
    common = tiny_overrides + ["train.steps=6", "checkpoint.every=2", "train.log_every=1"]
    full, parted = tmp_path / "full", tmp_path / "parted"
    _run(common, [f"run_dir={full}"])
    out = _run(common, [f"run_dir={parted}", "train.stop_after_steps=3"])
    assert out["preempted"] and out["step"] == 3
    assert (parted / "checkpoints" / "latest").read_text() == "step00000003"
    _run(common, [f"run_dir={parted}"])
    a, b = _losses(full), _losses(parted)
    for step in (4, 5, 6):
        assert a[step] == b[step], (step, a[step], b[step])
    fa = load_file(full / "final" / "stage1_adapter" / "adapter_model.safetensors")
    fb = load_file(parted / "final" / "stage1_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert len(list((parted / "checkpoints").glob("step*"))) == 2  # keep=2 purged the oldest
