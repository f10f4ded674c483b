"""Reference numbers rsmoe computes for an export, and running tests/helpers/check_export.py (plain
transformers + peft, no rsmoe) on it under any Python: this venv's transformers 5.x or a 4.x venv."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers import REPO

TEXTS = ["A residential area with many houses and green trees.", "How many tennis courts are there?",
         "Instruction: Describe the objects in this image.\nResponse:"]
TF4_ENV = "RSMOE_TF4_PYTHON"


def write_reference(model, llm_tok, q_tok, args, pixel_values: torch.Tensor, export_dir: Path, out: Path) -> tuple[Path, Path]:
    """What the training model (rsmoe) computes for the inputs check_export.py feeds the export."""
    from rsmoe.models.multi_lora import adapters_active

    manifest = json.loads((export_dir / "export.json").read_text())
    names = [e["name"] for e in manifest["experts"]]
    b = pixel_values.shape[0]
    q = q_tok(["Describe the image in detail.", "What objects are there?"][:b] * (b // 2 + 1), padding="longest",
              truncation=True, max_length=args.model.qformer.max_instruction_len, return_tensors="pt")
    q_ids, q_mask = q["input_ids"][:b], q["attention_mask"][:b]
    prompt = torch.tensor([llm_tok("Instruction: Describe the image.\nResponse:", add_special_tokens=False)["input_ids"]] * b)
    t = {"pixel_values": pixel_values, "qformer_input_ids": q_ids, "qformer_attention_mask": q_mask, "prompt_ids": prompt}
    with torch.no_grad():
        t["prefix"] = model.visual(pixel_values, q_ids, q_mask)
        embeds = model.experts.embed_rows(t["prefix"], prompt)
        t["logits/base"] = model.experts.base(inputs_embeds=embeds).logits
        for name in names:
            slot = 0 if args.stage == 1 else model.experts.slot_of(list(args.model.experts).index(name))
            with adapters_active(model.experts.lora_layers, torch.full((b,), slot)):
                t[f"logits/{name}"] = model.experts.base(inputs_embeds=embeds).logits
    ids = {"base": [llm_tok(x)["input_ids"] for x in TEXTS],
           "visual/qformer_tokenizer": [q_tok(x)["input_ids"] for x in TEXTS]}
    ids.update({e["merged"]: ids["base"] for e in manifest["experts"] if e["merged"]})
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, out / "reference.safetensors")
    (out / "reference.json").write_text(json.dumps({"texts": TEXTS, "token_ids": ids, "experts": names}))
    return out / "reference.safetensors", out / "reference.json"


def run_check(python: str, export_dir: Path, ref: tuple[Path, Path], timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([python, os.path.join(REPO, "tests", "helpers", "check_export.py"), str(export_dir), *map(str, ref)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    assert proc.returncode == 0, f"{python} check_export.py failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tf4_python() -> str | None:
    """The 4.x venv's python: $RSMOE_TF4_PYTHON, else the checkout's .venv-tf4 (`bash setup.sh --tests`
    makes it), else None (the 4.x load tests skip)."""
    for p in (os.environ.get(TF4_ENV), os.path.join(REPO, ".venv-tf4", "bin", "python")):
        if p and os.access(p, os.X_OK):
            return p
    return None


def python_for(transformers_major: int) -> str:
    """The interpreter to check an export under transformers `transformers_major` (5: this one; 4: the
    4.x venv); skips the calling test when there is no 4.x venv."""
    import sys

    import pytest

    python = sys.executable if transformers_major == 5 else tf4_python()
    if python is None:
        pytest.skip(f"no transformers 4.x venv: set {TF4_ENV} to its python (.ci/run creates .venv-tf4 from requirements-tf4.txt)")
    return python


def assert_loads(result: dict, *, logit_tol: float = 2e-5, prefix_tol: float = 1e-5) -> None:
    """Tokenizers give rsmoe's ids; every model's logits and the visual prefix match rsmoe's (fp32)."""
    assert all(result["tokens_equal"].values()), result
    scale = max(1.0, result["max_abs_logit"])
    for k, v in result["max_abs"].items():
        tol = prefix_tol if k == "visual_prefix" else logit_tol * scale
        assert v <= tol, f"transformers {result['transformers']}: {k} differs from rsmoe by {v:.3g} (> {tol:.3g})"


__all__ = ["TEXTS", "TF4_ENV", "assert_loads", "run_check", "tf4_python", "write_reference"]
