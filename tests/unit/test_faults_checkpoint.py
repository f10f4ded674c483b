"""Checkpoint integrity: a tag without COMPLETE (even if `latest` names it) is never loaded, and no
checkpoint or model file a user was handed can run code when loaded."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from rsmoe import cli
from rsmoe.config import ConfigError, load_config
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.io.checkpoints import COMPLETE
from rsmoe.io.safe_load import UnsafeCheckpointError, restricted_unpickling
from rsmoe.training.checkpointer import CheckpointManager
from rsmoe.training.loop import train
from tests.helpers import adapter


class Evil:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train(overrides: list[str]) -> dict:
    try:
        return train(load_config("tiny", overrides))
    finally:
        shutdown_distributed()


def test_incomplete_tag_named_by_latest_is_never_loaded(tiny_overrides, tmp_path, dist_env, capfd):
    common = tiny_overrides + ["train.steps=6", "checkpoint.every=2", "train.num_eval_samples=0"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    _train(common + [f"run_dir={full}"])
    _train(common + [f"run_dir={broken}", "train.stop_after_steps=4"])
    # What a kill between the state files and the marker leaves, plus a `latest` that (wrongly) names it
    # and a state file cut short.
    tag = broken / "checkpoints" / "step00000004"
    (tag / COMPLETE).unlink()
    states = next(tag.glob("*optim_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    (broken / "checkpoints" / "latest").write_text("step00000004")
    assert CheckpointManager(broken).latest_tag() == "step00000002"
    capfd.readouterr()
    _train(common + [f"run_dir={broken}"])
    err = capfd.readouterr().err
    assert "resumed from step00000002 at step 2" in err
    assert "removing incomplete checkpoint" in err
    a, b = adapter(full), adapter(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_purge_removes_the_marker_first(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    for step in (1, 2):
        d = mgr.dir / mgr.tag_for(step)
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(b"x")
        (d / COMPLETE).write_text(str(step))
    real_rmtree = __import__("shutil").rmtree
    seen = {}

    def rmtree(path, ignore_errors=False):  # a kill inside the purge: the old tag must not still look complete
        seen[Path(path).name] = (Path(path) / COMPLETE).exists()
        real_rmtree(path, ignore_errors=ignore_errors)

    import rsmoe.training.checkpointer as ck

    orig, ck.shutil.rmtree = ck.shutil.rmtree, rmtree
    try:
        mgr._purge()
    finally:
        ck.shutil.rmtree = orig
    assert seen == {"step00000001": False}
    assert mgr.complete_tags() == ["step00000002"]


@pytest.mark.parametrize("victim", ["optim_states.pt", "rng_rank0.pt"])
def test_malicious_pickle_in_a_checkpoint_is_refused(victim, tiny_overrides, tmp_path, dist_env, capsys):
    run_dir = tmp_path / "run"
    _train(tiny_overrides + [f"run_dir={run_dir}", "train.steps=4", "checkpoint.every=2", "train.stop_after_steps=2",
                             "train.num_eval_samples=0"])
    marker = tmp_path / "pwned"
    target = next((run_dir / "checkpoints" / "step00000002").glob(f"*{victim}"))
    torch.save({"state": Evil(marker)}, target)
    with pytest.raises(Exception):  # sanity: this file really would run code under a plain torch.load
        torch.load(target, weights_only=True)
    capsys.readouterr()
    rc = cli.main(["train", "--config", "tiny", "--run-dir", str(run_dir), *tiny_overrides[:2], "train.steps=4",
                   f"deepspeed_config={tiny_overrides[3].split('=', 1)[1]}", "checkpoint.every=2", "train.num_eval_samples=0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rsmoe train: error")]
    assert rc == 2
    assert len(err) == 1 and victim in err[0] and ("refused to load" in err[0] or "Weights only load failed" in err[0]), err
    assert not marker.exists(), "the pickled command ran"


def test_restricted_unpickling_overrides_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save(Evil(marker), f)
    with restricted_unpickling(), pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil.pt.*posix.system"):
        torch.load(f, weights_only=False)  # what DeepSpeed's TorchCheckpointEngine asks for
    assert not marker.exists()
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, ok)
    with restricted_unpickling():
        assert torch.equal(torch.load(ok, weights_only=False)["w"], torch.ones(2))
    assert torch.load is not None and torch.load.__name__ == "load"


def test_legacy_bin_weights_never_unpickle_objects(tmp_path):
    from rsmoe.models.hf_weights import _read_bert_state

    marker = tmp_path / "pwned"
    d = tmp_path / "bert"
    d.mkdir()
    torch.save({"x": Evil(marker)}, d / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        _read_bert_state(d)
    assert not marker.exists()


def test_checkpoint_every_0_saves_only_the_final_step(tiny_overrides, tmp_path, dist_env):
    run = tmp_path / "end_only"
    _train(tiny_overrides + ["train.steps=3", "checkpoint.every=0", "train.num_eval_samples=0", f"run_dir={run}"])
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000003"]
    with pytest.raises(ConfigError, match="checkpoint.every"):
        load_config("tiny", ["checkpoint.every=-1"])
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        load_config("tiny", ["checkpoint.keep=0"])
