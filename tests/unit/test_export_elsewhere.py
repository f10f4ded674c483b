"""A run read back from anywhere: an EfficientNet-configured tiny run (random weights) trained with relative
paths in one working directory, then exported (final/ and --tag, both stages), evaluated and captioned from
another; and an old run whose config.yaml still holds paths relative to where training started."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rsmoe.config import load_config, read_config
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.io.export import export_run
from tests.helpers import REPO, free_port

pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_shards) -> dict[str, Path]:
    from rsmoe.training.loop import train

    root = tmp_path_factory.mktemp("elsewhere")
    here, away = root / "trained_here", root / "somewhere_else"
    here.mkdir(), away.mkdir()
    (here / "shards").symlink_to(sample_shards["dir"])
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    common = ["model.vision.type=efficientnet", "data.train_shards=shards/train-*.tar", "data.val_shards=shards/val-*.tar",
              "train.steps=2", "checkpoint.every=2", "train.num_eval_samples=0"]
    cwd = os.getcwd()
    os.chdir(here)
    try:
        for overrides in (["run_dir=runs/s1", f"deepspeed_config={REPO}/ds_configs/zero2.json"],
                          ["stage=2", "run_dir=runs/s2", "init_from=runs/s1", f"deepspeed_config={REPO}/ds_configs/zero3.json"]):
            os.environ["MASTER_PORT"] = str(free_port())
            try:
                train(load_config("tiny", common + overrides))
            finally:
                shutdown_distributed()
    finally:
        os.chdir(cwd)
    return {"root": root, "here": here, "away": away, "s1": here / "runs" / "s1", "s2": here / "runs" / "s2"}


@pytest.fixture
def away(runs, monkeypatch):
    monkeypatch.chdir(runs["away"])
    return runs["away"]


def _same_files(a: Path, b: Path, what: str) -> None:
    files = sorted(a.rglob("*.safetensors"))
    assert files
    for f in files:
        x, y = load_file(f), load_file(b / f.relative_to(a))
        assert x.keys() == y.keys(), f
        assert all(torch.equal(x[k], y[k]) for k in x), f"{what}: {f.relative_to(a)} differs"


def test_config_records_absolute_paths(runs):
    for run in ("s1", "s2"):
        for cfg in (runs[run] / "config.yaml", runs[run] / "final" / "config.yaml"):
            raw = yaml.safe_load(cfg.read_text())
            assert raw["run_dir"] == str(runs[run]) and raw["data"]["train_shards"] == str(runs["here"] / "shards" / "train-*.tar")
    assert yaml.safe_load((runs["s2"] / "config.yaml").read_text())["init_from"] == str(runs["s1"])


@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_efficientnet_tag_export_equals_final_export_from_another_cwd(runs, away, stage):
    """DeepSpeed's tag carries EfficientNet's BatchNorm buffers: checked against the model's own and skipped."""
    final = export_run(runs[stage], away / f"{stage}_final")
    tag = export_run(runs[stage], away / f"{stage}_tag", tag="latest")
    engines = json.loads((tag / "export.json").read_text())["source"]["engines"]
    assert sum(e["frozen_buffers_checked"] for e in engines) > 0  # the BN statistics really were in the tag
    assert json.loads((tag / "export.json").read_text())["visual"]["vision"]["type"] == "EfficientNetEncoder"
    _same_files(tag, final, stage)


def test_changed_frozen_buffer_stops_a_tag_export(runs, away, monkeypatch):
    """A buffer that differs from training's means the frozen encoder is not the one trained with: refuse."""
    from rsmoe.io.export import ExportError
    from rsmoe.models import efficientnet

    init = efficientnet.EfficientNetEncoder._init_random

    def shifted(self):
        init(self)
        self.net._bn0.running_mean.add_(0.5)

    monkeypatch.setattr(efficientnet.EfficientNetEncoder, "_init_random", shifted)
    with pytest.raises(ExportError, match=r"buffer .*_bn0.running_mean differs"):
        export_run(runs["s1"], away / "bad", tag="latest")


