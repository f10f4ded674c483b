"""Loading checkpoints without unpickling arbitrary objects.

rsmoe's own files are safetensors (model directories, adapters) or `torch.load(weights_only=True)`
(RNG state, legacy `.bin` weights). DeepSpeed 0.19.8 is the exception: its `TorchCheckpointEngine.load`,
`zero_to_fp32` and the universal-checkpoint loaders call `torch.load(..., weights_only=False)`
explicitly, which overrides torch 2.13's safe default and would run any code pickled into a
`*_states.pt` file. `restricted_unpickling()` closes that: inside it every `torch.load` is forced to
`weights_only=True`, with only the three plain-data DeepSpeed classes its checkpoints contain
allowlisted, and a refused file raises `UnsafeCheckpointError` naming the file and the global.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
from typing import Any, Iterator

import torch

from rsmoe.errors import UserError


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint file holds Python objects other than tensors and plain data: refused."""


def deepspeed_safe_globals() -> list[Any]:
    """Classes DeepSpeed 0.19.8 pickles into ZeRO-1/2/3 optimizer states (plain data, no side effects)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _describe(exc: Exception) -> str:
    m = re.search(r"GLOBAL (\S+)", str(exc))  # "Unsupported global: GLOBAL x" / "unsupported GLOBAL x whose module"
    return f"global {m.group(1)}" if m else "unsupported pickle content"


@contextlib.contextmanager
def restricted_unpickling(extra_globals: list[Any] | None = None) -> Iterator[None]:
    """Within the block, `torch.load` never unpickles arbitrary objects, whatever its caller asks."""
    allowed = deepspeed_safe_globals() + list(extra_globals or [])
    original = torch.load

    @functools.wraps(original)
    def safe_load(f, *args: Any, **kwargs: Any):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refused to load {f}: it contains a Python object that is not plain data ({_describe(exc)}), "
                "so it was not written by rsmoe/DeepSpeed or was tampered with; only load checkpoints from "
                "your own run directories"
            ) from None

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original
