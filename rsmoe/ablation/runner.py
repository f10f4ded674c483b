"""Run the ablation: every arm trained and evaluated by the same commands a user would type, in
subprocesses, resumable (docs/ablation.md).

Layout of the ablation folder (`--out`):

    stage1/                 the Stage I run every two-stage arm starts from
    <arm>/                  that arm's Stage II run (final/, checkpoints/, logs/, ...)
    <arm>/eval/             `rsmoe eval` of it (results.json, report.html, report.md)
    <arm>/arm.json          the arm's commands; a finished arm trained with other commands is refused
    logs/<job>.log          each command's output
    plan.json               every command of the ablation, in order (also written by --plan)
    timings.json            wall and CPU seconds of every finished command
    ablation.md/.json/.png  the table (rsmoe.ablation.table) and its plot

A command is skipped when what it makes is complete: a training run when its final/ is complete (no
INCOMPLETE marker), an evaluation when its results.json reads back. A half-finished training run is
simply run again: `rsmoe train` resumes it from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rsmoe.ablation.arms import REFERENCE, Arm, select
from rsmoe.ablation.table import build_table, eval_results, write_table
from rsmoe.config import load_config
from rsmoe.errors import Halted, UserError
from rsmoe.io import model_dir
from rsmoe.io.fs import atomic_write_text

log = logging.getLogger("rsmoe.ablate")

REPO = Path(__file__).resolve().parents[2]
# Launcher settings the ablation sets per run: a value left in the user's shell must not leak into an arm.
LAUNCHER_OWNED = ("CONFIG", "RUN_ROOT", "RUN_DIR", "INIT_FROM", "STAGE2_INIT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


class AblationError(UserError, RuntimeError):
    """A problem the user must fix; the message says what to do."""


@dataclass
class AblationOptions:
    config: str = "demo"
    out: str = "runs/ablate"
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every training run (both stages, every arm)."""
    arms: list[str] | None = None
    """Arm names (rsmoe.ablation.arms); None = all. The reference arm always runs."""
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    """Step counts of the two stages (None: the preset's). The one-stage arm trains their sum."""
    eval_shards: str | None = None
    """Held-out shards every arm is scored on (None: the preset's data.val_shards)."""
    eval_limit: int = 0
    questions_per_image: int = 10
    bootstrap: int = 200
    meteor: bool = True
    launcher: str = "python"
    """'python' (`python -m rsmoe.cli train|eval`, one process) or 'torchrun' (launchers/stage{1,2}.sh with
    GPUS ranks, and `torchrun -m rsmoe.cli eval`)."""
    gpus: int = 1
    device: str | None = None
    """DEVICE for the launchers (auto, cuda, cpu); None = theirs (auto)."""
    python: str = sys.executable
    plan_only: bool = False
    plot: bool = True
    progress: bool = True


