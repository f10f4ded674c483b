"""Durable file writes: a reader never sees half a file, and a marker never reaches the disk before
what it vouches for (power loss, not just kill -9)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync'd, then renamed over `path`."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the directories themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:  # another rank's temp file, renamed meanwhile; its writer syncs it
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, written under a temporary name and renamed into place."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
