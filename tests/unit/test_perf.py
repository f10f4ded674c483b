"""Performance changes keep the maths: dense multi-adapter LoRA, causal-only mask for right padding,
gradient checkpointing with adapters, ZeRO-3's residency rule (same adapters as ZeRO-2), and
length-aware batching (same row losses and gradients; the split that pads least)."""

from __future__ import annotations

import pytest
import torch

from rsmoe.config import ConfigError, load_config
from rsmoe.training.engine import build_ds_config, mark_frozen_resident_leaves, resident_parameters
from rsmoe.models.build import build_model
from rsmoe.models.experts import is_right_padded
from rsmoe.models.multi_lora import MultiLoRALinear
from tests.helpers import fixed_stage2_batch, random_adapters


def _stage2_model(overrides: list[str] | None = None):
    args = load_config("tiny", overrides or [])
    model, _, _ = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts)
    return random_adapters(model)


def test_dense_multi_adapter_lora_equals_per_row_formula():
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(16, 24), n_adapters=3, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(5, 7, 16, requires_grad=True)
    idx = torch.tensor([2, 0, 1, 1, 2])
    layer.adapter_index = idx
    y = layer(x)
    ref = torch.stack([layer.base(x[i]) + x[i] @ layer.lora_A[k].T @ layer.lora_B[k].T * 2.0 for i, k in enumerate(idx.tolist())])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # gradients reach only the adapters that rows used, and match the reference's
    (gy,) = torch.autograd.grad(y.square().sum(), layer.lora_A)
    (gr,) = torch.autograd.grad(ref.square().sum(), layer.lora_A)
    torch.testing.assert_close(gy, gr, rtol=1e-4, atol=1e-4)


def test_right_padding_needs_no_mask():
    model = _stage2_model().train()
    torch.manual_seed(0)
    rows, q, h = 6, 8, model.experts.hidden_size
    prefix = torch.randn(rows, q, h)
    ids = torch.randint(5, 100, (rows, 12))
    lengths = torch.tensor([12, 9, 5, 12, 7, 3])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    slots = torch.tensor([0, 1, 2, 0, 1, 2])
    assert is_right_padded(mask) and not is_right_padded(mask.flip(1))
    loss, tokens = model.experts(prefix, ids, mask, labels, slots)  # takes the mask-free path
    # Reference: each row alone, unpadded (no mask needed, no padding present).
    for r in range(rows):
        n = int(lengths[r])
        l1, t1 = model.experts(prefix[r : r + 1], ids[r : r + 1, :n], mask[r : r + 1, :n], labels[r : r + 1, :n], slots[r : r + 1])
        torch.testing.assert_close(loss[r], l1[0], rtol=1e-5, atol=1e-5)
        assert int(tokens[r]) == int(t1[0]) == n


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    torch.manual_seed(0)
    prefix, ids = torch.randn(6, 8, 64), torch.randint(5, 100, (6, 10))
    slots = torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for ckpt in (False, True):
        model = _stage2_model([f"model.gradient_checkpointing={str(ckpt).lower()}"]).train()
        loss, _ = model.experts(prefix, ids, torch.ones_like(ids), ids.clone(), slots)
        loss.sum().backward()
        grads.append([p.grad.clone() for p in model.experts.lora_parameters()])
    assert all(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_zero3_auto_keeps_a_fitting_model_resident_and_caps_the_rest(monkeypatch):
    import rsmoe.training.engine as engine

    args = load_config("tiny", ["stage=2"])
    model = _stage2_model()
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}
    numels = [p.numel() for p in model.parameters()]
    cfg = build_ds_config(args, ds, 1, model)
    z = cfg["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == max(numels)
    assert z["stage3_model_persistence_threshold"] >= sum(numels) and z["memory_efficient_linear"] is False
    resident = resident_parameters(model, z["stage3_param_persistence_threshold"], z["stage3_model_persistence_threshold"])
    assert len(resident) == len(numels)
    # A device too small for the model: DeepSpeed's cap is what fits, the rest will be partitioned.
    monkeypatch.setattr(engine, "device_memory_bytes", lambda: sum(numels) * 4)  # half fits at RESIDENT_FRACTION 0.5
    z = build_ds_config(args, ds, 1, model)["zero_optimization"]
    assert z["stage3_model_persistence_threshold"] == sum(numels) // 2 and "memory_efficient_linear" not in z
    resident = resident_parameters(model, z["stage3_param_persistence_threshold"], z["stage3_model_persistence_threshold"])
    kept = sum(p.numel() for p in model.parameters() if id(p) in resident)
    assert 0 < kept <= sum(numels) // 2 and len(resident) < len(numels)
    # Parameter offload asked for: DeepSpeed's default, nothing extra stays on the device.
    ds_off = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto", "offload_param": {"device": "cpu"}}}
    assert build_ds_config(args, ds_off, 1, model)["zero_optimization"]["stage3_param_persistence_threshold"] == 10**5
    # An explicit number in the JSON is the user's choice.
    ds_num = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1234}}
    assert build_ds_config(args, ds_num, 1, model)["zero_optimization"]["stage3_param_persistence_threshold"] == 1234


