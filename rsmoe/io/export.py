"""Exports: a run as standard files that plain transformers + peft load (behind `rsmoe export`).

    rsmoe export runs/demo/stage2 --out exports/demo               # from final/
    rsmoe export runs/demo/stage2 --tag step00000050 --out x        # from a DeepSpeed checkpoint tag
    rsmoe export runs/demo/stage2 --out exports/demo --merge        # + one full HF causal LM per expert

The export directory (docs/export.md):
  export.json / README.md      manifest: what each part is, where it came from, how to load it
  config.yaml                  the run's resolved training config
  visual/model.safetensors     qformer.*, query_tokens, language_projection.* (+ vision_model.* for a ViT),
                               named as in InstructBlipForConditionalGeneration; config.json (ViT) or
                               qformer_config.json; vision_encoder.safetensors for EfficientNet
  base/                        the causal LM the adapters apply to (save_pretrained + tokenizer):
                               Stage II = base LLM with the Stage I LoRA merged in; Stage I = the base LLM
  adapters/<expert>/           one peft LoRA adapter per expert (Stage I: adapters/llm)
  merged/<expert>/             --merge: peft's merge_and_unload of base + that adapter (AutoModelForCausalLM + tokenizer)
  router/                      model.router=learned: config.json + <expert>.safetensors (rsmoe.io.router_files)

Nothing here needs a launcher or DeepSpeed's runtime: checkpoint tags are read with
deepspeed.utils.zero_to_fp32 (any ZeRO stage, any number of ranks, per-expert engine folders).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rsmoe
from rsmoe.assets import make_tokenizer_portable
from rsmoe.config import TrainArgs, dump_config, read_config
from rsmoe.errors import UserError
from rsmoe.io import adapters, checkpoints, model_dir
from rsmoe.io.fs import save_safetensors
from rsmoe.io.router_files import export_router
from rsmoe.io.safe_load import restricted_unpickling
from rsmoe.models.build import build_model
from rsmoe.models.model import VisionTokens

log = logging.getLogger(__name__)

FORMAT = "rsmoe-export"
FORMAT_VERSION = 1


class ExportError(UserError, RuntimeError):
    """A problem with the export's input that the user must fix; the message says what to do."""


# ---------------------------------------------------------------- locating the source


@dataclass
class Source:
    run_dir: Path
    args: TrainArgs
    final_dir: Path | None = None
    tag: str | None = None
    step: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def locate(source: str | Path, tag: str | None) -> Source:
    p = Path(source)
    if not p.exists():
        raise ExportError(f"{p} does not exist: give a run directory (with final/ or checkpoints/) or a final/ directory")
    if tag is None:
        try:
            final = model_dir.resolve(p)
        except model_dir.ModelDirError as exc:  # its message names `--tag latest` and the rerun
            raise ExportError(str(exc)) from None
        return Source(run_dir=final.parent, args=model_dir.run_config(final), final_dir=final)
    run_dir = p.parent if p.name == "final" else p
    ckpt_dir = checkpoints.checkpoint_dir(run_dir)
    tags = checkpoints.complete_tags(ckpt_dir)
    if not tags:
        raise ExportError(f"{run_dir} has no complete checkpoint under {ckpt_dir}")
    name = checkpoints.latest_tag(ckpt_dir) if tag == "latest" else checkpoints.parse_tag(tag)
    if name not in tags:
        raise ExportError(f"checkpoint tag '{tag}' is not a complete checkpoint of {run_dir}; available: {', '.join(tags)}")
    if not (run_dir / model_dir.CONFIG).exists():
        raise ExportError(f"{run_dir} has no config.yaml: not a run directory written by rsmoe train")
    return Source(run_dir=run_dir, args=read_config(run_dir / model_dir.CONFIG), tag=name,
                  step=checkpoints.tag_step(ckpt_dir, name))


# ---------------------------------------------------------------- consolidating the model


def _engine_dirs(tag_dir: Path) -> list[Path]:
    """DeepSpeed checkpoint folders of a tag: the tag itself (one engine) or per-engine subfolders."""
    found = [d for d in [tag_dir, *sorted(tag_dir.rglob("*"))] if d.is_dir() and d.name != "universal"
             and "universal" not in d.relative_to(tag_dir).parts and any(d.glob("*_model_states.pt"))]
    if not found:
        raise ExportError(f"{tag_dir} holds no DeepSpeed model states (*_model_states.pt)")
    return found