@dataclass
class Job:
    name: str
    kind: str  # 'train' or 'eval'
    argv: list[str]
    env: dict[str, str]
    target: Path  # the run directory (train) or the eval folder (eval)
    arm: str | None = None

    def shell(self) -> str:
        """The command as a user would type it (environment assignments first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


# ---------------------------------------------------------------- planning


def _steps(opts: AblationOptions) -> tuple[int, int]:
    """Steps of Stage I and II: the options', else the preset's (after its stage_overrides)."""
    s1 = opts.stage1_steps or load_config(opts.config, opts.overrides + ["stage=1"]).train.steps
    s2 = opts.stage2_steps or load_config(opts.config, opts.overrides + ["stage=2"]).train.steps
    return s1, s2


def _check_options(opts: AblationOptions) -> None:
    if opts.launcher not in ("python", "torchrun"):
        raise AblationError(f"--launcher must be python or torchrun, not '{opts.launcher}'")
    if opts.gpus < 1:
        raise AblationError("--gpus must be >= 1")
    for flag, value in (("--stage1-steps", opts.stage1_steps), ("--stage2-steps", opts.stage2_steps)):
        if value is not None and value < 1:
            raise AblationError(f"{flag} must be >= 1")
    if opts.launcher == "python" and opts.gpus != 1:
        raise AblationError("--gpus needs --launcher torchrun (the python launcher runs one process)")
    for o in opts.overrides:
        key = o.split("=", 1)[0]
        if key in ("stage", "run_dir", "init_from", "stage2_init", "model.router", "model.experts", "model.expert_parts"):
            raise AblationError(f"override '{o}': the ablation sets {key} per arm; leave it out")


def plan(opts: AblationOptions) -> tuple[list[Arm], list[Job]]:
    """Every command of the ablation, in the order they run (Stage I first, then arm by arm)."""
    _check_options(opts)
    try:
        arms = select(opts.arms)
    except KeyError as exc:
        raise AblationError(str(exc.args[0])) from None
    out = Path(opts.out)
    s1_steps, s2_steps = _steps(opts)
    common = list(opts.overrides)
    stage1 = out / "stage1"
    jobs: list[Job] = []
    if any(a.two_stage for a in arms):
        jobs.append(_train_job(opts, "stage1", 1, stage1, None, common + [f"train.steps={s1_steps}"], None))
    for arm in arms:
        run = out / arm.name
        steps = s2_steps if arm.two_stage else s1_steps + s2_steps
        ov = common + list(arm.overrides) + [f"train.steps={steps}"]
        jobs.append(_train_job(opts, f"{arm.name}/train", 2, run, stage1 if arm.two_stage else None, ov, arm.name))
        jobs.append(_eval_job(opts, f"{arm.name}/eval", run, arm.name))
    return arms, jobs


def _train_job(opts: AblationOptions, name: str, stage: int, run: Path, init: Path | None, ov: list[str],
               arm: str | None) -> Job:
    # Validate now (a typo in an override fails before anything trains), with the paths it will get.
    load_config(opts.config, ov + [f"stage={stage}", f"run_dir={run}"] + ([f"init_from={init}"] if init else []))
    if opts.launcher == "python":
        argv = [opts.python, "-m", "rsmoe.cli", "train", "--config", opts.config, "--stage", str(stage), "--run-dir", str(run)]
        if init is not None:
            argv += ["--init-from", str(init)]
        return Job(name, "train", argv + ov, {}, run, arm)
    env = {"CONFIG": opts.config, "RUN_DIR": str(run), "GPUS": str(opts.gpus), "PYTHON": opts.python}
    if opts.device:
        env["DEVICE"] = opts.device
    if stage == 2:
        if init is not None:
            env["INIT_FROM"] = str(init)
        else:
            env["STAGE2_INIT"] = "untrained"
    ov = [o for o in ov if o != "stage2_init=untrained"]  # the launcher adds it from STAGE2_INIT
    return Job(name, "train", ["bash", str(REPO / "launchers" / f"stage{stage}.sh"), *ov], env, run, arm)


def _eval_args(opts: AblationOptions, run: Path) -> list[str]:
    shards = opts.eval_shards or load_config(opts.config, opts.overrides).data.val_shards
    args = ["--model", str(run), "--shards", shards, "--out", str(run / "eval"), "--bootstrap", str(opts.bootstrap),
            "--questions-per-image", str(opts.questions_per_image), "--seed", "0"]
    if opts.eval_limit:
        args += ["--limit", str(opts.eval_limit)]
    if not opts.meteor:
        args.append("--no-meteor")
    return args


def _eval_job(opts: AblationOptions, name: str, run: Path, arm: str) -> Job:
    if opts.launcher == "python":
        argv = [opts.python, "-m", "rsmoe.cli", "eval", *_eval_args(opts, run)]
    else:
        argv = [opts.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(opts.gpus),
                "-m", "rsmoe.cli", "eval", *_eval_args(opts, run)]
    return Job(name, "eval", argv, {}, run / "eval", arm)


# ---------------------------------------------------------------- what is finished


def train_finished(run: Path) -> bool:
    try:
        d = model_dir.find(run)
    except model_dir.IncompleteModelDir:
        return False  # killed while writing final/: the rerun resumes and writes it again
    return d is not None and (d / model_dir.CONFIG).exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        log.warning("%s is unreadable (cut short?); starting it afresh", path)
        return {}


def done(job: Job) -> bool:
    return train_finished(job.target) if job.kind == "train" else eval_results(job.target) is not None


def _record_commands(jobs: list[Job], out: Path) -> None:
    """<arm>/arm.json with the arm's commands; a finished arm trained with other ones is refused."""
    by_dir: dict[Path, list[Job]] = {}
    for j in jobs:
        by_dir.setdefault(j.target if j.kind == "train" else j.target.parent, []).append(j)
    for run, group in by_dir.items():
        record = {j.kind: {"argv": j.argv, "env": j.env} for j in group}
        f = run / "arm.json"
        if f.exists() and train_finished(run):
            old = _read_json(f)
            if old.get("train") != record.get("train"):
                raise AblationError(
                    f"{run} was trained by another command ({_first_difference(old.get('train'), record.get('train'))}); "
                    f"use another --out, or delete {run} to train that arm again"
                )
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(f, json.dumps(record, indent=2) + "\n")


