"""Does a trained model's LLM read the image? Two numbers per dataset, from a Stage I model directory.

    python bench/prefix_probe.py runs/demo/stage1
    python bench/prefix_probe.py runs/demo/stage1 --shards 'data/shards/sample/val-*.tar' --train 'data/shards/sample/train-*.tar'

* **loss gap**: the held-out caption loss (teacher-forced, one fixed instruction, the sample's
  caption) with the sample's own visual prefix and with the prefix of its partner image (the same
  seeded derangement within the dataset as `rsmoe eval`'s grounding control). gap = partner - real,
  in nats per token: 0 means the LLM's prediction does not depend on which image it was given.
* **what the prefix holds**: its mean pairwise cosine over the held-out images (1 = one vector for
  every image) and, for class datasets (UCM), a nearest-centroid classifier on the query-averaged
  prefix, centroids from the training images: how much of the class the prefix carries, whether or
  not the LLM reads it.

Teacher-forced loss is cheaper and less noisy than generating captions; it is what the grounding
control measures in generation. No assertion; prints a table.
"""

from __future__ import annotations

import argparse
import random

import torch

from rsmoe.data.loader import build_loader, expand_shards
from rsmoe.eval.grounding import derangement
from rsmoe.eval.run import scan_index
from rsmoe.inference.load import load_trained

INSTRUCTION = "Describe this image in detail."


def load_all(pattern: str, vision) -> dict:
    """Every sample of the shards in one batch, with the records' class labels (the loader drops them;
    `rsmoe eval` reads them with scan_index)."""
    batch = next(iter(build_loader(pattern, batch_size=100000, image_size=vision.image_size,
                                   image_mean=vision.image_mean, image_std=vision.image_std)))
    labels = {e.key: e.label for e in scan_index(expand_shards(pattern))}
    batch["label"] = [labels.get(k) for k in batch["key"]]
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a trained run directory or its final/ (Stage I or II)")
    ap.add_argument("--shards", default="data/shards/sample/val-*.tar", help="held-out shards")
    ap.add_argument("--train", default="data/shards/sample/train-*.tar", help="shards for the class centroids")
    ap.add_argument("--seed", type=int, default=0, help="the derangement's seed (as rsmoe eval --seed)")
    args = ap.parse_args()

    trained = load_trained(args.model, "cpu")
    model, proc, vision = trained.model, trained.processor, trained.cfg.model.vision
    model.eval()
    held, train = load_all(args.shards, vision), load_all(args.train, vision)

    def prefixes(batch):
        ids, mask = proc.encode_instructions([INSTRUCTION] * len(batch["key"]))
        with torch.no_grad():
            return model.visual(batch["pixel_values"], ids, mask)

    def caption_loss(caption: str, prefix: torch.Tensor) -> float:
        rows = proc.stage1_inputs({"caption": [caption], "parts": [None], "instruction": [INSTRUCTION],
                                   "pixel_values": prefix.new_zeros(1)},  # the prefix is given: no image is read
                                  random.Random(0))
        with torch.no_grad():
            out = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], labels=rows["labels"],
                        adapter_index=rows["adapter_index"], row_sample=rows["row_sample"], prefix=prefix[None])
        return float(out["expert_loss"][0])

    real, other = prefixes(held), prefixes(train)
    datasets = held["dataset"]
    row = {k: i for i, k in enumerate(held["key"])}
    pairs = derangement(list(zip(held["key"], datasets)), args.seed)
    print(f"{'dataset':16s} {'n':>3s} {'loss real':>9s} {'partner':>8s} {'gap':>7s} {'cos':>6s} {'NC class acc':>12s}")
    for name in sorted(set(datasets)):
        idx = [i for i, d in enumerate(datasets) if d == name]
        losses = [(caption_loss(held["caption"][i], real[i]),
                   caption_loss(held["caption"][i], real[row[pairs[held["key"][i]]]])) for i in idx if held["key"][i] in pairs]
        feats = torch.nn.functional.normalize(real[idx].flatten(1), dim=1)
        cos = (feats @ feats.T).sum() - len(idx)
        cos = float(cos / max(1, len(idx) * (len(idx) - 1)))
        nc = "-"
        labelled = [i for i in idx if held["label"][i]]
        train_idx = [i for i, d in enumerate(train["dataset"]) if d == name and train["label"][i]]
        if labelled and train_idx:
            pooled = torch.nn.functional.normalize(other.mean(1), dim=-1)
            classes = sorted({train["label"][i] for i in train_idx})
            cents = torch.stack([pooled[[i for i in train_idx if train["label"][i] == c]].mean(0) for c in classes])
            query = torch.nn.functional.normalize(real.mean(1), dim=-1)
            hits = sum(classes[int((query[i] @ cents.T).argmax())] == held["label"][i] for i in labelled)
            nc = f"{hits / len(labelled):.3f} (1/{len(classes)} chance)"
        r = sum(a for a, _ in losses) / len(losses)
        c = sum(b for _, b in losses) / len(losses)
        print(f"{name:16s} {len(idx):3d} {r:9.3f} {c:8.3f} {c - r:+7.3f} {cos:6.3f} {nc:>12s}")


if __name__ == "__main__":
    main()
