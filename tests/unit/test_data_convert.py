"""Converters (one per public format), shard writer/manifest, bundled sample build."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from rsmoe.data import convert
from rsmoe.data.convert import ConvertError, convert_samples
from rsmoe.data.sample import build_sample_shards
from rsmoe.data.schema import validate_record

FIX = Path(__file__).parents[1] / "data"


def read_shards(out: Path) -> dict[str, dict]:
    """key -> {'record', 'ext', 'size'} for every sample in out/*.tar."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                d = samples.setdefault(key, {})
                if ext == "json":
                    d["record"] = json.loads(data)
                else:
                    d["ext"] = ext
                    d["size"] = Image.open(io.BytesIO(data)).size
    return samples


def run_cli(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    from rsmoe import cli

    out = tmp_path / "out"
    rc = cli.main(["convert", *argv, "--out", str(out), "--no-progress"])
    return rc, json.loads((out / "manifest.json").read_text()) if rc == 0 else {}


def check_all_valid(samples: dict) -> None:
    for key, s in samples.items():
        assert validate_record(s["record"]) is None, key
        assert s["ext"] in ("png", "jpg")


def test_rsicap(tmp_path):
    rc, man = run_cli(tmp_path, "rsicap", "--annotations", str(FIX / "rsicap/captions.json"),
                      "--images", str(FIX / "rsicap/images"), "--shard-size", "1")
    assert rc == 0 and man["splits"]["train"]["samples"] == 2 and len(man["splits"]["train"]["shards"]) == 2
    samples = read_shards(tmp_path / "out")
    check_all_valid(samples)
    rec = samples["RSICap_P0378_0001"]["record"]
    assert rec["instruction"] == "Take a look at this image and describe what you notice."
    assert rec["parts"]["relations"] == "A parking lot lies to the left of the school."
    assert rec["dataset"] == "RSICap" and rec["image_id"] == "P0378_0001"


def test_rsieval(tmp_path):
    rc, man = run_cli(tmp_path, "rsieval", "--annotations", str(FIX / "rsieval/annotations.json"),
                      "--images", str(FIX / "rsieval/images"))
    assert rc == 0 and man["splits"]["test"]["samples"] == 1
    rec = read_shards(tmp_path / "out")["RSIEval_P0003_0004"]["record"]
    assert [q["type"] for q in rec["qa"]] == ["quantity", "presence", "color"]
    assert rec["parts"]["objects"] == "There are three red houses."


def test_karpathy_ucm_tif(tmp_path):
    rc, man = run_cli(tmp_path, "karpathy", "--annotations", str(FIX / "karpathy/dataset_ucm.json"),
                      "--images", str(FIX / "karpathy/imgs"), "--dataset", "UCM-Captions")
    assert rc == 0
    assert man["datasets"]["UCM-Captions"] == {"test": 1, "train": 2, "val": 1}
    samples = read_shards(tmp_path / "out")
    check_all_valid(samples)
    rec = samples["UCM-Captions_7"]["record"]
    assert samples["UCM-Captions_7"]["ext"] == "png"  # TIFF converted
    assert rec["caption"] == "There is a piece of farmland." and len(rec["references"]) == 5
    assert {s["record"]["label"] for s in samples.values()} == {"agricultural"}  # 7, 34, 90, 91.tif


def test_karpathy_ucm_class_label(tmp_path):
    # n.tif is class CLASSES[(n-1)//100]: block edges, and the UCM rule applies only to UCM files.
    assert [convert.ucm_class(f"{n}.tif") for n in (1, 100, 101, 1363, 1900, 1901, 2100)] == [
        "agricultural", "agricultural", "airplane", "mobilehomepark", "sparseresidential", "storagetanks", "tenniscourt"]
    data = json.loads((FIX / "karpathy/dataset_ucm.json").read_text())
    data["images"][0]["filename"] = "2101.tif"
    bad = tmp_path / "dataset_ucm.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConvertError, match=r"images\[0\] filename '2101.tif' is not <n>.tif"):
        convert.open_karpathy(bad, FIX / "karpathy/imgs")
    data["dataset"] = "sydney"
    bad.write_text(json.dumps(data))
    _, it = convert.open_karpathy(bad, FIX / "karpathy/imgs", dataset="Sydney-Captions")
    assert all("label" not in s.record for s in it)
    with pytest.raises(ConvertError, match="class is unknown"):
        convert.open_karpathy(bad, FIX / "karpathy/imgs", dataset="UCM-Captions")
    rec = {"caption": "A farm.", "parts": {"theme": "A farm.", "objects": "", "relations": ""}, "qa": [],
           "dataset": "UCM-Captions", "split": "val", "image_id": "6"}
    assert validate_record({**rec, "label": "agricultural"}) is None and validate_record(rec) is None
    assert "label" in validate_record({**rec, "label": ""}) and "label" in validate_record({**rec, "label": 3})


def test_nwpu(tmp_path):
    rc, man = run_cli(tmp_path, "nwpu", "--annotations", str(FIX / "nwpu/dataset_nwpu.json"),
                      "--images", str(FIX / "nwpu/images"))
    assert rc == 0 and man["datasets"]["NWPU-Captions"] == {"test": 1, "train": 1}
    samples = read_shards(tmp_path / "out")
    check_all_valid(samples)
    assert samples["NWPU-Captions_airplane_001"]["ext"] == "jpg"
    assert len(samples["NWPU-Captions_harbor_001"]["record"]["references"]) == 5


def test_rsvqa_lr_active_and_split(tmp_path):
    d = FIX / "rsvqa_lr"
    rc, man = run_cli(tmp_path, "rsvqa", "--images-json", str(d / "LR_split_val_images.json"),
                      "--questions-json", str(d / "LR_split_val_questions.json"),
                      "--answers-json", str(d / "LR_split_val_answers.json"), "--images", str(d / "images"))
    assert rc == 0
    assert man["datasets"] == {"RSVQA-LR": {"val": 2}}  # image 2 is inactive
    samples = read_shards(tmp_path / "out")
    check_all_valid(samples)
    rec = samples["RSVQA-LR_0"]["record"]
    qs = json.loads((d / "LR_split_val_questions.json").read_text())["questions"]
    inactive = [q["question"] for q in qs if not q["active"]]
    assert len(rec["qa"]) == 11 and inactive[0] not in [q["question"] for q in rec["qa"]]
    assert rec["parts"]["theme"].startswith("This is a Sentinel-2 satellite image at 10 m resolution of a rural area.")
    assert rec["caption"].startswith(rec["parts"]["theme"])


def test_rsvqa_hr(tmp_path):
    d = FIX / "rsvqa_hr"
    rc, man = run_cli(tmp_path, "rsvqa", "--images-json", str(d / "USGS_split_test_images.json"),
                      "--questions-json", str(d / "USGS_split_test_questions.json"),
                      "--answers-json", str(d / "USGS_split_test_answers.json"), "--images", str(d / "images"))
    assert rc == 0 and man["datasets"] == {"RSVQA-HR": {"test": 2}}
    rec = read_shards(tmp_path / "out")["RSVQA-HR_0"]["record"]
    assert "aerial image at 15 cm resolution" in rec["parts"]["theme"]


def test_vrsbench(tmp_path):
    d = FIX / "vrsbench"
    rc, man = run_cli(tmp_path, "vrsbench", "--captions-json", str(d / "VRSBench_EVAL_Cap.json"),
                      "--vqa-json", str(d / "VRSBench_EVAL_vqa.json"), "--images", str(d / "Images_val"))
    assert rc == 0 and man["splits"]["test"]["samples"] == 2
    assert man["skipped"] == {"vqa_without_caption": 1}
    rec = read_shards(tmp_path / "out")["VRSBench_P0003_0002"]["record"]
    assert len(rec["qa"]) == 2 and rec["qa"][0]["answer"] == "5"
    assert rec["parts"]["relations"] == "A road runs next to the parking lot."


def test_malformed_annotation_errors(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text('{"annotations": [{"filename": "a.png"')
    with pytest.raises(ConvertError, match=r"captions.json: not valid JSON"):
        convert.open_rsicap(bad, FIX / "rsicap/images")
    bad.write_text('{"annotations": [{"filename": "a.png"}]}')
    with pytest.raises(ConvertError, match=r"annotations\[0\] has no field 'text_output'"):
        convert.open_rsicap(bad, FIX / "rsicap/images")
    bad.write_text('{"images": {}}')
    with pytest.raises(ConvertError, match=r"top level.images is dict, expected list"):
        convert.open_karpathy(bad, FIX / "karpathy/imgs")
    with pytest.raises(ConvertError, match="not found"):
        convert.open_nwpu(tmp_path / "missing.json", FIX / "nwpu/images")
    with pytest.raises(ConvertError, match="image directory not found"):
        convert.open_rsicap(FIX / "rsicap/captions.json", tmp_path / "nope")
    # CLI reports the problem with exit code 2 instead of a traceback
    rc, _ = run_cli(tmp_path, "rsicap", "--annotations", str(bad), "--images", str(FIX / "rsicap/images"))
    assert rc == 2


def test_missing_images_counted_and_all_missing_is_error(tmp_path):
    with pytest.raises(ConvertError, match="no samples were written"):
        convert_samples(convert.open_rsicap(FIX / "rsicap/captions.json", FIX / "rsieval/images"),
                        tmp_path / "o", progress=False)
    assert not list((tmp_path / "o").glob("*.tar"))


def test_rewrite_removes_stale_shards(tmp_path):
    src = lambda: convert.open_rsicap(FIX / "rsicap/captions.json", FIX / "rsicap/images")  # noqa: E731
    convert_samples(src(), tmp_path, shard_size=1, progress=False)
    assert len(list(tmp_path.glob("train-*.tar"))) == 2
    man = convert_samples(src(), tmp_path, shard_size=10, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"] == man["splits"]["train"]["shards"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_build_sample_shards_idempotent(tmp_path):
    out = tmp_path / "sample"
    man = build_sample_shards(out)
    assert man["up_to_date"] is False
    assert man["datasets"]["UCM-Captions"] == {"test": 21, "train": 63, "val": 21}
    assert man["datasets"]["RSVQA-LR"] == {"train": 40, "val": 10}
    assert man["datasets"]["RSVQA-HR"] == {"train": 12, "val": 3}
    assert {p.name.split("-")[0] for p in out.glob("*.tar")} == {"train", "val", "test"}
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = build_sample_shards(out)
    assert again["up_to_date"] is True and {p: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    samples = read_shards(out)
    ucm = samples["UCM-Captions_1363"]["record"]
    assert len(ucm["references"]) == 5 and ucm["caption"] == ucm["references"][0]
    assert ucm["label"] == "mobilehomepark"
    labels = Counter(s["record"].get("label") for k, s in samples.items() if k.startswith("UCM-Captions_"))
    assert len(labels) == 21 and set(labels.values()) == {5}  # 21 classes x 5 images
    lr = samples["RSVQA-LR_0"]["record"]
    assert len(lr["qa"]) >= 100 and lr["parts"]["objects"] and lr["parts"]["relations"]