def _fp32_state(ds_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Frozen parameters were excluded when saving; only trainable ones are in here. DeepSpeed unpickles
    # with weights_only=False: a checkpoint someone handed over must not run code.
    with restricted_unpickling():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    return {k: v.float() for k, v in state.items()}


def _same_buffer(saved: torch.Tensor, own: torch.Tensor) -> bool:
    """A checkpoint's copy of a frozen buffer equals the model's own, up to the 16-bit cast of training:
    zero_to_fp32 returns every tensor as fp32, and a bf16/fp16 engine had cast its buffers first."""
    if saved.shape != own.shape:
        return False
    own = own.float()
    return any(torch.equal(saved, own if dt is None else own.to(dt).float()) for dt in (None, torch.bfloat16, torch.float16))


def overlay_checkpoint(model, tag_dir: Path) -> dict[str, Any]:
    """Copy the trainable states of every engine folder of `tag_dir` into `model` (which holds all experts).

    DeepSpeed also saves every persistent buffer (e.g. EfficientNet's BatchNorm statistics). rsmoe never
    trains a buffer (frozen modules stay in eval mode), so the checkpoint's copy must equal the buffer
    of the model built from config.yaml: it is checked and skipped; a difference means the frozen
    source (e.g. model.vision.path) is not the one training used, and the export stops."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    covered: set[str] = set()
    engines = []
    for ds_dir in _engine_dirs(tag_dir):
        meta_file = ds_dir / checkpoints.ENGINE_META
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"prefix": "", "expert_ids": None}
        state = _fp32_state(ds_dir)
        prefix, eids = meta["prefix"], meta["expert_ids"]
        n_buffers = 0
        with torch.no_grad():
            for key, value in state.items():
                name = prefix + key
                if name in buffers and name not in params:
                    if not _same_buffer(value, buffers[name]):
                        raise ExportError(
                            f"{ds_dir}: buffer {key} differs from the one the model built from config.yaml has "
                            f"(max |diff| {(value - buffers[name].float()).abs().max().item():.3g}): the frozen weights "
                            "it comes from are not the ones training used; restore them (see config.yaml's model paths)"
                        )
                    n_buffers += 1
                    continue
                if name not in params:
                    raise ExportError(f"{ds_dir}: tensor {key} has no place in the model built from config.yaml")
                target = params[name]
                if _per_expert(name) and eids is not None:
                    # Adapter stacks hold only the engine's own experts: (n_local, ...) -> their global slots.
                    if value.shape[0] != len(eids):
                        raise ExportError(f"{ds_dir}: {key} holds {value.shape[0]} adapters, engine metadata lists {eids}")
                    for local, eid in enumerate(eids):
                        target[model.experts.slot_of(eid)].copy_(value[local])
                        covered.add(f"{name}[{eid}]")
                    continue
                if value.shape != target.shape:
                    raise ExportError(f"{ds_dir}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
                target.copy_(value)
                if _per_expert(name):
                    covered.update(f"{name}[{e}]" for e in model.experts.expert_ids)
                else:
                    covered.add(name)
        engines.append({"dir": str(ds_dir.relative_to(tag_dir)) or ".", "tensors": len(state) - n_buffers,
                        "frozen_buffers_checked": n_buffers, **meta})
    wanted = set()
    for name, p in params.items():
        if not p.requires_grad:
            continue
        if _per_expert(name):
            wanted.update(f"{name}[{e}]" for e in model.experts.expert_ids)
        else:
            wanted.add(name)
    missing = sorted(wanted - covered)
    if missing:
        raise ExportError(
            f"{tag_dir} lacks the state of {len(missing)} trainable tensors (e.g. {missing[:3]}): a rank's "
            "checkpoint folder is missing or was written for another config"
        )
    return {"engines": engines}


def _per_expert(name: str) -> bool:
    """Parameters stacked by expert slot: the adapters and (model.router=learned) the router (issue 17)."""
    return ".lora_" in name or name.startswith("router.")


def build_full_model(src: Source):
    """The run's model with every expert's adapter in its own slot. Returns (model, llm_tok, qformer_tok)."""
    args = src.args
    model, llm_tok, q_tok = build_model(args.model, args.seed, fresh=False)
    if src.final_dir is not None:
        model_dir.load_finished_stage(src.final_dir, model, args)
        return model, llm_tok, q_tok
    # A checkpoint tag: frozen parts from their sources (random ones are rebuilt from the seed, exactly as
    # training built them), Stage II's starting point from its Stage I directory, trainable states from ZeRO.
    if args.stage == 2:
        try:
            init_dir = model_dir.stage2_init_dir(args)  # None: stage2_init=untrained, nothing to load
        except model_dir.ModelDirError:
            raise ExportError(
                f"{src.run_dir}/config.yaml: this Stage II run started from init_from={args.init_from!r}, which is not a "
                "finished Stage I run any more; a checkpoint tag holds only the Stage II adapters, so the Stage I run "
                "directory must be there (restore or copy it back, or export from the Stage II run's final/ instead)"
            ) from None
        if init_dir is not None:
            model_dir.load_stage1_parts(init_dir, model)
        model.to_stage2(list(range(len(args.model.experts))), args.seed, args.model.experts,
                        train_qformer=args.model.train_qformer_stage2)
    src.info.update(overlay_checkpoint(model, checkpoints.checkpoint_dir(src.run_dir) / src.tag))
    return model, llm_tok, q_tok


# ---------------------------------------------------------------- writers


def write_visual(model, q_tok, out: Path) -> dict[str, Any]:
    """transformers' InstructBLIP names: qformer.*, query_tokens, language_projection.* (+ vision_model.*)."""
    visual = model.visual
    out.mkdir(parents=True)
    state = {f"qformer.{k}": v for k, v in visual.qformer.qformer.state_dict().items()}
    state["query_tokens"] = visual.qformer.query_tokens
    state.update({f"language_projection.{k}": v for k, v in visual.proj.state_dict().items()})
    info: dict[str, Any] = {"path": "visual", "key_layout": "transformers InstructBlipForConditionalGeneration"}
    qcfg = visual.qformer.qformer.config
    (out / "qformer_config.json").write_text(qcfg.to_json_string())
    if isinstance(visual.vision, VisionTokens):
        from transformers import InstructBlipConfig

        state.update({f"vision_model.{k}": v for k, v in visual.vision.vit.state_dict().items()})
        cfg = InstructBlipConfig(
            vision_config=visual.vision.vit.config.to_dict(),
            qformer_config=qcfg.to_dict(),
            text_config=model.experts.base.config.to_dict(),
            num_query_tokens=visual.qformer.query_tokens.shape[1],
        )
        cfg.save_pretrained(out)  # config.json: the directory loads as an InstructBLIP visual checkpoint
        info["vision"] = {"type": "vit", "keys": "vision_model.*"}
    else:
        save_safetensors(dict(visual.vision.net.state_dict()), out / "vision_encoder.safetensors")
        info["vision"] = {"type": type(visual.vision).__name__, "file": "visual/vision_encoder.safetensors",
                          "keys": "the encoder's own state dict (EfficientNet(...).load_state_dict)"}
    save_safetensors(state, out / "model.safetensors")
    q_tok.save_pretrained(out / "qformer_tokenizer")
    make_tokenizer_portable(out / "qformer_tokenizer")
    info.update({"file": "visual/model.safetensors", "tensors": len(state),
                 "num_query_tokens": int(visual.qformer.query_tokens.shape[1]),
                 "qformer_hidden": int(visual.qformer.hidden_size), "llm_hidden": int(visual.proj.out_features),
                 # the two parameter-free steps around the Q-Former (docs/examples/load_export.py applies them)
                 "token_norm": bool(visual.token_norm), "prefix_rms": visual.prefix_rms})
    return info


def clean_lm(experts) -> nn.Module:
    """A plain HF causal LM with the shared base's weights (the adapters' base)."""
    from transformers import AutoModelForCausalLM

    base = experts.base
    lm = AutoModelForCausalLM.from_config(base.config)
    state = experts.base_state_dict()
    missing, unexpected = lm.load_state_dict(state, strict=False)
    # Tied LM heads appear once in the state dict; anything else missing means the layout changed.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(base.config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ExportError(f"base LM state does not fit {type(lm).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return lm.float().eval()


def export_run(
    source: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    merge: bool = False,
    experts: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the export directory (module docstring); returns its path."""
    t0 = time.time()
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose another --out, or pass --overwrite to replace it")
    src = locate(source, tag)
    args = src.args
    names = list(args.model.experts) if args.stage == 2 else ["llm"]
    chosen = experts or names
    unknown = [e for e in chosen if e not in names]
    if unknown:
        raise ExportError(f"unknown expert(s) {unknown}: this stage-{args.stage} run has {names}")
    model, llm_tok, q_tok = build_full_model(src)
    model.eval()

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.no_grad():
        visual_info = write_visual(model, q_tok, tmp / "visual")
        base = clean_lm(model.experts)
        base.save_pretrained(tmp / "base")
        _save_tokenizer(llm_tok, tmp / "base")
        del base
        slots = {name: model.experts.slot_of(names.index(name)) if args.stage == 2 else 0 for name in chosen}
        adapters.write_adapters(model.experts, {slots[n]: tmp / "adapters" / n for n in chosen},
                                base_name_or_path=str(out / "base"))
        expert_rows = []
        for name in chosen:
            row = {"name": name, "expert_id": names.index(name), "adapter": f"adapters/{name}", "merged": None}
            if merge:
                # peft's merge_and_unload of the files just written: what a user of the export would get.
                lm = adapters.merged_model(tmp / "base", tmp / "adapters" / name)
                lm.save_pretrained(tmp / "merged" / name)
                _save_tokenizer(llm_tok, tmp / "merged" / name)
                row["merged"] = f"merged/{name}"
                del lm
            expert_rows.append(row)
        router_info = export_router(model.router, names, tmp / "router", chosen) if model.router is not None else None
    dump_config(args, tmp / "config.yaml")
    manifest = _manifest(src, args, visual_info, expert_rows, model)
    manifest["router"] = router_info or {"mode": args.model.router}  # issue 17: the learned router's files, docs/router.md
    (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    (tmp / "README.md").write_text(_readme(manifest))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("exported %s (%s) to %s in %.1f s", src.run_dir, src.tag or "final", out, time.time() - t0)
    return out


def _save_tokenizer(tok, out: Path) -> None:
    tok.save_pretrained(out)
    make_tokenizer_portable(out)  # loads under transformers 4.x as well


def _manifest(src: Source, args: TrainArgs, visual: dict, experts: list[dict], model) -> dict[str, Any]:
    ex = model.experts
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rsmoe_version": rsmoe.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "run_dir": str(src.run_dir.resolve()),
            "kind": "checkpoint" if src.tag else "final",
            "tag": src.tag,
            "step": src.step,
            **({"engines": src.info["engines"]} if "engines" in src.info else {}),
        },
        "stage": args.stage,
        "experts": experts,
        "expert_order": list(args.model.experts),
        "base": {
            "path": "base",
            "architecture": type(ex.base).__name__,
            "from": args.model.llm.path or f"random init (seed {args.seed}, model.llm sizes)",
            "stage1_adapter_merged": args.stage == 2,
            "dtype": "float32",
        },
        "lora": {"r": ex.lora_r, "alpha": ex.lora_alpha, "target_modules": sorted(ex.target_modules),
                 "layers": len(ex.lora_layers)},
        "visual": visual,
        "vision_source": args.model.vision.path or f"random init (seed {args.seed}, model.vision sizes)",
        "input_format": (
            "each expert reads inputs_embeds = [visual prefix (num_query_tokens x llm_hidden, from "
            "language_projection(Q-Former(queries, vision tokens, instruction))) | embedded prompt tokens]; "
            "prompts come from rsmoe's template router (rsmoe/models/router.py)"
        ),
        "config": "config.yaml",
    }


def _readme(m: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {e['name']} | `{e['adapter']}/` | {('`' + e['merged'] + '/`') if e['merged'] else '-'} |" for e in m["experts"]
    )
    src = m["source"]
    origin = f"checkpoint `{src['tag']}` (step {src['step']})" if src["kind"] == "checkpoint" else "`final/`"
    return f"""# RS-MoE export (stage {m['stage']})

Exported by rsmoe {m['rsmoe_version']} from {origin} of `{src['run_dir']}`. Manifest: `export.json`;
training config: `config.yaml`.

| expert | peft adapter | merged model |
|---|---|---|
{rows}

- `base/`: {m['base']['architecture']} the adapters apply to ({'base LLM with the Stage I LoRA merged in' if m['base']['stage1_adapter_merged'] else 'the base LLM'}), with its tokenizer.
- `visual/model.safetensors`: Q-Former (`qformer.*`), `query_tokens`, `language_projection.*`{' and the ViT (`vision_model.*`)' if m['visual']['vision']['type'] == 'vit' else '; the vision encoder is in `visual/vision_encoder.safetensors`'}.
- LoRA r={m['lora']['r']}, alpha={m['lora']['alpha']} on {', '.join(m['lora']['target_modules'])}.

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("base")
expert = PeftModel.from_pretrained(base, "adapters/{m['experts'][0]['name']}")
```

Input format: {m['input_format']}.
"""


__all__ = ["ExportError", "build_full_model", "clean_lm", "export_run", "locate"]
