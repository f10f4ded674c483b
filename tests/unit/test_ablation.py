"""The ablation harness without training: the arms' commands, refusals, the table's numbers and the plot note."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rsmoe.ablation import AblationError, AblationOptions, plan, run_ablation, slurm_commands
from rsmoe.ablation.table import build_table, grounding, paired_cider_delta, paired_vqa_delta, to_markdown, write_table
from rsmoe.eval.grounding import _row, distinct_share


def opts(tmp_path, **kw) -> AblationOptions:
    return AblationOptions(config="tiny", out=str(tmp_path / "abl"), eval_shards="x/val-*.tar", **kw)


def test_plan_every_arm_same_options_shared_stage1(tmp_path):
    arms, jobs = plan(opts(tmp_path, stage1_steps=7, stage2_steps=5, overrides=["optim.lr=2e-3"]))
    assert [a.name for a in arms] == ["full", "one-stage", "router-none", "router-learned", "experts-1", "experts-2"]
    assert [j.name for j in jobs][:3] == ["stage1", "full/train", "full/eval"] and len(jobs) == 1 + 2 * 6
    trains = {j.name: j.argv for j in jobs if j.kind == "train"}
    assert all("optim.lr=2e-3" in argv for argv in trains.values())  # every run gets the ablation's overrides
    assert "train.steps=7" in trains["stage1"] and "train.steps=5" in trains["router-none/train"]
    one = trains["one-stage/train"]
    assert "train.steps=12" in one and "stage2_init=untrained" in one and "--init-from" not in one  # both stages' steps
    for name in ("full/train", "router-learned/train", "experts-2/train"):
        argv = trains[name]
        assert argv[argv.index("--init-from") + 1] == str(tmp_path / "abl" / "stage1")
    evals = [j.argv for j in jobs if j.kind == "eval"]
    assert all(a[a.index("--shards") + 1] == "x/val-*.tar" and "--bootstrap" in a for a in evals)


def test_torchrun_plan_uses_the_launchers_and_sbatch_lines_chain_the_jobs(tmp_path):
    o = opts(tmp_path, launcher="torchrun", gpus=2, arms=["one-stage"])
    _, jobs = plan(o)
    one = next(j for j in jobs if j.name == "one-stage/train")
    assert one.argv[1].endswith("launchers/stage2.sh") and one.env["STAGE2_INIT"] == "untrained" and "INIT_FROM" not in one.env
    assert "stage2_init=untrained" not in one.argv and one.env["GPUS"] == "2"
    full = next(j for j in jobs if j.name == "full/train")
    assert full.env["INIT_FROM"].endswith("stage1")
    lines = "\n".join(slurm_commands(jobs, o))
    assert "STAGE1=$(" in lines and "slurm/stage1.sbatch" in lines
    assert "--dependency=afterok:$STAGE1" in next(l for l in lines.splitlines() if l.startswith("FULL_TRAIN"))
    assert "--dependency" not in next(l for l in lines.splitlines() if l.startswith("ONE_STAGE_TRAIN"))
    assert "afterok:$ONE_STAGE_TRAIN" in next(l for l in lines.splitlines() if l.startswith("ONE_STAGE_EVAL"))


def test_bad_options_fail_before_anything_runs(tmp_path, capsys):
    from rsmoe.cli import main

    with pytest.raises(AblationError, match="unknown arm"):
        plan(opts(tmp_path, arms=["router-gated"]))
    with pytest.raises(AblationError, match="sets model.router per arm"):
        plan(opts(tmp_path, overrides=["model.router=none"]))
    with pytest.raises(AblationError, match="--gpus needs --launcher torchrun"):
        plan(opts(tmp_path, gpus=2))
    assert main(["ablate", "--config", "tiny", "--out", str(tmp_path / "x"), "--arms", "nope", "--plan"]) == 2
    err = capsys.readouterr().err
    assert "rsmoe ablate: error:" in err and "unknown arm" in err and len(err.strip().splitlines()) == 1
    assert main(["ablate", "--config", "tiny", "--out", str(tmp_path / "x"), "model.lora.r=oops", "--plan"]) == 2
    assert "model.lora.r" in capsys.readouterr().err


def test_a_finished_arm_trained_by_another_command_is_refused(tmp_path):
    o = opts(tmp_path, arms=["router-none"], stage2_steps=3)
    _, jobs = plan(o)
    run = tmp_path / "abl" / "router-none"
    (run / "final").mkdir(parents=True)
    (run / "final" / "visual.safetensors").write_bytes(b"")
    (run / "final" / "config.yaml").write_text("{}")
    other = next(j for j in jobs if j.name == "router-none/train").argv[:-1] + ["train.steps=99"]
    (run / "arm.json").write_text(json.dumps({"train": {"argv": other, "env": {}}}))
    with pytest.raises(AblationError, match=r"trained by another command \(then train.steps=99, now train.steps=3\)"):
        run_ablation(o)


# ---------------------------------------------------------------- the table


def _results(captions: dict[str, str], correct: list[bool], extra: dict | None = None) -> dict:
    refs = {"a": ["a harbour with boats"], "b": ["a green field"], "c": ["an airport with planes"]}
    items = [{"key": k, "caption": c, "references": refs[k],
              "qa": [{"question": "q", "type": "presence", "correct": ok, "expert": "objects", "route": "type", "confidence": None}]}
             for (k, c), ok in zip(captions.items(), correct)]
    return {"meta": {"shards": "s", "n_images": 3, "n_questions": 3},
            "caption/x": {"metrics": {"BLEU-4": 0.1, "METEOR": 0.2, "ROUGE-L": 0.3, "CIDEr": 0.4},
                          "intervals": {"CIDEr": {"low": 0.3, "high": 0.5}}, "n_images": 3},
            "vqa/x": {"metrics": {"overall": float(np.mean(correct)), "presence": float(np.mean(correct))},
                      "n_per_type": {"presence": 3}, "n": 3, "intervals": {}},
            "items": items, **(extra or {})}


def test_table_cells_paired_deltas_and_grounding(tmp_path):
    from rsmoe.ablation.arms import select
    from rsmoe.eval.caption_metrics import score_captions

    out = tmp_path / "abl"
    ref = _results({"a": "a harbour with boats", "b": "a field", "c": "planes"}, [True, False, True])
    arm = _results({"a": "boats", "b": "a green field", "c": "an airport with planes"}, [True, True, True])
    # the grounding blocks as rsmoe eval writes them (rows and distinct share from rsmoe.eval.grounding)
    arm["caption/x"]["grounding"] = {"available": True, "distinct": {"real": distinct_share(["boats", "Boats", "a field"])},
                                     "metrics": {"CIDEr": _row(0.4, 0.15, {"control_ci": (0.1, 0.2), "delta_ci": (0.1, 0.4)})}}
    arm["vqa/x"]["grounding"] = {"available": True, "metrics": {"overall": _row(0.5, 0.6, {"control_ci": (0.4, 0.8), "delta_ci": (-0.3, 0.1)})}}
    for name, r in (("full", ref), ("router-none", arm)):
        (out / name / "eval").mkdir(parents=True)
        (out / name / "eval" / "results.json").write_text(json.dumps(r))
    table = build_table(out, select(["router-none"]), {"full/train": {"seconds": 12.0}}, reference="full", n_resamples=50)
    full, none = table["rows"]
    assert full["caption"]["CIDEr"] == {"value": 0.4, "low": 0.3, "high": 0.5}
    assert "delta_vs_reference" not in full and full["seconds"]["train"] == 12.0
    d = none["delta_vs_reference"]
    assert d["vqa_overall"]["value"] == pytest.approx(1 / 3) and d["vqa_overall"]["n"] == 3
    refs = {k: it["references"] for k, it in ((it["key"], it) for it in arm["items"])}
    direct = (score_captions({it["key"]: it["caption"] for it in arm["items"]}, refs, use_meteor=False).corpus["CIDEr"]
              - score_captions({it["key"]: it["caption"] for it in ref["items"]}, refs, use_meteor=False).corpus["CIDEr"])
    assert d["CIDEr"]["value"] == pytest.approx(direct) and d["CIDEr"]["low"] <= d["CIDEr"]["value"] <= d["CIDEr"]["high"]
    g = none["grounding"]
    assert g["caption CIDEr"]["value"] == pytest.approx(0.25) and (g["caption CIDEr"]["low"], g["caption CIDEr"]["high"]) == (0.1, 0.4)
    assert g["vqa overall"]["value"] == pytest.approx(-0.1) and "ignores the image" in g["vqa overall"]["verdict"]
    assert g["distinct captions"] == {"count": 2, "n": 3} and "caption BLEU-4" not in g  # no BLEU-4 row: left out, not 0
    assert full["grounding"] == {}  # no control in that evaluation
    md = to_markdown(table)
    assert "grounding: real - swapped image" in md and "(reference)" in md
    assert "caption CIDEr: +25.00 [10.00, 40.00]; vqa overall: -10.00 [-30.00, 10.00]; distinct captions: 2/3" in md


def test_grounding_is_read_defensively():
    assert grounding({"caption/x": {"metrics": {}}}) == {}
    assert grounding({"caption/x": {"metrics": {}, "grounding": {"available": False, "reason": "one sample"}}}) == {}
    assert grounding({"caption/x": {"metrics": {}, "grounding": {"available": True, "metrics": {"BLEU-4": {"delta": float("nan")}}}},
                      "vqa/x": {"metrics": {}, "grounding": "not a block"}}) == {}
    assert grounding({"caption/x": {"metrics": {}, "grounding": ["not", "a", "block"]}}) == {}


def test_vqa_delta_is_the_paired_mean(tmp_path):
    a, b = _results({"a": "x", "b": "y", "c": "z"}, [True, True, False]), _results({"a": "x", "b": "y", "c": "z"}, [False, True, True])
    d = paired_vqa_delta(a, b, n_resamples=200)
    assert d["value"] == 0.0 and d["low"] < 0 < d["high"]
    assert paired_cider_delta(a, b, n_resamples=5)["value"] == pytest.approx(0.0)


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    table = {"config": "tiny", "reference": "full", "vqa_types": [], "rows": [], "eval_shards": "s"}
    paths = write_table(tmp_path, table, plot=True)
    assert paths["png"] is None and not (tmp_path / "ablation.png").exists()
    assert "No plot: matplotlib is not installed (pip install 'rsmoe[plot]'" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["plot"].startswith("No plot")


def test_plot_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    table = {"config": "tiny", "reference": "full", "vqa_types": [], "eval_shards": "s", "rows": [
        {"arm": "full", "title": "reference", "overrides": [], "two_stage": True, "seconds": {},
         "caption": {"CIDEr": {"value": 0.5, "low": 0.4, "high": 0.6}}, "vqa": {"overall": None}}]}
    paths = write_table(tmp_path, table, plot=True)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
