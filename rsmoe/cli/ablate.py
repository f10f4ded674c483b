"""Train and evaluate the paper's ablation arms on the same data and seed, and write one table.

    rsmoe ablate --config demo --out runs/ablate                     # all arms, on this machine
    rsmoe ablate --config demo --out runs/ablate --arms router-none,router-learned
    rsmoe ablate --config demo --out runs/quick --stage1-steps 20 --stage2-steps 10   # a short timing run
    rsmoe ablate --config rsmoe-1b --out /scratch/abl --launcher torchrun --gpus 4 data.train_shards=...
    rsmoe ablate --config demo --out runs/ablate --plan              # print the commands
    rsmoe ablate --config rsmoe-1b --out /scratch/abl --plan sbatch > submit.sh   # the arms as SLURM jobs

Arms (docs/ablation.md): full (two-stage, template router, 3 experts: the reference), one-stage,
router-none, router-learned, experts-1, experts-2. Every two-stage arm starts from one shared Stage I
run. Each arm runs `rsmoe train` / `rsmoe eval` (or launchers/stage{1,2}.sh with --launcher torchrun)
in a subprocess, with the options a user would type. Rerunning the same command resumes: finished
arms (final/ complete and eval/results.json written) are kept, a half-trained one resumes from its
last checkpoint. Writes <out>/ablation.md, ablation.json and ablation.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import sys

from rsmoe.ablation import ARMS, AblationOptions, run_ablation, slurm_commands
from rsmoe.ablation.table import to_markdown
from rsmoe.errors import UserError

INTERMIXED_ARGS = True  # dotted overrides may sit between options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="preset name (tiny, demo, rsmoe-1b, rsmoe-7b) or a YAML path")
    p.add_argument("--out", default="runs/ablate", help="ablation folder: one run directory per arm, the table, logs")
    p.add_argument("--arms", default=None, help=f"comma-separated arms (default all: {', '.join(a.name for a in ARMS)}); "
                   "the reference 'full' always runs")
    p.add_argument("--stage1-steps", type=int, default=None, help="Stage I steps (default: the preset's)")
    p.add_argument("--stage2-steps", type=int, default=None, help="Stage II steps (default: the preset's); one-stage trains both")
    p.add_argument("--eval-shards", default=None, help="held-out shards every arm is scored on (default: the preset's data.val_shards)")
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N samples (0 = all)")
    p.add_argument("--questions-per-image", type=int, default=10, help="VQA questions scored per image (0 = all; default 10)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a JVM start per arm)")
    p.add_argument("--launcher", default="python", choices=["python", "torchrun"],
                   help="python: `python -m rsmoe.cli train|eval` (one process); torchrun: launchers/stage{1,2}.sh with --gpus ranks")
    p.add_argument("--gpus", type=int, default=1, help="ranks per run with --launcher torchrun (GPUs, or CPU processes with --device cpu)")
    p.add_argument("--device", default=None, choices=["auto", "cuda", "cpu"], help="DEVICE for the launchers (default auto)")
    p.add_argument("--plan", nargs="?", const="local", choices=["local", "sbatch"], default=None,
                   help="print the commands and exit: 'local' (default) as they run here, 'sbatch' as a script of SLURM jobs")
    p.add_argument("--no-plot", action="store_true", help="do not draw ablation.png")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every training run, e.g. data.train_shards=... optim.lr=2e-4")


def options_from_cli(ns: argparse.Namespace) -> AblationOptions:
    return AblationOptions(
        config=ns.config, out=ns.out, overrides=list(ns.overrides),
        arms=[a.strip() for a in ns.arms.split(",") if a.strip()] if ns.arms else None,
        stage1_steps=ns.stage1_steps, stage2_steps=ns.stage2_steps, eval_shards=ns.eval_shards, eval_limit=ns.eval_limit,
        questions_per_image=ns.questions_per_image, bootstrap=ns.bootstrap, meteor=not ns.no_meteor,
        launcher=ns.launcher, gpus=ns.gpus, device=ns.device, plan_only=ns.plan is not None, plot=not ns.no_plot,
    )


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    opts = options_from_cli(ns)
    if opts.eval_limit < 0 or opts.questions_per_image < 0 or opts.bootstrap < 0:
        raise UserError("--eval-limit, --questions-per-image and --bootstrap must be >= 0")
    result = run_ablation(opts)
    if ns.plan == "local":
        print("# the ablation, command by command (rsmoe ablate skips each one whose output is complete):")
        for job in result["jobs"]:
            print(job.shell())
        return 0
    if ns.plan == "sbatch":
        print("#!/bin/bash\n# The ablation as SLURM jobs: Stage I, then every two-stage arm's Stage II (in parallel), each")
        print("# evaluation after its training. Add resources (--nodes, --gpus-per-node, --partition) as for any rsmoe job.")
        print("set -euo pipefail")
        print("\n".join(slurm_commands(result["jobs"], opts)))
        return 0
    print(to_markdown(result["table"]))
    paths = result["paths"]
    print(f"table: {paths['md']} (also {paths['json']}" + (f", {paths['png']})" if paths.get("png") else ")"))
    return 0