def _first_difference(old: dict | None, new: dict | None) -> str:
    old_argv, new_argv = (old or {}).get("argv", []), (new or {}).get("argv", [])
    gone = [a for a in old_argv if a not in new_argv]
    added = [a for a in new_argv if a not in old_argv]
    if gone or added:
        return f"then {' '.join(gone) or '-'}, now {' '.join(added) or '-'}"
    return f"environment then {(old or {}).get('env')}, now {(new or {}).get('env')}"


# ---------------------------------------------------------------- running


def _children_cpu_seconds() -> float:
    """User + system CPU time of every finished, waited-for child process (and theirs: torchrun's ranks,
    loader workers). Unlike wall time it hardly depends on what else shares the machine."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_child(job: Job, log_file: Path) -> int:
    """Run one command with its output in `log_file`; SIGTERM/SIGINT to this process reach the child
    (it checkpoints and exits) before this process exits."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_OWNED}
    env.update(job.env)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    with open(log_file, "a") as f:
        f.write(f"\n$ {job.shell()}\n")
        f.flush()
        child = subprocess.Popen(job.argv, cwd=os.getcwd(), env=env, stdout=f, stderr=subprocess.STDOUT)

        def forward(sig, _frame):
            child.send_signal(sig)
            raise KeyboardInterrupt

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return child.wait()
        except KeyboardInterrupt:
            try:
                child.wait(timeout=600)  # a training run writes its checkpoint on SIGTERM
            except subprocess.TimeoutExpired:
                child.kill()
            raise Halted(f"interrupted during {job.name} (its log: {log_file}); rerun the same `rsmoe ablate` command "
                         "to resume: finished arms are kept, this one resumes from its last checkpoint") from None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_ablation(opts: AblationOptions) -> dict[str, Any]:
    """Plan, run what is not finished, write the table. Returns {'arms', 'jobs', 'table' (paths), 'timings'}."""
    arms, jobs = plan(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.json", json.dumps([{"name": j.name, "kind": j.kind, "command": j.shell(), "argv": j.argv,
                                                "env": j.env} for j in jobs], indent=2) + "\n")
    if opts.plan_only:
        return {"arms": arms, "jobs": jobs, "table": None, "timings": {}}
    _record_commands(jobs, out)
    timings_file = out / "timings.json"
    timings = _read_json(timings_file)
    bar = tqdm(total=len(jobs), desc="ablation", unit="job", disable=not opts.progress, file=sys.stderr, dynamic_ncols=True)
    for k, job in enumerate(jobs, 1):
        bar.set_postfix_str(job.name)
        if done(job):
            log.info("[%d/%d] %s: finished earlier, kept (%s)", k, len(jobs), job.name, job.target)
            bar.update(1)
            continue
        log_file = out / "logs" / (job.name.replace("/", "-") + ".log")
        log.info("[%d/%d] %s: %s  (log %s)", k, len(jobs), job.name, job.shell(), log_file)
        t0, cpu0 = time.time(), _children_cpu_seconds()
        rc = _run_child(job, log_file)
        seconds, cpu = time.time() - t0, _children_cpu_seconds() - cpu0
        if rc != 0 or not done(job):
            what = f"exited with status {rc}" if rc else "stopped before it finished (preemption signal or train.stop_after_steps?)"
            raise AblationError(
                f"{job.name}: `{job.shell()}` {what}; log {log_file}:\n{_tail(log_file)}\n"
                "Fix the cause and rerun the same `rsmoe ablate` command: finished arms are kept and this one resumes."
            )
        timings[job.name] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(timings_file, json.dumps(timings, indent=2) + "\n")
        log.info("[%d/%d] %s: done in %.0f s", k, len(jobs), job.name, seconds)
        bar.update(1)
    bar.close()
    table = build_table(out, arms, timings, reference=REFERENCE, n_resamples=max(1, opts.bootstrap), config=opts.config)
    paths = write_table(out, table, plot=opts.plot)
    return {"arms": arms, "jobs": jobs, "table": table, "paths": paths, "timings": timings}


