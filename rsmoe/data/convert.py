"""Converters from the public dataset formats to rsmoe webdataset shards.

Each ``open_<format>(...)`` reads and checks the annotation file(s) up front (so a malformed file
fails before anything is written, with a message naming the file, the problem and what to do) and
returns ``(n_records, iterator_of_Sample)``; images are read lazily. ``convert_samples`` writes them
with a tqdm progress bar into ``<split>-NNNNNN.tar`` shards and a ``manifest.json``.

The command is ``rsmoe convert <format> ...`` (rsmoe.cli.convert); see ``docs/data.md``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from rsmoe.data.rsvqa_captions import parts_to_caption, qa_to_parts
from rsmoe.data.schema import Sample, make_record, safe_key
from rsmoe.data.shards import write_shards
from rsmoe.data.splitter import normalise_caption, split_caption
from rsmoe.errors import UserError

logger = logging.getLogger(__name__)

Source = tuple[int, Iterator[Sample]]
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ConvertError(UserError):
    """A malformed annotation file or a missing input; the message says what to do."""


# --------------------------------------------------------------------------- helpers
def _load_json(path: str | os.PathLike, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p}: {what} not found. Pass the path to the {what} of the original release.")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(
            f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
            f"Re-download the {what}; it may be truncated or be a JavaScript wrapper rather than JSON."
        ) from e
    except UnicodeDecodeError as e:
        raise ConvertError(f"{p}: not UTF-8 text ({e}). Is this really the {what}?") from e


def _require(cond: bool, path: str | os.PathLike, problem: str, fix: str) -> None:
    if not cond:
        raise ConvertError(f"{path}: {problem}. {fix}")


def _field(rec: Any, name: str, typ: type | tuple[type, ...], path: str | os.PathLike, where: str) -> Any:
    _require(isinstance(rec, dict), path, f"{where} is not a JSON object", "Check that this is the right file.")
    _require(name in rec, path, f"{where} has no field '{name}'", "Check that this is the original file format.")
    val = rec[name]
    _require(
        isinstance(val, typ),
        path,
        f"{where}.{name} is {type(val).__name__}, expected {getattr(typ, '__name__', typ)}",
        "Check that this is the original file format.",
    )
    return val


def read_image(candidates: Sequence[Path]) -> tuple[bytes, str] | None:
    """Bytes and extension of the first existing candidate; other formats (TIFF, BMP) become PNG."""
    for p in candidates:
        if not p.is_file():
            continue
        data = p.read_bytes()
        suffix = p.suffix.lower()
        if suffix == ".png":
            return data, "png"
        if suffix in (".jpg", ".jpeg"):
            return data, "jpg"
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"
    return None


def _candidates(image_dir: Path, name: str) -> list[Path]:
    """The named file, then the same stem with other image suffixes (datasets are often re-encoded)."""
    p = image_dir / name
    stem = p.with_suffix("") if p.suffix.lower() in _IMAGE_SUFFIXES else p
    return [p] + [stem.with_suffix(s) for s in _IMAGE_SUFFIXES if stem.with_suffix(s) != p]


def _check_image_dir(image_dir: str | os.PathLike) -> Path:
    d = Path(image_dir)
    if not d.is_dir():
        raise ConvertError(f"{d}: image directory not found. Pass --images pointing at the dataset's image folder.")
    return d


def _clean_sentence(s: str) -> str:
    return normalise_caption(s)


def _samples(
    items: Sequence[Any], build: Callable[[Any], tuple[str, list[Path], dict[str, Any]] | None], skipped: Counter[str]
) -> Iterator[Sample]:
    for item in items:
        built = build(item)
        if built is None:
            continue
        key, candidates, record = built
        img = read_image(candidates)
        if img is None:
            skipped["missing_image"] += 1
            if skipped["missing_image"] <= 5:
                logger.warning("image not found for %s (tried %s); skipping", key, candidates[0])
            continue
        yield Sample(key=key, image=img[0], image_ext=img[1], record=record)


# --------------------------------------------------------------------------- formats
def open_rsicap(
    annotations: str | os.PathLike, images: str | os.PathLike, *, split: str = "train", dataset: str = "RSICap",
    skipped: Counter[str] | None = None,
) -> Source:
    """RSICap ``captions.json``: ``{"annotations": [{"image_id", "filename", "text_input", "text_output"}]}``."""
    skipped = skipped if skipped is not None else Counter()
    data = _load_json(annotations, "RSICap captions.json")
    anns = _field(data, "annotations", list, annotations, "top level")
    image_dir = _check_image_dir(images)
    for i, a in enumerate(anns):
        for f in ("filename", "text_output"):
            _field(a, f, str, annotations, f"annotations[{i}]")

    def build(a: dict[str, Any]):
        caption = _clean_sentence(a["text_output"])
        if not caption:
            skipped["empty_caption"] += 1
            return None
        image_id = str(a.get("image_id", Path(a["filename"]).stem))
        rec = make_record(
            caption=caption, parts=split_caption(caption), dataset=dataset, split=split,
            image_id=Path(a["filename"]).stem, instruction=a.get("text_input") or None, references=[caption],
        )
        return safe_key(dataset, Path(a["filename"]).stem or image_id), _candidates(image_dir, a["filename"]), rec

    return len(anns), _samples(anns, build, skipped)


def open_rsieval(
    annotations: str | os.PathLike, images: str | os.PathLike, *, split: str = "test", dataset: str = "RSIEval",
    skipped: Counter[str] | None = None,
) -> Source:
    """RSIEval ``annotations.json``: ``{"annotations": [{"filename", "caption", "qa_pairs": [...]}]}``."""
    skipped = skipped if skipped is not None else Counter()
    data = _load_json(annotations, "RSIEval annotations.json")
    anns = _field(data, "annotations", list, annotations, "top level")
    image_dir = _check_image_dir(images)
    for i, a in enumerate(anns):
        _field(a, "filename", str, annotations, f"annotations[{i}]")
        _field(a, "caption", str, annotations, f"annotations[{i}]")
        for j, qa in enumerate(a.get("qa_pairs") or []):
            for f in ("question", "answer"):
                _field(qa, f, str, annotations, f"annotations[{i}].qa_pairs[{j}]")

    def build(a: dict[str, Any]):
        caption = _clean_sentence(a["caption"])
        if not caption:
            skipped["empty_caption"] += 1
            return None
        qa = [{"question": q["question"], "answer": q["answer"], "type": str(q.get("type", ""))} for q in a.get("qa_pairs") or []]
        stem = Path(a["filename"]).stem
        rec = make_record(caption=caption, parts=split_caption(caption), dataset=dataset, split=split,
                          image_id=stem, qa=qa, references=[caption])
        return safe_key(dataset, stem), _candidates(image_dir, a["filename"]), rec

    return len(anns), _samples(anns, build, skipped)


# UC Merced Land Use classes in alphabetical order: UCM-Captions image n.tif (imgid n-1) is
# UCM_CLASSES[(n-1)//100] (21 blocks of 100; verified in data/sample/ucm_captions/SOURCE.md).
UCM_CLASSES: tuple[str, ...] = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential",
    "forest", "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark",
    "overpass", "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt",
)


def _is_ucm(data: Any, dataset: str) -> bool:
    """A Karpathy file of UCM-Captions: its own ``dataset`` field says "ucm" or the name starts with UCM."""
    own = str(data.get("dataset") or "").strip().lower() if isinstance(data, dict) else ""
    return own in ("ucm", "ucm-captions", "ucm_captions") or dataset.strip().lower().startswith("ucm")


def ucm_class(filename: str, path: str | os.PathLike = "", where: str = "") -> str:
    """UC Merced class of a UCM-Captions image ``<n>.tif`` (n = 1..2100)."""
    stem = Path(filename).stem
    _require(stem.isdigit() and 1 <= int(stem) <= 100 * len(UCM_CLASSES), path,
             f"{where} filename '{filename}' is not <n>.tif with n in 1..{100 * len(UCM_CLASSES)}, so its UC Merced class is unknown",
             "Pass the original UCM-Captions dataset.json, or convert it under a --dataset name not starting with 'UCM'.")
    return UCM_CLASSES[(int(stem) - 1) // 100]


def open_karpathy(
    annotations: str | os.PathLike, images: str | os.PathLike, *, dataset: str | None = None,
    skipped: Counter[str] | None = None,
) -> Source:
    """Karpathy-style caption JSON (UCM-Captions, Sydney-Captions, RSICD ``dataset_*.json``).

    ``{"images": [{"filename", "imgid", "split", "sentences": [{"raw", "tokens", ...}]}], "dataset"?}``.
    The first sentence is the training ``caption``; all sentences are kept as ``references``.
    UCM-Captions records also get their UC Merced scene class as ``label`` (:func:`ucm_class`).
    """
    skipped = skipped if skipped is not None else Counter()
    data = _load_json(annotations, "Karpathy-style caption JSON")
    imgs = _field(data, "images", list, annotations, "top level")
    dataset = dataset or str(data.get("dataset") or Path(annotations).stem)
    image_dir = _check_image_dir(images)
    ucm = _is_ucm(data, dataset)
    for i, r in enumerate(imgs):
        _field(r, "filename", str, annotations, f"images[{i}]")
        _field(r, "split", str, annotations, f"images[{i}]")
        _field(r, "sentences", list, annotations, f"images[{i}]")
        if ucm:
            ucm_class(r["filename"], annotations, f"images[{i}]")  # fail before anything is written

    def build(r: dict[str, Any]):
        refs = []
        for s in r["sentences"]:
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(map(str, s["tokens"]))
            if isinstance(raw, str) and _clean_sentence(raw):
                refs.append(_clean_sentence(raw))
        if not refs:
            skipped["empty_caption"] += 1
            return None
        stem = Path(r["filename"]).stem
        rec = make_record(caption=refs[0], parts=split_caption(refs[0]), dataset=dataset, split=r["split"],
                          image_id=str(r.get("imgid", stem)), references=refs,
                          label=ucm_class(r["filename"]) if ucm else None)
        cands = ([Path(annotations).parent / r["png"]] if isinstance(r.get("png"), str) else []) + _candidates(image_dir, r["filename"])
        return safe_key(dataset, stem), cands, rec

    return len(imgs), _samples(imgs, build, skipped)


def open_nwpu(
    annotations: str | os.PathLike, images: str | os.PathLike, *, dataset: str = "NWPU-Captions",
    skipped: Counter[str] | None = None,
) -> Source:
    """NWPU-Captions ``dataset_nwpu.json``: ``{"<class>": [{"filename", "split", "raw", "raw_1".."raw_4", "imgid"}]}``.

    Images are looked up as ``<images>/<class>/<filename>`` (the release layout), then ``<images>/<filename>``.
    """
    skipped = skipped if skipped is not None else Counter()
    data = _load_json(annotations, "NWPU-Captions dataset_nwpu.json")
    _require(isinstance(data, dict), annotations, "top level is not an object of class -> records",
             "Pass dataset_nwpu.json from the NWPU-Captions release.")
    image_dir = _check_image_dir(images)
    items: list[tuple[str, dict[str, Any]]] = []
    for cls, recs in data.items():
        _require(isinstance(recs, list), annotations, f"class '{cls}' is not a list of records",
                 "Pass dataset_nwpu.json from the NWPU-Captions release.")
        for i, r in enumerate(recs):
            _field(r, "filename", str, annotations, f"{cls}[{i}]")
            _field(r, "split", str, annotations, f"{cls}[{i}]")
            _field(r, "raw", str, annotations, f"{cls}[{i}]")
            items.append((cls, r))

    def build(item: tuple[str, dict[str, Any]]):
        cls, r = item
        refs = [_clean_sentence(r[k]) for k in ("raw", "raw_1", "raw_2", "raw_3", "raw_4")
                if isinstance(r.get(k), str) and _clean_sentence(r[k])]
        if not refs:
            skipped["empty_caption"] += 1
            return None
        stem = Path(r["filename"]).stem
        rec = make_record(caption=refs[0], parts=split_caption(refs[0]), dataset=dataset, split=r["split"],
                          image_id=stem, references=refs)
        return safe_key(dataset, stem), _candidates(image_dir / cls, r["filename"]) + _candidates(image_dir, r["filename"]), rec

    return len(items), _samples(items, build, skipped)


def _infer_split(*paths: str | os.PathLike, default: str = "train") -> str:
    for p in paths:
        m = re.search(r"(?:^|[_\-.])(train|val|valid|test)(?:[_\-.]|$)", Path(p).name, re.I)
        if m:
            s = m.group(1).lower()
            return "val" if s == "valid" else s
    return default


def load_rsvqa(
    images_json: str | os.PathLike, questions_json: str | os.PathLike, answers_json: str | os.PathLike,
) -> list[tuple[dict[str, Any], list[dict[str, str]]]]:
    """Join the three RSVQA files: ``[(image_record, [{question, answer, type}, ...])]`` for active images.

    Inactive images, questions and answers (``"active": false``) are dropped; an image's QA keeps the
    order of its ``questions_ids``.
    """
    imgs = _field(_load_json(images_json, "RSVQA images JSON"), "images", list, images_json, "top level")
    qs = _field(_load_json(questions_json, "RSVQA questions JSON"), "questions", list, questions_json, "top level")
    ans = _field(_load_json(answers_json, "RSVQA answers JSON"), "answers", list, answers_json, "top level")
    q_by_id: dict[int, dict[str, Any]] = {}
    for i, q in enumerate(qs):
        _field(q, "id", int, questions_json, f"questions[{i}]")
        _field(q, "question", str, questions_json, f"questions[{i}]")
        q_by_id[q["id"]] = q
    a_by_id: dict[int, dict[str, Any]] = {}
    for i, a in enumerate(ans):
        _field(a, "id", int, answers_json, f"answers[{i}]")
        _field(a, "answer", str, answers_json, f"answers[{i}]")
        a_by_id[a["id"]] = a
    out = []
    for i, im in enumerate(imgs):
        _field(im, "id", int, images_json, f"images[{i}]")
        if not im.get("active", True):
            continue
        qa = []
        for qid in im.get("questions_ids") or []:
            q = q_by_id.get(qid)
            _require(q is not None, questions_json, f"question id {qid} (image {im['id']}) is missing",
                     "The images/questions/answers files must come from the same RSVQA split.")
            if not q.get("active", True):
                continue
            answers = [a_by_id[aid] for aid in q.get("answers_ids") or [] if aid in a_by_id]
            answers = [a for a in answers if a.get("active", True)]
            if not answers:
                continue
            qa.append({"question": q["question"], "answer": answers[0]["answer"], "type": str(q.get("type", ""))})
        out.append((im, qa))
    return out


def open_rsvqa(
    images_json: str | os.PathLike, questions_json: str | os.PathLike, answers_json: str | os.PathLike,
    images: str | os.PathLike, *, split: str | None = None, dataset: str | None = None,
    split_fn: Callable[[str], str] | None = None, skipped: Counter[str] | None = None,
) -> Source:
    """RSVQA-LR/HR: one sample per active image, with its active QA and QA-derived captions.

    Images are ``<images>/<id>.<png|tif|jpg>``. ``split`` defaults to the one named in the file names
    (``LR_split_val_...`` -> val), else ``train``. ``split_fn(key)`` overrides it per sample.
    """
    skipped = skipped if skipped is not None else Counter()
    joined = load_rsvqa(images_json, questions_json, answers_json)
    image_dir = _check_image_dir(images)
    split = split or _infer_split(images_json, questions_json)

    def build(item: tuple[dict[str, Any], list[dict[str, str]]]):
        im, qa = item
        if not qa:
            skipped["no_active_qa"] += 1
            return None
        sensor = str(im.get("sensor", ""))
        ds = dataset or ("RSVQA-LR" if sensor.upper().startswith("S2") else "RSVQA-HR")
        parts = qa_to_parts(qa, sensor=sensor or None, resolution=im.get("res_x"))
        key = safe_key(ds, str(im["id"]))
        rec = make_record(caption=parts_to_caption(parts), parts=parts, dataset=ds,
                          split=split_fn(key) if split_fn else split, image_id=str(im["id"]), qa=qa)
        rec["original_name"] = im.get("original_name")
        return key, _candidates(image_dir, f"{im['id']}.png"), rec

    return len(joined), _samples(joined, build, skipped)


def open_vrsbench(
    captions_json: str | os.PathLike, vqa_json: str | os.PathLike | None, images: str | os.PathLike, *,
    split: str = "test", dataset: str = "VRSBench", skipped: Counter[str] | None = None,
) -> Source:
    """VRSBench eval files: ``VRSBench_EVAL_Cap.json`` and optionally ``VRSBench_EVAL_vqa.json``.

    Both are JSON lists; caption entries ``{"image_id": "<file>.png", "question": <prompt>,
    "ground_truth": <caption>, "question_id"}``, VQA entries add ``"type"``. QA is attached to the
    image with the same ``image_id``; images with QA but no caption are skipped (counted).
    """
    skipped = skipped if skipped is not None else Counter()
    caps = _load_json(captions_json, "VRSBench caption JSON (VRSBench_EVAL_Cap.json)")
    _require(isinstance(caps, list), captions_json, "top level is not a list", "Pass VRSBench_EVAL_Cap.json.")
    qa_by_image: dict[str, list[dict[str, str]]] = defaultdict(list)
    if vqa_json is not None:
        vqa = _load_json(vqa_json, "VRSBench VQA JSON (VRSBench_EVAL_vqa.json)")
        _require(isinstance(vqa, list), vqa_json, "top level is not a list", "Pass VRSBench_EVAL_vqa.json.")
        for i, q in enumerate(vqa):
            for f in ("image_id", "question", "ground_truth"):
                _field(q, f, str, vqa_json, f"[{i}]")
            qa_by_image[q["image_id"]].append(
                {"question": q["question"], "answer": q["ground_truth"], "type": str(q.get("type", ""))})
    image_dir = _check_image_dir(images)
    by_image: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(caps):
        _field(c, "image_id", str, captions_json, f"[{i}]")
        _field(c, "ground_truth", str, captions_json, f"[{i}]")
        by_image.setdefault(c["image_id"], c)  # one caption per image in the release
    skipped["vqa_without_caption"] += len(set(qa_by_image) - set(by_image))

    def build(c: dict[str, Any]):
        caption = _clean_sentence(c["ground_truth"])
        if not caption:
            skipped["empty_caption"] += 1
            return None
        stem = Path(c["image_id"]).stem
        rec = make_record(caption=caption, parts=split_caption(caption), dataset=dataset, split=split,
                          image_id=stem, qa=qa_by_image.get(c["image_id"], []),
                          instruction=c.get("question") if isinstance(c.get("question"), str) else None,
                          references=[caption])
        return safe_key(dataset, stem), _candidates(image_dir, c["image_id"]), rec

    items = list(by_image.values())
    return len(items), _samples(items, build, skipped)


# --------------------------------------------------------------------------- writing
def convert_samples(
    source: Source, out_dir: str | os.PathLike, *, shard_size: int = 1000, desc: str = "convert",
    skipped: Counter[str] | None = None, progress: bool = True, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``source`` to shards in ``out_dir``; the manifest also records skipped records by reason."""
    total, samples = source
    skipped = skipped if skipped is not None else Counter()
    bar = tqdm(samples, total=total, desc=desc, unit="img", disable=not progress)
    manifest_extra = dict(extra or {})
    manifest_extra["skipped"] = skipped  # filled in while the generator runs; serialised at close
    manifest = write_shards(bar, out_dir, shard_size, manifest_extra)
    if manifest["total"] == 0:
        raise ConvertError(
            f"no samples were written to {out_dir} (skipped: {dict(skipped) or 'none'}). "
            "Check that --images points at the folder holding the files named in the annotations."
        )
    return manifest
