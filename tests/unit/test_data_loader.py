"""Streaming loader: determinism, equal batches per rank, eval coverage, bad data, resume."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsmoe.data.loader import build_loader, expand_shards
from rsmoe.data.schema import make_record

FIX = Path(__file__).parents[1] / "data"
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
IMAGES = sorted((FIX / "rsicap/images").glob("*.png")) + sorted((FIX / "rsvqa_hr/images").glob("*.png"))


def record(i: int, caption: str | None = None) -> dict:
    cap = caption if caption is not None else f"This is an aerial image of area {i}. There are {i} white houses."
    return make_record(caption=cap or "x", parts={"theme": cap, "objects": "", "relations": ""},
                       dataset="synthetic", split="train", image_id=str(i),
                       qa=[{"question": "Is there a house?", "answer": "yes", "type": "presence"}])


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good(i: int) -> list[tuple[str, bytes]]:
    return [(f"s{i:04d}.png", IMAGES[i % len(IMAGES)].read_bytes()), (f"s{i:04d}.json", json.dumps(record(i)).encode())]


def make_shards(tmp: Path, sizes: list[int]) -> list[str]:
    paths, i = [], 0
    for n, size in enumerate(sizes):
        members = []
        for _ in range(size):
            members += good(i)
            i += 1
        paths.append(str(write_tar(tmp / f"shard-{n:03d}.tar", members)))
    return paths


def loader(shards, **kw):
    args = dict(batch_size=4, image_size=16, image_mean=MEAN, image_std=STD, shuffle_buffer=8)
    args.update(kw)
    return build_loader(shards, **args)


def keys(ld) -> list[list[str]]:
    return [b["key"] for b in ld]


def test_batch_format_and_normalisation(tmp_path):
    shards = make_shards(tmp_path, [5])
    b = next(iter(loader(shards[0], batch_size=5)))
    assert b["pixel_values"].shape == (5, 3, 16, 16) and b["pixel_values"].dtype == torch.float32
    assert set(b) == {"pixel_values", "key", "caption", "parts", "qa", "references", "dataset", "instruction"}
    i = int(b["key"][0][1:])
    im = Image.open(IMAGES[i % len(IMAGES)]).convert("RGB").resize((16, 16), Image.BICUBIC)
    expected = (np.asarray(im, dtype=np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(b["pixel_values"][0].numpy(), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    assert b["references"][0] == [b["caption"][0]] and b["instruction"][0] is None
    assert b["qa"][0][0]["answer"] == "yes" and b["dataset"][0] == "synthetic"


def test_training_deterministic_under_seed(tmp_path):
    shards = make_shards(tmp_path, [6, 6, 6])
    a = keys(loader(shards, batches_per_epoch=6, seed=3))
    assert len(a) == 6 and all(len(k) == 4 for k in a)
    assert keys(loader(shards, batches_per_epoch=6, seed=3)) == a
    assert keys(loader(shards, batches_per_epoch=6, seed=4)) != a
    ld = loader(shards, batches_per_epoch=6, seed=3)
    ld.set_epoch(1)
    assert keys(ld) != a
    ld.set_epoch(0)
    assert keys(ld) == a


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_equal_batches_on_unequal_shards(tmp_path, num_workers):
    shards = make_shards(tmp_path, [1, 9, 3])  # fewer shards (3) than ranks x workers (4) when num_workers=2
    per_rank = []
    for rank in range(2):
        ld = loader(shards, batches_per_epoch=5, rank=rank, world_size=2, num_workers=num_workers, seed=7)
        got = keys(ld)
        assert len(got) == 5 == len(ld) and all(len(k) == 4 for k in got)
        assert ld.state_dict() == {"epoch": 0, "batches_consumed": 5}
        per_rank.append(got)
    assert per_rank[0] != per_rank[1]
    # same configuration twice -> same stream, also with worker processes
    assert keys(loader(shards, batches_per_epoch=5, rank=1, world_size=2, num_workers=num_workers, seed=7)) == per_rank[1]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 0), (2, 2)])
def test_eval_mode_exact_coverage(tmp_path, world_size, num_workers):
    shards = make_shards(tmp_path, [5, 1, 7])
    seen: Counter[str] = Counter()
    for rank in range(world_size):
        for b in loader(shards, rank=rank, world_size=world_size, num_workers=num_workers):
            assert 1 <= len(b["key"]) <= 4
            seen.update(b["key"])
    assert seen == Counter(f"s{i:04d}" for i in range(13))


def test_eval_keeps_last_partial_batch(tmp_path):
    shards = make_shards(tmp_path, [6])
    assert [len(k) for k in keys(loader(shards))] == [4, 2]


def bad_shards(tmp: Path) -> list[str]:
    ok = [m for i in range(6) for m in good(i)]
    members = ok[:4] + [
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), ("corrupt.json", json.dumps(record(90)).encode()),
        ("badjson.png", IMAGES[0].read_bytes()), ("badjson.json", b"{not json"),
        ("nofield.png", IMAGES[0].read_bytes()), ("nofield.json", json.dumps({"caption": "x"}).encode()),
        ("empty.png", IMAGES[0].read_bytes()),
        ("empty.json", json.dumps(dict(record(91), caption="  ")).encode()),
        ("noimage.json", json.dumps(record(92)).encode()),
    ] + ok[4:]
    a = write_tar(tmp / "bad-000.tar", members)
    full = write_tar(tmp / "tmp.tar", [m for i in range(6, 10) for m in good(i)]).read_bytes()
    trunc = tmp / "bad-001.tar"
    trunc.write_bytes(full[: len(full) // 2 + 100])  # cut inside a member
    junk = tmp / "bad-002.tar"
    junk.write_bytes(b"this is not a tar file at all" * 30)
    (tmp / "tmp.tar").unlink()
    return [str(a), str(trunc), str(junk)]


def test_bad_data_is_skipped_counted_never_fatal(tmp_path, caplog):
    shards = bad_shards(tmp_path)
    ev = loader(shards)
    got = sorted(k for b in ev for k in b["key"])
    assert got[:6] == [f"s{i:04d}" for i in range(6)] and all(k.startswith("s000") for k in got)
    st = ev.stats()
    assert st["corrupt_image"] == 1 and st["bad_json"] == 1 and st["invalid_record"] == 1
    assert st["empty_caption"] == 1 and st["missing_image"] == 1
    assert st["truncated_tar"] == 1 and st["unreadable_shard"] == 1
    assert "skipping" in caplog.text
    # training through the same shards with 2 ranks x 2 workers: fixed number of batches, counts aggregated
    for rank in range(2):
        tr = loader(shards, batches_per_epoch=3, rank=rank, world_size=2, num_workers=2, seed=1)
        assert [len(k) for k in keys(tr)] == [4, 4, 4]
        assert sum(tr.stats().values()) > 0


def test_pattern_errors(tmp_path):
    make_shards(tmp_path, [2, 2])
    assert len(expand_shards(str(tmp_path / "shard-{000..001}.tar"))) == 2
    assert len(expand_shards(str(tmp_path / "shard-*.tar"))) == 2
    with pytest.raises(FileNotFoundError, match="matched no file"):
        loader(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(ValueError, match="allow_pipe=True"):
        loader("pipe:cat " + str(tmp_path / "shard-000.tar"))
    with pytest.raises(ValueError, match="only local paths and http"):
        loader("s3://bucket/shard-000.tar")
    ld = loader("pipe:cat " + str(tmp_path / "shard-000.tar"), allow_pipe=True)
    assert keys(ld) == [["s0000", "s0001"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(tmp_path, num_workers):
    shards = make_shards(tmp_path, [4, 7, 2])
    full = loader(shards, batches_per_epoch=7, num_workers=num_workers, seed=5)
    full.set_epoch(2)
    ref = keys(full)
    ld = loader(shards, batches_per_epoch=7, num_workers=num_workers, seed=5)
    ld.set_epoch(2)
    it = iter(ld)
    first = [next(it)["key"] for _ in range(3)]
    state = ld.state_dict()
    assert state == {"epoch": 2, "batches_consumed": 3}
    del it
    resumed = loader(shards, batches_per_epoch=7, num_workers=num_workers, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer calls set_epoch on resume; the pending position is kept
    rest = keys(resumed)
    assert first + rest == ref and resumed.state_dict()["batches_consumed"] == 7