def test_only_frozen_resident_subtrees_become_leaves():
    model = _stage2_model()
    marked = mark_frozen_resident_leaves(model, {id(p) for p in model.parameters()})
    assert "visual" in marked  # Stage II: the whole visual side is frozen
    for name in marked:
        mod = model.get_submodule(name)
        assert getattr(mod, "_z3_leaf", False)
        assert not any(p.requires_grad for p in mod.parameters())
        assert not isinstance(mod, torch.nn.ModuleList)
    assert not any(".lora" in n or n.endswith(("mlp", "up_proj", "gate_proj", "down_proj")) for n in marked)


def _train_adapters(ds_json: str, steps: int = 3) -> list[torch.Tensor]:
    from rsmoe.distributed.env import init_distributed, shutdown_distributed
    from rsmoe.distributed.layout import ParallelLayout
    from rsmoe.training.engine import build_engine, load_ds_json

    args = load_config("tiny", ["stage=2", "optim.warmup_steps=0", "optim.lr=1e-2", "train.precision=fp32"])
    init_distributed()
    try:
        layout = ParallelLayout(n_experts=3, ep=1, world_size=1, rank=0)
        layout.build_groups()
        model = _stage2_model()
        engine, _ = build_engine(model, args, layout, load_ds_json(ds_json))
        inputs = fixed_stage2_batch(torch.Generator().manual_seed(3))
        for _ in range(steps):
            out = engine(**inputs)
            engine.backward(out["loss"])
            engine.step()
        import deepspeed

        params = model.experts.lora_parameters()
        with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
            return [p.detach().clone() for p in params]
    finally:
        shutdown_distributed()


def test_zero3_with_residency_trains_the_same_adapters_as_zero2(dist_env):
    import os

    from tests.helpers import REPO

    z2 = _train_adapters(os.path.join(REPO, "ds_configs", "zero2.json"))
    z3 = _train_adapters(os.path.join(REPO, "ds_configs", "zero3.json"))
    assert any(a.abs().sum() > 0 for a in z2)
    for a, b in zip(z2, z3):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- length-aware batching


def test_length_groups_are_the_split_that_pads_least():
    import itertools
    import random

    from rsmoe.models.experts import length_groups

    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randint(1, 7), rng.randint(1, 4)
        lengths = [rng.randint(1, 40) for _ in range(n)]
        groups = length_groups(lengths, k)
        assert len(groups) == min(k, n) and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(n))
        cost = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        srt = sorted(lengths)
        best = min(  # brute force over every split of the sorted rows into min(k, n) contiguous groups
            sum((b - a) * srt[b - 1] for a, b in zip((0, *cuts), (*cuts, n)))
            for cuts in itertools.combinations(range(1, n), min(k, n) - 1)
        )
        assert cost == best, (lengths, k, groups)


def test_length_groups_give_the_same_row_losses_and_adapter_gradients():
    model = _stage2_model().train()
    torch.manual_seed(0)
    rows, q, h = 7, 8, model.experts.hidden_size
    prefix = torch.randn(rows, q, h)
    ids = torch.randint(5, 100, (rows, 20))
    lengths = torch.tensor([20, 3, 11, 19, 4, 7, 12])
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # prompt positions
    slots = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    results = []
    for k in (1, 2, 3):
        model.zero_grad(set_to_none=True)
        loss, tokens = model.experts.forward_by_length(prefix, ids, mask, labels, slots, k)
        loss.sum().backward()
        results.append((loss.detach(), tokens, [p.grad.clone() for p in model.experts.lora_parameters()]))
    for loss, tokens, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(tokens, results[0][1])
        for a, b in zip(grads, results[0][2]):  # float rounding only: relative to the gradient's scale
            assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-5 * b.abs().max(), ((a - b).abs().max(), b.abs().max())
    # Through RSMoE.forward: the model attribute the builders set from train.length_groups.
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels, "adapter_index": slots,
              "row_sample": torch.arange(rows), "prefix": prefix}
    out1 = model(**inputs)
    model.length_groups = 3
    out3 = model(**inputs)
    torch.testing.assert_close(out3["expert_loss"], out1["expert_loss"], rtol=1e-5, atol=1e-6)
    assert torch.equal(out3["expert_tokens"], out1["expert_tokens"])


def test_length_groups_are_capped_at_the_rows_every_rank_has():
    from rsmoe.distributed.layout import ParallelLayout
    from rsmoe.training.builders import build_stage_model

    args = load_config("tiny", ["train.length_groups=4", "train.micro_batch_size=2"])
    model, _, _ = build_stage_model(args, ParallelLayout(n_experts=3, ep=1, world_size=1, rank=0))
    assert model.length_groups == 2  # Stage I: one row per sample
    args = load_config("tiny", ["train.length_groups=2"])
    assert build_stage_model(args, ParallelLayout(n_experts=3, ep=1, world_size=1, rank=0))[0].length_groups == 2
    with pytest.raises(ConfigError, match="train.length_groups"):
        load_config("tiny", ["train.length_groups=0"])
