"""Bad data through `rsmoe train`: every kind of broken sample or shard is skipped, counted, logged and
shown as `data/...` in metrics.jsonl and TensorBoard; a shard set with nothing valid ends with one
clear error instead of spinning forever."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from rsmoe import cli
from rsmoe.data import loader as loader_mod
from tests.helpers import REPO, rows

REASONS = ("corrupt_image", "missing_image", "bad_json", "invalid_record", "empty_caption", "truncated_tar",
           "unreadable_shard")


def _samples(shard: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
            if len(out) > n:
                break
    return list(out.items())[:n]


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_bad_shards(src: str, out: Path, with_good: bool = True) -> Path:
    """A shard set holding one instance (or more) of every failure the loader knows."""
    out.mkdir(parents=True, exist_ok=True)
    good = _samples(src, 12)
    if with_good:
        _write_tar(out / "good-000.tar", good[:6])
    bad = []
    for i, (key, m) in enumerate(good[6:12]):
        rec = json.loads(m["json"])
        img_ext = next(e for e in m if e != "json")
        kind = ("corrupt", "noimage", "badjson", "nofield", "empty", "corrupt")[i]
        if kind == "corrupt":
            m = {**m, img_ext: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50}
        elif kind == "noimage":
            m = {"json": m["json"]}
        elif kind == "badjson":
            m = {**m, "json": b'{"caption": "cut off'}
        elif kind == "nofield":
            m = {**m, "json": json.dumps({k: v for k, v in rec.items() if k != "dataset"}).encode()}
        elif kind == "empty":
            m = {**m, "json": json.dumps({**rec, "caption": "  "}).encode()}
        bad.append((f"bad_{kind}_{i}", m))
    _write_tar(out / "bad-000.tar", bad)
    if with_good:  # a truncated tar still holds the samples before the cut
        whole = out / "whole.tmp"
        _write_tar(whole, good[:4])
        data = whole.read_bytes()
        (out / "truncated-000.tar").write_bytes(data[: len(data) // 2])  # a copy that died half way
        whole.unlink()
    (out / "unreadable-000.tar").write_bytes(b"this is not a tar archive\n" * 40)
    return out


def _train(shards: str, run_dir: Path, sample_shards, extra: list[str] = ()) -> int:
    return cli.main(["train", "--config", "tiny", "--run-dir", str(run_dir), "--deepspeed",
                     os.path.join(REPO, "ds_configs", "zero2.json"), f"data.train_shards={shards}",
                     f"data.val_shards={sample_shards['val']}", "train.num_eval_samples=0", "data.shuffle_buffer=4",
                     "train.steps=8", "checkpoint.every=8", *extra])


def test_bad_data_is_skipped_counted_logged_and_shown(sample_shards, tmp_path, dist_env, capfd, monkeypatch):
    monkeypatch.setattr(loader_mod, "_warned", set())  # warnings are once per process; this test reads them
    shards = make_bad_shards(sample_shards["train"].replace("*", "000000"), tmp_path / "shards")
    run_dir = tmp_path / "run"
    assert _train(str(shards / "*.tar"), run_dir, sample_shards) == 0
    last = rows(run_dir)[-1]
    assert last["step"] == 8
    counts = {r: last[f"data/{r}"] for r in REASONS}
    print("skip counts after 8 steps:", counts)
    assert all(n > 0 for n in counts.values()), counts
    assert last["data/skipped_total"] == sum(counts.values())
    err = capfd.readouterr().err
    for reason in REASONS:
        assert f"({reason})" in err, reason  # one warning per reason, naming shard and key
    assert "bad_corrupt_0" in err or "bad_corrupt_5" in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {f"data/{r}" for r in REASONS} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("data/corrupt_image")[-1].value == counts["corrupt_image"]
    assert (run_dir / "final" / "stage1_adapter" / "adapter_model.safetensors").exists()


def test_shards_with_no_valid_sample_end_with_one_error_line(sample_shards, tmp_path, dist_env, capsys):
    shards = make_bad_shards(sample_shards["train"].replace("*", "000000"), tmp_path / "shards", with_good=False)
    rc = _train(str(shards / "*.tar"), tmp_path / "run", sample_shards)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rsmoe train: error")]
    assert rc == 1
    assert len(err) == 1 and "had undecodable images" in err[0] and "fix or re-convert these shards" in err[0], err


def test_shards_with_nothing_parseable_end_with_one_error_line(sample_shards, tmp_path, dist_env, capsys):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "unreadable-000.tar").write_bytes(b"not a tar\n" * 40)
    _write_tar(d / "nojson-000.tar", [(f"k{i}", {"png": b"x"}) for i in range(3)])
    rc = _train(str(d / "*.tar"), tmp_path / "run", sample_shards)
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.startswith("rsmoe train: error")]
    assert rc == 1
    assert len(err) == 1 and "no valid sample in" in err[0], (err, captured)
