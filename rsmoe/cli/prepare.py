"""Build webdataset shards from the sample data bundled in the repository (data/sample: real RSVQA and
UC Merced images). Skips the work when the shards are up to date (docs/data.md)."""

from __future__ import annotations

import argparse
import json

from rsmoe.data.sample import DEFAULT_OUT, build_sample_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the shards are up to date")
    parser.add_argument("--shard-size", type=int, default=64, help="max samples per shard (default 64)")


def run(ns: argparse.Namespace) -> int:
    manifest = build_sample_shards(ns.out, force=ns.force, shard_size=ns.shard_size, progress=True)
    state = "up to date" if manifest.get("up_to_date") else "built"
    print(f"sample shards {state} in {ns.out}")
    print(json.dumps({k: v for k, v in manifest.items() if k != "up_to_date"}, indent=2, sort_keys=True))
    return 0
