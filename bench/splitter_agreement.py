"""Caption splitter vs human labels: the old rules (loaded from git history) and the current ones.

Reads the labelled fixture (tests/data/splitter/rsicap_style.jsonl: captions whose sentences are labelled
theme / objects / relations / ambiguous), runs each caption through both splitters' ``split_caption``
and prints, for each splitter on one run:

* sentence agreement with the labels on unambiguous sentences, overall and per part of the fixture:
  ``dev`` (written before the rules, used while writing them), ``holdout`` (every third of those
  captions), ``fresh`` and ``fresh2`` (written after the rules were frozen, each scored once before any
  change; see tests/data/splitter/README.md);
* per-part precision and recall;
* share of captions with all three parts non-empty and share with an empty ``objects`` part
  (the human labels' own shares are printed as a reference row);
* on the real UC Merced captions in data/sample (one-sentence scene descriptions), how many of
  them the splitter puts in ``theme`` (all 5 references per image, and the first one, which the
  converter uses as the training caption).

The old splitter is ``git show REV:rsmoe/data/splitter.py`` executed into a temporary module, so the
tree holds no copy of it.

    PYTHONPATH=. python bench/splitter_agreement.py [--old-rev f643783] [--errors dev|holdout|all]
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from collections import Counter
from pathlib import Path

from git_baseline import module_at  # bench/git_baseline.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("theme", "objects", "relations")
SPLITS = ("dev", "holdout", "fresh", "fresh2")


def load_fixture(path: Path) -> list[dict]:
    caps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not caps:
        sys.exit(f"{path}: no captions")
    return caps


def assign(mod: types.ModuleType, sentences: list[str]) -> list[str]:
    """Part each sentence of the caption went to, via ``split_caption`` (so position rules count)."""
    parts = mod.split_caption(" ".join(sentences))
    queues = {p: mod.split_sentences(parts[p]) for p in PARTS}
    out = []
    for s in mod.split_sentences(" ".join(sentences)):
        part = next((p for p in PARTS if queues[p] and queues[p][0] == s), None)
        if part is None:
            raise AssertionError(f"sentence lost or reordered by {mod.__name__}: {s!r}")
        queues[part].pop(0)
        out.append(part)
    if len(out) != len(sentences):
        raise AssertionError(f"{mod.__name__} cut the caption into {len(out)} sentences, fixture has {len(sentences)}")
    return out


def evaluate(mod: types.ModuleType, caps: list[dict], show: str | None) -> dict:
    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    tp: Counter[str] = Counter()
    pred_n: Counter[str] = Counter()
    gold_n: Counter[str] = Counter()
    all3 = empty_obj = 0
    errors = []
    for cap in caps:
        texts = [s["text"] for s in cap["sentences"]]
        pred = assign(mod, texts)
        all3 += all(p in pred for p in PARTS)
        empty_obj += "objects" not in pred
        for s, p in zip(cap["sentences"], pred):
            if s["label"] == "ambiguous":
                continue
            ok = p == s["label"]
            for key in ("all", cap["split"]):
                total[key] += 1
                agree[key] += ok
            gold_n[s["label"]] += 1
            pred_n[p] += 1
            tp[p] += ok
            if not ok and show in ("all", cap["split"]):
                errors.append(f"  {cap['id']} gold={s['label']:<9} pred={p:<9} {s['text']}")
    n = len(caps)
    return {
        "agree": {k: (agree[k] / total[k] if total[k] else float("nan"), total[k]) for k in ("all", *SPLITS)},
        "precision": {p: tp[p] / pred_n[p] if pred_n[p] else float("nan") for p in PARTS},
        "recall": {p: tp[p] / gold_n[p] for p in PARTS},
        "all3": all3 / n, "empty_objects": empty_obj / n, "errors": errors,
    }


def human_shares(caps: list[dict]) -> tuple[float, float]:
    labels = [{s["label"] for s in c["sentences"]} for c in caps]
    return (sum(all(p in ls for p in PARTS) for ls in labels) / len(caps),
            sum("objects" not in ls for ls in labels) / len(caps))


def ucm_theme(mod: types.ModuleType, path: Path) -> tuple[int, int, int, int]:
    images = json.loads(path.read_text())["images"]
    refs = [s["raw"] for im in images for s in im["sentences"]]
    firsts = [im["sentences"][0]["raw"] for im in images if im["sentences"]]

    def whole_theme(c: str) -> bool:
        parts = mod.split_caption(c)
        return parts["theme"] == mod.normalise_caption(c) and not parts["objects"] and not parts["relations"]

    return sum(map(whole_theme, refs)), len(refs), sum(map(whole_theme, firsts)), len(firsts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", type=Path, default=ROOT / "tests/data/splitter/rsicap_style.jsonl")
    ap.add_argument("--ucm", type=Path, default=ROOT / "data/sample/ucm_captions/captions.json")
    ap.add_argument("--old-rev", default="f643783", help="commit whose rsmoe/data/splitter.py is the baseline")
    ap.add_argument("--errors", choices=(*SPLITS, "all"), help="also list the current splitter's mismatches")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from rsmoe.data import splitter as new

    old = module_at(args.old_rev, "rsmoe/data/splitter.py", "splitter_agreement")
    caps = load_fixture(args.fixture)
    n_sent = sum(len(c["sentences"]) for c in caps)
    n_amb = sum(s["label"] == "ambiguous" for c in caps for s in c["sentences"])
    print(f"fixture: {len(caps)} captions, {n_sent} sentences ({n_amb} ambiguous, left out of agreement)")
    h3, he = human_shares(caps)
    cols = ("all", *SPLITS)
    print(f"{'splitter':<16}" + "".join(f"{c:>8}" for c in cols) + "  " + "  ".join(f"{p[:5]:>5} P/R" for p in PARTS)
          + f"{'all3':>7}{'emptyO':>8}{'UCM refs':>10}{'UCM 1st':>9}")
    print(f"{'human labels':<16}" + " " * (8 * len(cols) + 2 + 11 * len(PARTS) + 4) + f"{h3:>7.2f}{he:>8.2f}")
    for name, mod in ((f"old ({args.old_rev})", old), ("new (tree)", new)):
        r = evaluate(mod, caps, args.errors if mod is new else None)
        a = r["agree"]
        pr = "  ".join(f"{r['precision'][p]:.2f}/{r['recall'][p]:.2f}" for p in PARTS)
        ut, un, ft, fn = ucm_theme(mod, args.ucm)
        print(f"{name:<16}" + "".join(f"{a[c][0]:>8.3f}" for c in cols) + f"  {pr}"
              f"{r['all3']:>7.2f}{r['empty_objects']:>8.2f}{f'{ut}/{un}':>10}{f'{ft}/{fn}':>9}")
        if r["errors"]:
            print("\n".join(r["errors"]))
    print("agreement = share of unambiguous sentences whose part matches the label ("
          + ", ".join(f"{c} {a[c][1]}" for c in cols) + " sentences); P/R = precision/recall per part; all3 = "
          "share of captions with theme, objects and relations non-empty; emptyO = share with objects empty; "
          "UCM = captions whose whole text went to theme")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
