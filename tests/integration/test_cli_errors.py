"""The real `rsmoe train` process on a bad config: one line on stderr, exit 2, nothing started."""

from __future__ import annotations

import os

from tests.helpers import REPO, rsmoe_cmd, run


def _base(sample_shards, tmp_path) -> list[str]:
    return ["--config", "tiny", "--run-dir", str(tmp_path / "run"), "--deepspeed", os.path.join(REPO, "ds_configs", "zero2.json"),
            f"data.train_shards={sample_shards['train']}"]


def test_real_command_prints_one_line_and_no_traceback(sample_shards, tmp_path):
    proc = run(rsmoe_cmd([*_base(sample_shards, tmp_path), "model.llm.path=/nope"]), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["rsmoe train: error: config key 'model.llm.path': model directory /nope does not exist; point it "
                     "at a local model directory (models never download) or at an offline asset (rsmoe assets --list)"], lines
    assert not (tmp_path / "run" / "logs").exists()  # nothing started
