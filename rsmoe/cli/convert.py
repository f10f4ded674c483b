"""Convert a public remote-sensing dataset into rsmoe webdataset shards (one sample schema; docs/data.md).

    rsmoe convert rsicap --annotations captions.json --images DIR --out data/shards/rsicap
    rsmoe convert karpathy --annotations dataset_ucm.json --images imgs/ --out data/shards/ucm
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from rsmoe.data.convert import (
    ConvertError,
    convert_samples,
    open_karpathy,
    open_nwpu,
    open_rsicap,
    open_rsieval,
    open_rsvqa,
    open_vrsbench,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One subcommand per format (rsicap, rsieval, karpathy, nwpu, rsvqa, vrsbench)."""
    sub = parser.add_subparsers(dest="convert_format", metavar="FORMAT", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--images", required=True, help="folder with the dataset's images")
        p.add_argument("--out", required=True, help="output folder for <split>-NNNNNN.tar shards + manifest.json")
        p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
        p.add_argument("--no-progress", action="store_true", help="disable the progress bar")

    p = sub.add_parser("rsicap", help="RSICap captions.json")
    p.add_argument("--annotations", required=True, help="captions.json")
    p.add_argument("--split", default="train")
    common(p)
    p = sub.add_parser("rsieval", help="RSIEval annotations.json")
    p.add_argument("--annotations", required=True, help="annotations.json")
    p.add_argument("--split", default="test")
    common(p)
    p = sub.add_parser("karpathy", help="Karpathy-style caption JSON (UCM-Captions, Sydney-Captions, RSICD)")
    p.add_argument("--annotations", required=True, help="dataset_*.json")
    p.add_argument("--dataset", default=None, help="dataset name (default: the file's 'dataset' field)")
    common(p)
    p = sub.add_parser("nwpu", help="NWPU-Captions dataset_nwpu.json")
    p.add_argument("--annotations", required=True, help="dataset_nwpu.json")
    common(p)
    p = sub.add_parser("rsvqa", help="RSVQA-LR / RSVQA-HR (*images*.json, *questions*.json, *answers*.json)")
    p.add_argument("--images-json", required=True)
    p.add_argument("--questions-json", required=True)
    p.add_argument("--answers-json", required=True)
    p.add_argument("--split", default=None, help="default: taken from the file names, else train")
    p.add_argument("--dataset", default=None, help="default: RSVQA-LR for Sentinel-2, else RSVQA-HR")
    common(p)
    p = sub.add_parser("vrsbench", help="VRSBench VRSBench_EVAL_Cap.json (+ VRSBench_EVAL_vqa.json)")
    p.add_argument("--captions-json", required=True)
    p.add_argument("--vqa-json", default=None)
    p.add_argument("--split", default="test")
    common(p)


def open_source(ns: argparse.Namespace, skipped: Counter[str]):
    """The chosen format's reader (checks the annotation files before anything is written)."""
    fmt = ns.convert_format
    if fmt == "rsicap":
        return open_rsicap(ns.annotations, ns.images, split=ns.split, skipped=skipped)
    if fmt == "rsieval":
        return open_rsieval(ns.annotations, ns.images, split=ns.split, skipped=skipped)
    if fmt == "karpathy":
        return open_karpathy(ns.annotations, ns.images, dataset=ns.dataset, skipped=skipped)
    if fmt == "nwpu":
        return open_nwpu(ns.annotations, ns.images, skipped=skipped)
    if fmt == "rsvqa":
        return open_rsvqa(ns.images_json, ns.questions_json, ns.answers_json, ns.images,
                          split=ns.split, dataset=ns.dataset, skipped=skipped)
    if fmt == "vrsbench":
        return open_vrsbench(ns.captions_json, ns.vqa_json, ns.images, split=ns.split, skipped=skipped)
    raise ConvertError(f"unknown format {fmt!r}")  # argparse prevents this


def run(ns: argparse.Namespace) -> int:
    skipped: Counter[str] = Counter()
    manifest = convert_samples(open_source(ns, skipped), ns.out, shard_size=ns.shard_size, desc=ns.convert_format,
                               skipped=skipped, progress=not ns.no_progress)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0
