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


# --------------------------------------------------------------------------- webdataset stages + rsmoe's own
def test_several_patterns_joined_by_double_colon(tmp_path):
    a = make_shards(tmp_path, [2, 2])
    (tmp_path / "more").mkdir()
    b = make_shards(tmp_path / "more", [3])
    spec = f"{tmp_path / 'shard-*.tar'} :: {tmp_path / 'more'}"
    assert expand_shards(spec) == a + b
    assert expand_shards([spec, b[0]]) == a + b + b  # lists may hold joined patterns too
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(f"{a[0]} :: {tmp_path / 'nothing-*.tar'}")
    # training accepts what the config documents (data.train_shards="p1 :: p2")
    assert len(keys(loader(spec, batches_per_epoch=3))) == 3
    assert expand_shards("https://host/x-{0..2}.tar") == [f"https://host/x-{i}.tar" for i in range(3)]


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (2, 2), (4, 0)])
def test_every_rank_gets_the_same_batch_count_on_very_unequal_shards(tmp_path, world_size, num_workers):
    # 8 shards >= ranks x workers: the shard list is split, so some workers read only the 1-sample shards
    shards = make_shards(tmp_path, [40, 1, 1, 1, 1, 1, 1, 25])
    per_rank = [keys(loader(shards, batches_per_epoch=6, rank=r, world_size=world_size, num_workers=num_workers))
                for r in range(world_size)]
    assert [len(k) for k in per_rank] == [6] * world_size
    assert all(len(b) == 4 for k in per_rank for b in k)
    shard_of = {f"s{i:04d}": n for n, lo, hi in [(0, 0, 40)] + [(n, 39 + n, 40 + n) for n in range(1, 7)]
                + [(7, 46, 71)] for i in range(lo, hi)}
    for r, got in enumerate(per_rank):  # each rank reads only its own slice of the shard list
        read = {shard_of[k] for b in got for k in b}
        assert read <= set(range(8)[r::world_size]), (r, read)


def _fake_worker(monkeypatch, wid: int, nw: int) -> None:
    import torch.utils.data

    from rsmoe.data import loader as loader_mod

    def info():
        return type("Info", (), {"id": wid, "num_workers": nw})()

    monkeypatch.setattr(loader_mod, "get_worker_info", info)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", info)  # what wds.split_by_worker reads


