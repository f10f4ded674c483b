"""Where rsmoe keeps its own code next to a library that almost does the job (docs/design.md, "Libraries,
and where rsmoe does not use one"): the relation to the library is pinned here, so the reason stays true."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("warmup,total,min_ratio", [(5, 100, 0.1), (1, 6, 0.0), (0, 10, 0.05), (3, 4, 0.2)])
def test_warmup_cosine_is_transformers_cosine_with_min_lr_one_warmup_step_ahead(warmup, total, min_ratio):
    """Identical to transformers' get_cosine_with_min_lr_schedule_with_warmup after warmup; during warmup
    rsmoe is one step ahead ((step+1)/warmup), because transformers' step 0 has lr 0: an optimizer step
    that changes nothing (with warmup_steps=1, the first step would not learn at all)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from rsmoe.training.engine import warmup_cosine

    ours = warmup_cosine(warmup, total, min_ratio)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio).lr_lambdas[0]
    for step in range(total):
        if step < warmup:
            assert ours(step) == pytest.approx(theirs(step + 1), abs=1e-12)
        else:
            assert ours(step) == pytest.approx(theirs(step), abs=1e-12)
    if warmup:
        assert theirs(0) == 0.0 and ours(0) > 0.0


def test_adapter_file_names_are_peft_s():
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    from rsmoe.io import adapters

    assert (adapters.WEIGHTS, adapters.CONFIG) == (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)


def test_adapter_from_another_config_is_refused(tmp_path):
    """peft's LoraConfig is read back and checked: an adapter with another alpha would load silently otherwise."""
    import json

    from rsmoe.config import load_config
    from rsmoe.io.adapters import AdapterError, load_expert_adapter, save_expert_adapter
    from rsmoe.models.build import build_model

    model, _, _ = build_model(load_config("tiny").model, seed=0)
    d = save_expert_adapter(model.experts, 0, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"lora_alpha=16, but this model's config has lora_alpha=8"):
        load_expert_adapter(model.experts, 0, d)
