"""Export a run into standard files that plain transformers + peft load (docs/export.md).

    rsmoe export runs/demo/stage2 --out exports/demo               # from final/
    rsmoe export runs/demo/stage2 --tag step00000050 --out x        # from a DeepSpeed checkpoint tag
    rsmoe export runs/demo/stage2 --out exports/demo --merge        # + one full HF causal LM per expert
"""

from __future__ import annotations

import argparse
import logging

from rsmoe.io.export import export_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory (uses its final/ unless --tag), or a final/ directory")
    p.add_argument("--out", "-o", required=True, help="export directory to write (must not exist unless --overwrite)")
    p.add_argument("--tag", help="read a checkpoint tag instead of final/: 'latest', 'step00000050' or '50'")
    p.add_argument("--merge", action="store_true", help="also write merged/<expert>/: a full HF causal LM per expert")
    p.add_argument("--experts", help="comma-separated expert names to export (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
    experts = [e.strip() for e in ns.experts.split(",") if e.strip()] if ns.experts else None
    print(export_run(ns.source, ns.out, tag=ns.tag, merge=ns.merge, experts=experts, overwrite=ns.overwrite))
    return 0