# ---------------------------------------------------------------- SLURM


def slurm_commands(jobs: list[Job], opts: AblationOptions) -> list[str]:
    """The ablation as sbatch jobs (slurm/stage{1,2}.sbatch, slurm/eval.sbatch): Stage I, then every arm's
    Stage II after it (in parallel), each arm's evaluation after its training. Run `rsmoe ablate` with
    the same options afterwards to write the table (every job is then finished and kept)."""
    lines = ["# Submit from the rsmoe checkout; GPUS per node as in slurm/*.sbatch. After the last job:",
             f"#   rsmoe ablate --config {opts.config} --out {opts.out} ...same options...   (writes the table)"]
    stage1_var = None
    for job in jobs:
        var = job.name.replace("/", "_").replace("-", "_").upper()
        log_dir = (job.target if job.kind == "train" else job.target.parent) / "logs"
        if job.kind == "train":
            stage = "1" if job.name == "stage1" else "2"
            env = {"CONFIG": opts.config, "RUN_DIR": str(job.target)}
            ov = [a for a in job.argv if "=" in a and not a.startswith("-")]
            if stage == "2":
                init = next((job.argv[i + 1] for i, a in enumerate(job.argv) if a == "--init-from"), job.env.get("INIT_FROM"))
                if init:
                    env["INIT_FROM"] = init
                else:
                    env["STAGE2_INIT"] = "untrained"
                    ov = [o for o in ov if o != "stage2_init=untrained"]
            dep = f"--dependency=afterok:${stage1_var} " if stage == "2" and stage1_var and "INIT_FROM" in env else ""
            envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            lines.append(f"mkdir -p {shlex.quote(str(log_dir))}")
            lines.append(f"{var}=$({envs} sbatch --parsable --export=ALL {dep}--output={shlex.quote(str(log_dir))}/slurm-%j.out "
                         f"slurm/stage{stage}.sbatch {shlex.join(ov)})")
            if stage == "1":
                stage1_var = var
        else:
            train_var = var[: -len("_EVAL")] + "_TRAIN"
            args = job.argv[job.argv.index("eval") + 1:]
            model = args[args.index("--model") + 1]
            shards = args[args.index("--shards") + 1]
            rest = [a for i, a in enumerate(args) if a not in ("--model", "--shards") and
                    (i == 0 or args[i - 1] not in ("--model", "--shards"))]
            lines.append(f"{var}=$(MODEL={shlex.quote(model)} EVAL_SHARDS={shlex.quote(shards)} "
                         f"sbatch --parsable --export=ALL --dependency=afterok:${train_var} "
                         f"--output={shlex.quote(str(log_dir))}/eval-%j.out slurm/eval.sbatch {shlex.join(rest)})")
    return lines
