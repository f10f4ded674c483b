"""The adapter format: one expert's LoRA as a standard peft adapter directory, written and read by peft.

    <dir>/adapter_config.json        peft LoraConfig (task CAUSAL_LM), LoraConfig.save_pretrained
    <dir>/adapter_model.safetensors  peft's adapter state dict (get_peft_model_state_dict)

This module is the only one that knows that format, and it leaves the format to peft: the files
are peft's `LoraConfig.save_pretrained` / `get_peft_model_state_dict` output, read back with
`LoraConfig.from_pretrained` / `load_peft_weights` / `set_peft_model_state_dict`. The tensors go
through a real `PeftModel` (`PeftView`) over a weightless skeleton of the base architecture, so
peft decides every key name. Training keeps rsmoe's stacked `MultiLoRALinear` (peft refuses
batches that mix adapters in training mode); `ExpertLM.adapter_tensors(slot)` /
`load_adapter_tensors(slot, ...)` move one slot in and out of that layout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from rsmoe.errors import UserError
from rsmoe.io.fs import save_safetensors

# peft's file names (peft.utils.constants SAFETENSORS_WEIGHTS_NAME / CONFIG_NAME; a test pins them), spelt
# out so that checking a directory does not import peft and transformers (seconds).
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class AdapterError(UserError, ValueError):
    """An adapter directory that does not fit the model it is loaded into; the message says why."""


def lora_config(experts, base_name_or_path: str = ""):
    """The peft LoraConfig of `experts`' adapters (all experts share r, alpha, dropout and targets)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=experts.lora_r,
        lora_alpha=experts.lora_alpha,
        lora_dropout=experts.lora_dropout,
        target_modules=sorted(experts.target_modules),
        bias="none",
        base_model_name_or_path=base_name_or_path or None,
        inference_mode=True,
    )


class PeftView:
    """A peft `PeftModelForCausalLM` over a skeleton of `experts.base`'s architecture, for file I/O only.

    The skeleton is built on the meta device (no memory, no init, any model size); only the LoRA target
    layers get a zero-stride CPU weight, because peft creates each adapter on its base layer's device
    and dtype. Adapters are named by the caller (expert names); their tensors are copied between the
    view's peft layers and rsmoe's slots, and peft writes and reads the files.
    """

    def __init__(self, experts, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.experts = experts
        self.dtype = dtype or next(iter(experts.lora_layers.values())).lora_A.dtype
        with init_empty_weights():
            # A copy (from_config writes into the config it is given); never run, so eager attention: no check
            # for the base's attention kernel (e.g. flash-attn) applies.
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(experts.base.config), attn_implementation="eager")
        for path in experts.lora_layers:
            lin = skeleton.get_submodule(path)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{path} is a {type(lin).__name__} in {type(skeleton).__name__}, not the nn.Linear rsmoe adapted")
            lin.weight = nn.Parameter(torch.zeros((), dtype=self.dtype).expand(lin.out_features, lin.in_features),
                                      requires_grad=False)
        self.skeleton = skeleton
        self.model = None  # the PeftModel, created with the first adapter

    def add(self, name: str, config) -> None:
        from peft import get_peft_model

        base_path = config.base_model_name_or_path
        if self.model is None:
            self.model = get_peft_model(self.skeleton, config, adapter_name=name, autocast_adapter_dtype=False)
        else:
            self.model.add_adapter(name, config, autocast_adapter_dtype=False)
        # peft fills this in from the (nameless) skeleton; keep the caller's.
        self.model.peft_config[name].base_model_name_or_path = base_path

    def _layer(self, path: str):
        return self.model.base_model.model.get_submodule(path)

    @torch.no_grad()
    def put(self, name: str, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for path, (a, b) in tensors.items():
            layer = self._layer(path)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)

    def get(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {path: (self._layer(path).lora_A[name].weight.detach(), self._layer(path).lora_B[name].weight.detach())
                for path in self.experts.lora_layers}

    def save(self, name: str, out_dir: Path) -> Path:
        """peft's state dict of adapter `name` and its LoraConfig into `out_dir` (the weights atomically)."""
        from peft.utils import get_peft_model_state_dict

        out_dir.mkdir(parents=True, exist_ok=True)
        # save_embedding_layers=False: nothing but LoRA is trained; "auto" would look the base up on the Hub.
        state = get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
        save_safetensors(state, out_dir / WEIGHTS)
        self.model.peft_config[name].save_pretrained(str(out_dir))
        return out_dir

    def load(self, name: str, adapter_dir: Path) -> None:
        """Read one peft adapter directory into the view as adapter `name`, refusing anything that does not fit."""
        from peft import LoraConfig
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        try:
            config = LoraConfig.from_pretrained(str(adapter_dir))
        except (OSError, ValueError, TypeError) as exc:
            raise AdapterError(f"{adapter_dir}: not a peft LoRA adapter directory ({type(exc).__name__}: {exc})") from None
        self._check_fits(config, adapter_dir)
        self.add(name, config)
        weights = load_peft_weights(str(adapter_dir), device="cpu")
        result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and ".lora_" in k]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise AdapterError(
                f"{adapter_dir}: the adapter does not fit this base: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                "it was trained for another base model or config"
            )

    def _check_fits(self, config, where: Path) -> None:
        ex = self.experts
        found = {"peft_type": str(getattr(config.peft_type, "value", config.peft_type)), "r": config.r,
                 "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules or []),
                 "use_dora": bool(config.use_dora), "use_rslora": bool(config.use_rslora)}
        want = {"peft_type": "LORA", "r": ex.lora_r, "lora_alpha": ex.lora_alpha,
                "target_modules": sorted(ex.target_modules), "use_dora": False, "use_rslora": False}
        wrong = {k: found[k] for k in want if found[k] != want[k]}
        if wrong:
            raise AdapterError(
                f"{where}/{CONFIG}: {', '.join(f'{k}={v!r}' for k, v in wrong.items())}, but this model's config has "
                f"{', '.join(f'{k}={want[k]!r}' for k in wrong)}: the adapter belongs to another config"
            )