def test_two_worker_stream_is_the_round_robin_of_each_worker_run_alone(tmp_path, monkeypatch):
    shards = make_shards(tmp_path, [5, 6, 4, 7])
    real = keys(loader(shards, batches_per_epoch=7, num_workers=2, seed=9))
    alone = []
    for wid in range(2):  # an independent computation: each worker's pipeline in this process
        with monkeypatch.context() as m:
            _fake_worker(m, wid, 2)
            ld = loader(shards, batches_per_epoch=7, num_workers=2, seed=9)
            alone.append([b["key"] for b in ld._stream])
    assert [len(a) for a in alone] == [4, 3]  # global batch i is made by worker i % 2
    assert real == [alone[i % 2][i // 2] for i in range(7)]
    first = {k for b in alone[0] for k in b}
    second = {k for b in alone[1] for k in b}
    assert first.isdisjoint(second)  # 4 shards, 2 workers: each draws from its own shards


def test_resume_mid_epoch_with_two_ranks_and_two_workers(tmp_path):
    shards = make_shards(tmp_path, [3, 8, 2, 6, 5])
    for rank in range(2):
        kw = dict(batches_per_epoch=9, rank=rank, world_size=2, num_workers=2, seed=2)
        ref = keys(loader(shards, **kw))
        for k in (1, 4, 8):
            resumed = loader(shards, **kw)
            resumed.load_state_dict({"epoch": 0, "batches_consumed": k})
            assert keys(resumed) == ref[k:], (rank, k)


@pytest.mark.parametrize("member,offset,complete", [
    ("s0002.png", 50, ["s0000", "s0001"]),    # inside the next sample's image: s0001 is complete
    ("s0001.json", 5, ["s0000"]),             # inside s0001's own json: s0001 is partial
    ("s0001.json", -412, ["s0000"]),          # inside a header: tarfile itself stops without an error
    ("s0002.png", -512, ["s0000"]),           # at a block boundary before a header: s0001 may go on, dropped
])
def test_truncated_tar_is_counted_once_and_its_partial_sample_dropped(tmp_path, member, offset, complete):
    full = write_tar(tmp_path / "whole.tar", [m for i in range(4) for m in good(i)]).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == member).offset_data + offset
    (tmp_path / "a-000.tar").write_bytes(full[:cut])
    make_shards(tmp_path, [0, 3])  # shard-001.tar holds s0000..s0002 again: a clean next shard
    nxt = str(tmp_path / "shard-001.tar")
    for num_workers in (0, 2):
        ld = loader([str(tmp_path / "a-000.tar"), nxt], num_workers=num_workers)
        got = [k for b in ld for k in b["key"]]
        # the partial sample is neither merged with the next shard's first one nor counted as a bad sample
        assert sorted(got) == sorted(complete + ["s0000", "s0001", "s0002"])
        assert {r: n for r, n in ld.stats().items() if n} == {"truncated_tar": 1}


def test_an_intact_archive_is_not_counted(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", [m for i in range(3) for m in good(i)])
    ends = whole.read_bytes().rstrip(b"\0")  # keep one zero block: still a proper end
    (tmp_path / "short-pad.tar").write_bytes(ends + b"\0" * (-len(ends) % 512 + 512))
    for path in (whole, tmp_path / "short-pad.tar"):
        ld = loader(str(path))
        assert [k for b in ld for k in b["key"]] == ["s0000", "s0001", "s0002"]
        assert not any(ld.stats().values())


def test_duplicate_member_rejects_that_sample_only(tmp_path):
    members = good(0) + good(1) + [("s0001.json", json.dumps(record(7)).encode())] + good(2)
    ld = loader(str(write_tar(tmp_path / "dup.tar", members)))
    assert [k for b in ld for k in b["key"]] == ["s0000", "s0002"]
    assert {r: n for r, n in ld.stats().items() if n} == {"invalid_record": 1}


def test_eval_sample_i_goes_to_rank_i_mod_world_like_scan_keys(tmp_path):
    from rsmoe.eval.run import scan_keys

    shards = make_shards(tmp_path, [4, 3])
    bad = write_tar(tmp_path / "shard-002.tar", good(50) + [("x.json", b"{oops")] + good(51) + good(52))
    urls = sorted(shards + [str(bad)])
    order = [f"s{i:04d}" for i in range(7)] + ["s0050", "x", "s0051", "s0052"]  # the global index
    index = scan_keys(urls)
    assert [(i, k) for i, k, _ in index] == [(i, k) for i, k in enumerate(order) if k != "x"]
    for world_size in (2, 3):
        for rank in range(world_size):
            got = [k for b in loader(urls, rank=rank, world_size=world_size) for k in b["key"]]
            assert got == [k for i, k in enumerate(order) if i % world_size == rank and k != "x"]
            assert set(got) == {k for i, k, _ in index if i % world_size == rank}


def test_nothing_valid_raises_instead_of_spinning(tmp_path):
    from rsmoe.data.loader import NoValidDataError

    junk = tmp_path / "junk-000.tar"
    junk.write_bytes(b"not a tar archive\n" * 40)
    with pytest.raises(NoValidDataError, match="no valid sample in 20 consecutive shard reads"):
        keys(loader(str(junk), batches_per_epoch=2))
    corrupt = [m for i in range(5) for m in [(f"c{i}.png", b"\x89PNG\r\n\x1a\n" + b"junk" * 10),
                                             (f"c{i}.json", json.dumps(record(i)).encode())]]
    with pytest.raises(NoValidDataError, match="had undecodable images"):
        keys(loader(str(write_tar(tmp_path / "corrupt-000.tar", corrupt)), batches_per_epoch=2, num_workers=2))


def test_process_exits_with_worker_loaders_still_alive(tmp_path):
    # Workers ignore SIGTERM (preemption must reach the trainer only), so multiprocessing's exit hook,
    # which SIGTERMs and joins daemonic children, used to wait forever for any worker still running.
    import subprocess
    import sys

    shards = make_shards(tmp_path, [6, 6])
    (tmp_path / "junk-000.tar").write_bytes(b"not a tar\n" * 40)
    script = f"""
from rsmoe.data.loader import build_loader, NoValidDataError
kw = dict(batch_size=2, image_size=16, image_mean={MEAN}, image_std={STD}, batches_per_epoch=50, num_workers=2)
live = iter(build_loader({shards!r}, **kw))
next(live)  # an epoch left unfinished, its workers still running
keep = []
try:
    list(build_loader({str(tmp_path / "junk-000.tar")!r}, **kw))
except NoValidDataError as e:
    keep += [e, keep]  # a reference cycle keeps the failed loader's frames alive until exit
print("done", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]


@pytest.mark.skipif(__import__("shutil").which("curl") is None, reason="webdataset opens http(s) shards with curl")
def test_http_shards_stream_through_webdataset(tmp_path):
    import functools
    import http.server
    import threading

    make_shards(tmp_path, [3, 2])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        ld = loader(f"{base}/shard-{{000..001}}.tar :: {base}/missing-000.tar")
        assert [k for b in ld for k in b["key"]] == [f"s{i:04d}" for i in range(5)]
        assert {r: n for r, n in ld.stats().items() if n} == {"unreadable_shard": 1}  # the 404
    finally:
        server.shutdown()