def test_stage2_run_evaluates_and_captions_from_another_cwd(runs, away, sample_shards):
    from rsmoe.config import GenerationArgs
    from rsmoe.eval.run import settings_for
    from rsmoe.inference.generate import caption
    from rsmoe.inference.load import load_trained, read_image

    trained = load_trained(runs["s2"], device="cpu", dtype="fp32")
    image = next(Path(REPO, "data", "sample").rglob("*.png"), None) or next(Path(REPO, "data", "sample").rglob("*.jp*g"))
    out = caption(trained.model, trained.processor, torch.from_numpy(read_image(image, trained.cfg))[None],
                  gen=GenerationArgs(max_new_tokens=4))
    assert set(out[0]["experts"]) == set(trained.experts)
    manifest = json.loads((Path(sample_shards["dir"]) / "manifest.json").read_text())
    trained_on = {d for d, splits in manifest["datasets"].items() if splits.get("train")}
    settings = settings_for(sorted(trained_on) + ["never-seen"], trained.model_dir, None)
    assert settings == {**{d: "fine-tuned" for d in trained_on}, "never-seen": "zero-shot"}


def test_old_run_with_cwd_relative_paths_reads_from_anywhere(runs, away):
    """Runs written before paths were anchored: relative to where training started, which the recorded
    run_dir gives back. Copied (moved) together with its Stage I run, it still exports from a tag."""
    old = runs["root"] / "old_layout"
    for run in ("s1", "s2"):
        shutil.copytree(runs[run], old / "runs" / run, symlinks=True)
    (old / "shards").symlink_to(runs["here"] / "shards", target_is_directory=True)
    for run in ("s1", "s2"):
        for cfg in (old / "runs" / run / "config.yaml", old / "runs" / run / "final" / "config.yaml"):
            raw = yaml.safe_load(cfg.read_text())
            raw["run_dir"] = f"runs/{run}"
            raw["init_from"] = "runs/s1" if run == "s2" else ""
            raw["data"]["train_shards"], raw["data"]["val_shards"] = "shards/train-*.tar", "shards/val-*.tar"
            cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    args = read_config(old / "runs" / "s2" / "config.yaml")
    assert args.init_from == str(old / "runs" / "s1") and args.data.train_shards == str(old / "shards" / "train-*.tar")
    assert read_config(old / "runs" / "s2" / "final" / "config.yaml").init_from == str(old / "runs" / "s1")
    _same_files(export_run(old / "runs" / "s2", away / "old_tag", tag="latest"), export_run(runs["s2"], away / "new"), "old")


@pytest.mark.parametrize("transformers_major", [5, 4])
def test_efficientnet_export_rebuilds_in_plain_transformers(runs, away, sample_shards, transformers_major):
    """docs/examples/load_export.py on the EfficientNet export (vision encoder from its own state dict)."""

    from rsmoe.data.loader import build_loader
    from rsmoe.inference.load import load_trained
    from tests.helpers.export_check import assert_loads, python_for, run_check, write_reference

    python = python_for(transformers_major)
    ex = export_run(runs["s2"], away / f"tf{transformers_major}", merge=True, experts=["theme", "objects"])
    t = load_trained(runs["s2"], device="cpu", dtype="fp32")
    v = t.cfg.model.vision
    pixels = next(iter(build_loader(sample_shards["val"], batch_size=2, image_size=v.image_size,
                                    image_mean=tuple(v.image_mean), image_std=tuple(v.image_std))))["pixel_values"]
    ref = write_reference(t.model, t.processor.llm_tokenizer, t.processor.qformer_tokenizer, t.cfg, pixels, ex, away / "ref")
    result = run_check(python, ex, ref)
    print(json.dumps(result))
    assert result["transformers"].split(".")[0] == str(transformers_major)
    assert_loads(result)
