"""The frozen-feature cache (rsmoe.io.feature_cache): training with it is bit-for-bit training without
it (CPU), every input that changes the computation changes the key, a damaged entry is recomputed and
counted, concurrent writers of one entry never produce a bad read."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rsmoe.config import ConfigError, load_config
from rsmoe.data.loader import preprocess_image
from rsmoe.data.processor import Processor
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.io import feature_cache as fc
from rsmoe.models.build import build_model
from rsmoe.training.loop import train
from tests.helpers import few_sample_shard

REPO = Path(__file__).resolve().parents[2]
NS = "ab" * 32
IMAGES = sorted((REPO / "data" / "sample" / "ucm_captions" / "images").glob("*.png"))[:3]


# ---------------------------------------------------------------- training: cached == uncached


@pytest.fixture(scope="module")
def three_sample_shard(sample_shards, tmp_path_factory) -> str:
    """A shard of the first 3 training samples: 8 steps of 2 see every image ~5 times."""
    return few_sample_shard(sample_shards["dir"], tmp_path_factory.mktemp("three") / "train-000000.tar", 3)


def _train(shard: str, run: Path, stage: int, cache: str, init: Path | None = None) -> list[dict]:
    ov = [f"data.train_shards={shard}", f"run_dir={run}", f"deepspeed_config={REPO}/ds_configs/zero2.json",
          "train.steps=8", "train.log_every=1", "train.num_eval_samples=0", "optim.lr=3e-3", "data.vqa_prob=0.5",
          f"data.feature_cache={cache}", "checkpoint.every=100"]
    if stage == 2:
        ov += ["stage=2", f"init_from={init}"]
    try:
        train(load_config("tiny", ov))
    finally:
        shutdown_distributed()
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "final").rglob("*.safetensors")):
        out.update({f"{f.relative_to(run)}:{k}": v for k, v in load_file(f).items()})
    return out


def test_cached_training_is_bit_equal_to_uncached(three_sample_shard, tmp_path, dist_env):
    runs = {}
    for name, cache in (("plain", "off"), ("memory", "memory"), ("disk", str(tmp_path / "fc")),
                        ("disk_again", str(tmp_path / "fc"))):
        s1 = tmp_path / name / "stage1"
        runs[name] = (_train(three_sample_shard, s1, 1, cache), s1)
        s2 = tmp_path / name / "stage2"
        runs[name] += (_train(three_sample_shard, s2, 2, cache, init=s1), s2)
    plain1, plain1_dir, plain2, plain2_dir = runs["plain"]
    assert not any("feature_cache/hits" in r for r in plain1 + plain2)
    for name in ("memory", "disk", "disk_again"):
        rows1, dir1, rows2, dir2 = runs[name]
        for a, b in ((plain1, rows1), (plain2, rows2)):
            assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b], name  # bit-equal losses
            assert [r["optim/grad_norm"] for r in a] == [r["optim/grad_norm"] for r in b], name
        for ref_dir, got_dir in ((plain1_dir, dir1), (plain2_dir, dir2)):
            ref, got = _final_tensors(ref_dir), _final_tensors(got_dir)
            assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    # Stage I caches encoder tokens per image: 16 lookups of 3 distinct images.
    s1 = runs["memory"][0][-1]
    assert (s1["feature_cache/encoder_misses"], s1["feature_cache/encoder_hits"], s1["feature_cache/prefix_hits"]) == (3, 13, 0)
    assert s1["feature_cache/stored"] == 3 and s1["feature_cache/corrupt"] == 0
    # Stage II caches prefixes per (image, instruction), some repeat within 8 steps; a prefix miss takes its
    # image's encoder tokens from the cache: 3 encoder entries computed in all. Every computed entry is stored.
    s2 = runs["memory"][2][-1]
    assert s2["feature_cache/prefix_hits"] > 0 and s2["feature_cache/encoder_misses"] == 3
    assert s2["feature_cache/prefix_hits"] + s2["feature_cache/prefix_misses"] > 16  # captions + VQA prefixes
    assert s2["feature_cache/stored"] == s2["feature_cache/prefix_misses"] + 3
    # On disk, Stage II finds Stage I's encoder entries (the same frozen encoder), and a second run over the
    # same directory finds everything.
    assert runs["disk"][2][-1]["feature_cache/encoder_misses"] == 0
    for rows in (runs["disk_again"][0], runs["disk_again"][2]):
        assert rows[-1]["feature_cache/encoder_misses"] == rows[-1]["feature_cache/prefix_misses"] == 0
    assert runs["disk_again"][0][-1]["feature_cache/encoder_hits"] == 16
    assert runs["disk"][0][-1]["feature_cache/gib"] > 0


# ---------------------------------------------------------------- keys


def _pixels(size: int = 64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return torch.from_numpy(np.stack([preprocess_image(p.read_bytes(), size, m, s) for p in IMAGES]))


def _stage2_model(overrides: list[str] | None = None):
    args = load_config("tiny", ["stage=2"] + (overrides or []))
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts, train_qformer=args.model.train_qformer_stage2)
    return model, Processor(llm_tok, q_tok, args.model.experts, 40, 48, 24)


def _misses(model, directory: Path, pixels: torch.Tensor, ids, mask) -> tuple[int, torch.Tensor]:
    """(misses, output) of one batch through a fresh cache over `directory` (a new process would see the same)."""
    model.prefix_fn = None
    cache = fc.attach_feature_cache(model, str(directory), 1.0)
    out = cache(model.visual, pixels, ids, mask)
    return (cache.prefix if cache.prefix_ns else cache.encoder).misses, out


@pytest.mark.parametrize("level", ["prefix", "encoder"])
def test_every_input_that_changes_the_result_changes_the_key(level, tmp_path):
    trainable = level == "encoder"  # Stage II with a trainable Q-Former caches the encoder only
    model, proc = _stage2_model([f"model.train_qformer_stage2={str(trainable).lower()}"])
    # Both instruction sets in one call: the same padded length (which is part of a prefix key, below).
    all_ids, all_mask = proc.encode_instructions(["Describe this image in detail.", "What is there?", "Describe this image in detail.",
                                                  "Describe this picture in detail.", "What is there?", "Describe this image in detail."])
    ids, mask, ids2, mask2 = all_ids[:3], all_mask[:3], all_ids[3:], all_mask[3:]
    pixels = _pixels()
    d = tmp_path / "fc"
    first, ref = _misses(model, d, pixels, ids, mask)
    assert first == 3 and (model.prefix_fn.prefix_ns is None) == (level == "encoder")
    again, out = _misses(model, d, pixels, ids, mask)
    assert again == 0 and torch.equal(out, ref)  # found, bit-equal
    assert torch.equal(model.visual(pixels, ids, mask), ref)  # == the uncached computation

    assert _misses(model, d, _pixels(size=48), ids, mask)[0] == 3  # image size
    assert _misses(model, d, _pixels(mean=(0.4, 0.5, 0.5)), ids, mask)[0] == 3  # normalisation
    assert _misses(model, d, _pixels(std=(0.5, 0.5, 0.6)), ids, mask)[0] == 3
    flipped = pixels.clone()
    flipped[1] = flipped[1].flip(-1)  # one image changed
    assert _misses(model, d, flipped, ids, mask)[0] == 1
    assert _misses(model, d, pixels, ids2, mask2)[0] == (1 if level == "prefix" else 0)  # instruction
    # The same instruction padded to another length: a new prefix entry (bit-exactness), same encoder entry.
    wide_ids = torch.cat([ids, torch.zeros(3, 2, dtype=ids.dtype)], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 2, dtype=mask.dtype)], 1)
    assert _misses(model, d, pixels, wide_ids, wide_mask)[0] == (3 if level == "prefix" else 0)

    w = model.visual.vision.vit.embeddings.patch_embedding.weight
    saved = w.detach().clone()
    with torch.no_grad():  # encoder weights
        w[0, 0, 0, 0] += 1e-3
    assert _misses(model, d, pixels, ids, mask)[0] == 3
    with torch.no_grad():
        w.copy_(saved)
    assert _misses(model, d, pixels, ids, mask)[0] == 0
    with torch.no_grad():  # Stage I checkpoint: another Q-Former/projection gives other prefixes
        model.visual.proj.bias[0] += 1e-3
    assert _misses(model, d, pixels, ids, mask)[0] == (3 if level == "prefix" else 0)
    if level == "prefix":  # same weights, another computation (attention heads): the structure is in the key
        other = _stage2_model(["model.qformer.num_heads=2"])[0]
        other.visual.load_state_dict(model.visual.state_dict())
        assert _misses(other, d, pixels, ids, mask)[0] == 3


def test_precision_and_device_are_in_the_key():
    base = fc.entry_key("ns", torch.float32, torch.device("cpu"), b"img")
    assert base != fc.entry_key("ns", torch.bfloat16, torch.device("cpu"), b"img")
    assert base != fc.entry_key("ns", torch.float32, torch.device("meta"), b"img")
    assert base != fc.entry_key("ns2", torch.float32, torch.device("cpu"), b"img")


# ---------------------------------------------------------------- damaged entries, concurrency, limits


def test_corrupt_or_truncated_entries_are_recomputed_and_counted(tmp_path):
    model, proc = _stage2_model()
    ids, mask = proc.encode_instructions(["Describe this image in detail."] * 3)
    pixels = _pixels()
    d = tmp_path / "fc"
    _, ref = _misses(model, d, pixels, ids, mask)
    files = sorted((d / model.prefix_fn.prefix_ns[:16]).rglob("*.fc"))
    assert len(files) == 3
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated (a full disk, a copy cut short)
    data = bytearray(files[1].read_bytes())
    data[-5] ^= 0xFF  # one flipped payload byte
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(b"")  # empty
    model.prefix_fn = None
    cache = fc.attach_feature_cache(model, str(d), 1.0)
    out = cache(model.visual, pixels, ids, mask)
    assert torch.equal(out, ref)
    # 3 prefixes recomputed; the 3 encoder entries were stored whole by the first call.
    assert (cache.prefix.misses, cache.encoder.misses, cache.store.stats.corrupt, cache.store.stats.stored) == (3, 0, 3, 3)
    assert all(fc._decode(f.read_bytes(), f.stem) is not None for f in files)  # rewritten whole
    # An entry copied over another key's file is refused too (the header names its key).
    files[0].write_bytes(files[1].read_bytes())
    assert cache.store.get(cache.prefix_ns, files[0].stem) is None and cache.store.stats.corrupt == 4


def _hammer(directory: str, key: str, n: int, seed: int) -> None:
    store = fc.DiskStore(directory, 2**30)
    value = torch.arange(50_000, dtype=torch.float32) + 0.0  # every writer writes the same entry
    for _ in range(n):
        with fc._suppress_missing():
            store.path(NS, key).unlink()  # force a fresh write each time, racing with the other writer
        store.put(NS, key, value)


def test_two_processes_writing_one_entry_never_give_a_bad_read(tmp_path):
    key = "ab" + "0" * 62
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), key, 150, s)) for s in range(2)]
    for p in procs:
        p.start()
    reader = fc.DiskStore(tmp_path, 2**30)
    seen = 0
    while any(p.is_alive() for p in procs):
        got = reader.get(NS, key)
        if got is not None:
            seen += 1
            assert torch.equal(got, torch.arange(50_000, dtype=torch.float32))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert reader.stats.corrupt == 0 and seen > 0
    assert torch.equal(reader.get(NS, key), torch.arange(50_000, dtype=torch.float32))
    assert not list(tmp_path.rglob("*.tmp"))  # every temporary file was renamed into place


def test_a_killed_writers_temporary_file_is_never_read_and_is_swept(tmp_path):
    store = fc.DiskStore(tmp_path, 2**30)
    key = "cd" + "1" * 62
    p = store.path(NS, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.999.deadbeef.tmp")  # what a kill -9 between write and rename leaves
    tmp.write_bytes(fc._encode(key, torch.ones(3))[:20])
    assert store.get(NS, key) is None and store.stats.corrupt == 0
    fc.DiskStore(tmp_path, 2**30)
    assert tmp.exists()  # young: maybe a live writer's
    old = time.time() - fc.STALE_TMP_S - 10
    os.utime(tmp, (old, old))
    fc.DiskStore(tmp_path, 2**30)
    assert not tmp.exists()


def test_the_size_limit_holds_and_is_counted(tmp_path):
    value = torch.zeros(1000)  # 4000 bytes of payload
    mem = fc.MemoryStore(max_bytes=10_000)
    assert [mem.put(NS, str(i), value) for i in range(4)] == [True, True, False, False]
    assert (len(mem), mem.stats.full, mem.nbytes) == (2, 2, 8000)
    disk = fc.DiskStore(tmp_path, max_bytes=10_000)
    assert [disk.put(NS, f"{i:02d}" + "0" * 62, value) for i in range(4)] == [True, True, False, False]
    assert disk.stats.full == 2 and sum(f.stat().st_size for f in tmp_path.rglob("*.fc")) <= 10_000
    # Another process, another namespace, sees what is already there: the limit covers the whole directory.
    assert not fc.DiskStore(tmp_path, max_bytes=10_000).put("other" * 4, "ff" + "0" * 62, value)


def test_zero3_partitioned_visual_side_is_refused_with_several_ranks(monkeypatch):
    model, proc = _stage2_model()
    cache = fc.attach_feature_cache(model, "memory", 1.0)
    p = next(model.visual.parameters())
    p.ds_id, p.ds_persist = 0, False  # what ZeRO-3 marks on a partitioned parameter
    monkeypatch.setattr(fc.collectives, "active", lambda group=None: True)
    ids, mask = proc.encode_instructions(["Describe this image in detail."] * 3)
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):
        cache(model.visual, _pixels(), ids, mask)


def test_config_checks():
    with pytest.raises(ConfigError, match="feature_cache_gb"):
        load_config("tiny", ["data.feature_cache=memory", "data.feature_cache_gb=0"])
    with pytest.raises(ConfigError, match="data.feature_cache"):
        load_config("tiny", ["data.feature_cache= "])
    with pytest.raises(ConfigError, match="data.feature_cache"):
        load_config("tiny", ["data.feature_cache=true"])
    assert load_config("tiny", ["data.feature_cache=off"]).data.feature_cache == "off"  # YAML's off is false