# ---------------------------------------------------------------- rsmoe slots <-> adapter directories


def write_adapters(experts, dirs: dict[int, str | Path], *, state: dict[str, torch.Tensor] | None = None,
                   base_name_or_path: str = "") -> list[Path]:
    """Write adapter slot -> directory for every entry of `dirs`. `state`: the ExpertLM's stacked LoRA
    tensors by their own names (a gathered ZeRO-3 state dict); default: its live parameters."""
    view = PeftView(experts, dtype=None if state is None else next(iter(state.values())).dtype)
    config = lora_config(experts, base_name_or_path)
    out = []
    for slot, d in dirs.items():
        name = f"slot{slot}"
        view.add(name, config)
        view.put(name, experts.adapter_tensors(slot, state))
        out.append(view.save(name, Path(d)))
    return out


def save_expert_adapter(experts, slot: int, out_dir: str | Path, base_name_or_path: str = "") -> Path:
    """The adapter in `slot` of an ExpertLM as a peft adapter directory."""
    return write_adapters(experts, {slot: out_dir}, base_name_or_path=base_name_or_path)[0]


def load_adapters(experts, dirs: dict[int, str | Path]) -> None:
    """Load each peft adapter directory of `dirs` (slot -> directory) into that slot of an ExpertLM."""
    view = PeftView(experts, dtype=torch.float32)
    for slot, d in dirs.items():
        name = f"slot{slot}"
        view.load(name, Path(d))
        experts.load_adapter_tensors(slot, view.get(name), where=str(d))


def load_expert_adapter(experts, slot: int, adapter_dir: str | Path) -> None:
    load_adapters(experts, {slot: adapter_dir})


def read_adapter(experts, adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (lora_A, lora_B)} of one adapter directory, as `ExpertLM.adapter_tensors` gives a slot."""
    view = PeftView(experts, dtype=torch.float32)
    view.load("read", Path(adapter_dir))
    return {p: (a.clone(), b.clone()) for p, (a, b) in view.get("read").items()}


def adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """An adapter directory's tensors under peft's own names, without a model (peft's load_peft_weights):
    for comparing two directories of the same architecture."""
    from peft.utils import load_peft_weights

    return load_peft_weights(str(adapter_dir), device="cpu")


def has_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / WEIGHTS).is_file()


# ---------------------------------------------------------------- plain transformers + peft


def merged_model(base_dir: str | Path, adapter_dir: str | Path) -> nn.Module:
    """peft's own merge: the base LM at `base_dir` with the adapter merged in (`merge_and_unload`), fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


__all__ = ["AdapterError", "CONFIG", "PeftView", "WEIGHTS", "adapter_weights", "has_adapter", "load_adapters", "load_expert_adapter",
           "lora_config", "merged_model", "read_adapter", "save_expert_adapter", "write_adapters"]
