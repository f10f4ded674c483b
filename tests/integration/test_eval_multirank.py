"""`rsmoe eval` under torchrun with 2 ranks gives exactly the single-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rsmoe.eval.run import EvalOptions
from tests.helpers import REPO, free_port


def _opts(**kw) -> EvalOptions:
    base = dict(max_new_tokens=10, vqa_max_new_tokens=4, bootstrap=50, meteor=False, progress=False)
    base.update(kw)
    return EvalOptions(**base)


def test_two_ranks_give_the_same_results_as_one_process(tiny_runs, sample_shards, tmp_path):
    from rsmoe.eval.run import evaluate

    # Python tokenisation on both sides (no JVM starts): this test is about generation and gathering.
    args = dict(questions_per_image=3, batch_size=3, vqa_batch_size=7, java=False)
    one = tmp_path / "one"
    evaluate(_opts(model=str(tiny_runs["stage2"]), shards=sample_shards["val"], out=str(one), **args))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RSMOE_EVAL_NO_JAVA": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "rsmoe.cli", "eval", "--model", str(tiny_runs["stage2"]), "--shards", sample_shards["val"],
           "--out", str(two), "--max-new-tokens", "10", "--vqa-max-new-tokens", "4", "--bootstrap", "50",
           "--no-meteor", "--questions-per-image", "3", "--batch-size", "3", "--vqa-batch-size", "7"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "caption/UCM-Captions" in proc.stdout and "report:" in proc.stdout
    a, b = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    assert b["meta"]["world_size"] == 2 and a["meta"]["world_size"] == 1
    sections = [k for k in a if k not in ("meta", "items")]
    assert sections == [k for k in b if k not in ("meta", "items")]
    for k in sections:
        assert a[k]["metrics"] == b[k]["metrics"], k
        assert a[k]["intervals"] == b[k]["intervals"], k
        assert a[k]["grounding"]["available"] and a[k]["grounding"] == b[k]["grounding"], k  # the control arm too
    assert a["items"] == b["items"]  # every sample once, same generations (both arms), same order
    assert all(it["control"]["partner"] != it["key"] for it in b["items"])
    assert len({it["key"] for it in b["items"]}) == 34
