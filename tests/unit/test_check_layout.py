"""rsmoe check-layout's verdict: the comparison of a layout's run with the replicated run."""

from __future__ import annotations

import json

import torch

from rsmoe.cli.check_layout import compare
from rsmoe.io.fs import save_safetensors


def fake_run(root, losses: list[dict], adapter_scale: float, experts=("theme", "objects")):
    root.mkdir()
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(losses)))
    for e in experts:  # what peft reads back (load_peft_weights): the safetensors file of the directory
        d = root / "final" / "adapters" / e
        d.mkdir(parents=True)
        save_safetensors({"base_model.model.x.lora_A.weight": torch.ones(2, 3) * adapter_scale}, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return root


def test_agreeing_runs_pass_and_each_difference_is_named(tmp_path):
    rows = [{"loss/total": 2.0, "loss/theme": 1.5, "loss/objects": 2.5}, {"loss/total": 1.8, "loss/theme": 1.4}]
    ref = fake_run(tmp_path / "ref", rows, 1.0)
    assert compare(fake_run(tmp_path / "same", rows, 1.0 + 1e-6), ref, ["theme", "objects"]) == []
    bad_loss = [rows[0], {**rows[1], "loss/theme": 1.6}]
    problems = compare(fake_run(tmp_path / "loss", bad_loss, 1.0), ref, ["theme", "objects"])
    assert len(problems) == 1 and problems[0].startswith("step 2: loss/theme 1.600000 vs 1.400000")
    nan = [rows[0], {**rows[1], "loss/total": float("nan")}]
    assert "step 2: loss/total is nan" in compare(fake_run(tmp_path / "nan", nan, 1.0), ref, ["theme", "objects"])[0]
    problems = compare(fake_run(tmp_path / "adapters", rows, 1.1), ref, ["theme", "objects"])
    assert problems == ["final adapters differ from the replicated run's (relative 1.0e-01 > 0.001)"]
