"""`rsmoe ablate` end to end on tiny: two arms through the real launchers (torchrun), killed between the arms
(the whole process tree, as a scheduler does), resumed without retraining the finished arm; the table's
numbers are the evaluations' own and its paired difference is the direct one."""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.helpers import kill_group, run, start, wait_until


def test_two_arms_end_to_end_and_resume_after_a_kill_between_them(sample_shards, tmp_path):
    out = tmp_path / "abl"
    cmd = [sys.executable, "-m", "rsmoe.cli", "ablate", "--config", "tiny", "--out", str(out), "--arms", "one-stage",
           "--stage1-steps", "3", "--stage2-steps", "2", "--eval-shards", sample_shards["val"], "--eval-limit", "12",
           "--bootstrap", "20", "--no-meteor", "--questions-per-image", "3", "--launcher", "torchrun", "--device", "cpu",
           "--no-plot", f"data.train_shards={sample_shards['train']}", f"data.val_shards={sample_shards['val']}",
           "data.vqa_prob=0.5", "train.num_eval_samples=0", "checkpoint.every=1"]
    proc = start(cmd)
    # Kill as soon as the second arm has started: the reference arm is trained and evaluated by then.
    wait_until(lambda: (out / "logs" / "one-stage-train.log").exists(), proc, timeout=1200, what="the second arm's start")
    kill_group(proc)
    kept = [out / "stage1" / "final" / "config.yaml", out / "full" / "final" / "config.yaml",
            out / "full" / "eval" / "results.json"]
    before = {p: p.stat().st_mtime_ns for p in kept}
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"stage1", "full/train", "full/eval"}
    assert not (out / "one-stage" / "eval" / "results.json").exists()

    proc = run(cmd, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("stage1", "full/train", "full/eval"):
        assert f"{job}: finished earlier, kept" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == before  # nothing of the finished arm was redone
    after = json.loads((out / "timings.json").read_text())
    assert {k: after[k] for k in timings} == timings and {"one-stage/train", "one-stage/eval"} <= set(after)
    # The one-stage arm really ran without Stage I (launchers/stage2.sh with STAGE2_INIT=untrained).
    assert "stage2_init: untrained" in (out / "one-stage" / "final" / "config.yaml").read_text()

    table = json.loads((out / "ablation.json").read_text())
    assert [r["arm"] for r in table["rows"]] == ["full", "one-stage"]
    res = {r["arm"]: json.loads((out / r["arm"] / "eval" / "results.json").read_text()) for r in table["rows"]}
    for r in table["rows"]:  # the table's cells are the evaluation's numbers
        section = res[r["arm"]]["caption/all"]  # the first 12 samples are RSVQA-LR and -HR: two datasets
        assert r["caption"]["CIDEr"]["value"] == section["metrics"]["CIDEr"]
        assert r["caption"]["CIDEr"]["low"] == section["intervals"]["CIDEr"]["low"]
    correct = {arm: {f"{it['key']}#{j}": float(qa["correct"]) for it in r["items"] for j, qa in enumerate(it.get("qa") or [])}
               for arm, r in res.items()}
    direct = np.mean([correct["one-stage"][k] - correct["full"][k] for k in correct["full"]])
    delta = table["rows"][1]["delta_vs_reference"]["vqa_overall"]
    assert delta["value"] == direct and delta["low"] <= direct <= delta["high"] and delta["n"] == len(correct["full"]) > 0
    md = (out / "ablation.md").read_text()
    assert "two-stage, template router, 3 experts (reference)" in md and "one stage (no Stage I" in md
    assert "matplotlib" not in md  # --no-plot: no plot, no note
    assert "| " + table["rows"][0]["title"] in proc.stdout  # the table is printed too


def test_plan_sbatch_submits_every_arm_with_its_dependencies(tmp_path):
    """`rsmoe ablate --plan sbatch` is a runnable script: under a fake sbatch, Stage I first, two-stage arms after
    it, the one-stage arm without a Stage I (STAGE2_INIT=untrained), every evaluation after its own training."""
    import os
    import subprocess

    from tests.helpers import REPO

    out = tmp_path / "abl"
    script = run([sys.executable, "-m", "rsmoe.cli", "ablate", "--config", "tiny", "--out", str(out), "--plan", "sbatch",
                  "--arms", "one-stage,router-learned", "optim.lr=2e-3"], timeout=300)
    assert script.returncode == 0, script.stderr
    (tmp_path / "submit.sh").write_text(script.stdout)
    fake = tmp_path / "slurm"
    env = {**os.environ, "PATH": f"{REPO}/tests/fake_slurm:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(fake)}
    proc = subprocess.run(["bash", str(tmp_path / "submit.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = {}
    for f in sorted((fake / "sbatch").glob("*.args")):
        args = f.read_text().splitlines()
        job_env = dict(line.split("=", 1) for line in (f.with_suffix(".env")).read_text().splitlines() if "=" in line)
        jobs[int(f.stem)] = (args, job_env)
    scripts = [next(a for a in args if a.endswith(".sbatch")) for args, _ in jobs.values()]
    assert scripts == ["slurm/stage1.sbatch"] + ["slurm/stage2.sbatch", "slurm/eval.sbatch"] * 3
    s1 = next(k for k, (_, e) in jobs.items() if e.get("RUN_DIR") == str(out / "stage1"))
    for arm, two_stage in (("full", True), ("one-stage", False), ("router-learned", True)):
        i, (args, e) = next((k, v) for k, v in jobs.items() if v[1].get("RUN_DIR") == str(out / arm))
        assert ("--dependency=afterok:%d" % s1 in args) == two_stage, arm
        assert (e.get("INIT_FROM") == str(out / "stage1")) == two_stage and (e.get("STAGE2_INIT") == "untrained") != two_stage
        assert "optim.lr=2e-3" in args
        ev = next(k for k, (a, en) in jobs.items() if en.get("MODEL") == str(out / arm))
        assert f"--dependency=afterok:{i}" in jobs[ev][0] and str(out / arm / "eval") in jobs[ev][0]
    assert "model.router=learned" in next(a for a, e in jobs.values() if e.get("RUN_DIR") == str(out / "router-learned"))
