"""Bad configuration and paths: one `rsmoe train: error:` line, exit code 2, before any process
group, model or engine exists."""

from __future__ import annotations

import os

import pytest

from rsmoe import cli
from tests.helpers import REPO


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the run gets as far as distributed init, model build or engine init."""
    import rsmoe.training.loop as t

    def boom(*a, **k):
        raise AssertionError("heavy work started before the configuration was checked")

    for name in ("init_distributed", "build_stage_model", "build_engine"):
        monkeypatch.setattr(t, name, boom)


def _base(sample_shards, tmp_path) -> list[str]:
    return ["--config", "tiny", "--run-dir", str(tmp_path / "run"), "--deepspeed", os.path.join(REPO, "ds_configs", "zero2.json"),
            f"data.train_shards={sample_shards['train']}"]


CASES = {
    "unknown key": (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    "wrong type": (["train.steps=many"], "config key 'train.steps': expected int"),
    "missing model dir": (["model.llm.path=/nope"], "config key 'model.llm.path': model directory /nope does not exist"),
    "model dir without config": (["model.llm.path={tmp}"], "is not a Hugging Face model directory (no config.json)"),
    "missing tokenizer": (["model.llm.tokenizer=/nope/tok"], "config key 'model.llm.tokenizer': tokenizer directory /nope/tok does not exist"),
    "unknown asset": (["model.qformer.tokenizer=asset:nope"], "config key 'model.qformer.tokenizer': unknown asset 'nope'"),
    "ep does not divide experts": (["--stage", "2", "distributed.ep=2"], "3 experts cannot be split over ep=2"),
    "world size vs layout": (["--stage", "2", "model.experts=[theme,objects]", "distributed.ep=2", "WORLD_SIZE=3"],
                             "config key 'distributed.ep': world size 3 is not a multiple of ep=2"),
    "missing deepspeed json": (["--deepspeed", "/nope/zero9.json"], "DeepSpeed config '/nope/zero9.json' not found"),
    "deepspeed json owns optimizer": (["--deepspeed", "{bad_json}"], "DeepSpeed config has an 'optimizer' block"),
    "stage 2 without init_from": (["--stage", "2"], "Stage II needs init_from (--init-from)"),
    "stage 2 init_from not a stage 1 run": (["--stage", "2", "--init-from", "{tmp}"], "Stage II needs a finished Stage I run"),
    "shards match nothing": (["data.train_shards=/nope/train-*.tar"], "config key 'data.train_shards': shard pattern '/nope/train-*.tar' matched no file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_one_line_exit_2_before_heavy_work(case, sample_shards, tmp_path, monkeypatch, capsys, no_heavy_work):
    extra, expected = CASES[case]
    bad_json = tmp_path / "ds.json"
    bad_json.write_text('{"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}')
    extra = [x.format(tmp=tmp_path, bad_json=bad_json) for x in extra]
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for x in [x for x in extra if x.startswith("WORLD_SIZE=")]:
        monkeypatch.setenv("WORLD_SIZE", x.split("=")[1])  # as a launcher with 3 ranks would set it
        monkeypatch.setenv("RANK", "0")
        extra.remove(x)
    rc = cli.main(["train", *_base(sample_shards, tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("rsmoe train: error: "), err
    assert expected in err[0], err[0]




def test_stage2_with_another_model_than_its_stage1_names_the_key(tiny_runs, sample_shards, tmp_path, dist_env, capsys):
    """Stage II loads Stage I's frozen parts: a changed image size would surface as a tensor-size error
    deep in a forward ('The size of tensor a (257) must match ... (65)'); it is one line instead."""
    rc = cli.main(["train", "--config", "tiny", "--stage", "2", "--run-dir", str(tmp_path / "s2"),
                   "--init-from", str(tiny_runs["stage1"]), f"data.train_shards={sample_shards['train']}",
                   "model.vision.image_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("rsmoe train: error: config key 'model.vision.image_size': 32, but the Stage I run"), err
    assert "was trained with 64" in err[0]
