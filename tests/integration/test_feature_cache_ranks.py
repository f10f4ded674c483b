"""The feature cache under several ranks: with expert parallelism (the EP group agrees on prefix misses,
which then go through the sliced visual prefix) and with data parallelism (ranks hit different entries,
so some skip the frozen forward while others run it), ZeRO-3 with the resident visual side. Each run
must finish (no rank left waiting) and equal the same layout without the cache, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, few_sample_shard, free_port, launch


@pytest.fixture(scope="module")
def setup(sample_shards, tmp_path_factory) -> dict:
    from rsmoe.config import load_config
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.training.loop import train

    root = tmp_path_factory.mktemp("fc_ranks")
    shard = few_sample_shard(sample_shards["dir"], root / "shard" / "train-000000.tar", 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASTER_PORT", str(free_port()))
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            mp.delenv(k, raising=False)
        try:
            train(load_config("tiny", [f"data.train_shards={shard}", f"run_dir={root / 'stage1'}",
                                       f"deepspeed_config={REPO}/ds_configs/zero2.json", "train.steps=2",
                                       "train.num_eval_samples=0"]))
        finally:
            shutdown_distributed()
    return {"shard": shard, "stage1": root / "stage1"}


def _stage2(setup: dict, run: Path, ep: int, nproc: int, cache: str) -> list[dict]:
    launch(["--stage", "2", "--init-from", str(setup["stage1"]), "--config", "tiny", "--deepspeed", "ds_configs/zero3.json",
            "--run-dir", str(run), f"distributed.ep={ep}", f"data.train_shards={setup['shard']}", "train.steps=6",
            "train.log_every=1", "train.num_eval_samples=0", "data.vqa_prob=0.5", f"data.feature_cache={cache}",
            "model.experts=[theme,objects]"],
           nproc=nproc, timeout=600)
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return {f"{d.name}/{k}": v for d in sorted((run / "final" / "adapters").iterdir())
            for k, v in load_file(d / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("ep,nproc", [(2, 2), (1, 2)], ids=["ep2xdp1", "ep1xdp2"])
def test_cached_equals_uncached_over_ranks(setup, tmp_path, ep, nproc):
    plain = _stage2(setup, tmp_path / "plain", ep, nproc, "off")
    cached = _stage2(setup, tmp_path / "cached", ep, nproc, str(tmp_path / "fc"))
    assert [r["loss/total"] for r in plain] == [r["loss/total"] for r in cached]
    a, b = _adapters(tmp_path / "plain"), _adapters(tmp_path / "cached")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = cached[-1]
    assert last["feature_cache/prefix_hits"] > 0 and last["feature_cache/encoder_hits"] > 0, last
    assert last["feature_cache/corrupt"] == 0
