"""Train Stage I or Stage II: `rsmoe train ...`, or `deepspeed train.py --deepspeed ds_configs/zero3.json ...`.

    rsmoe train --config demo --stage 1 --run-dir runs/demo/stage1
    rsmoe train --config demo --stage 2 --run-dir runs/demo/stage2 --init-from runs/demo/stage1
    rsmoe train --config demo --stage 1 optim.lr=2e-4 train.steps=50    # dotted overrides of the preset

Relaunching the same command resumes from <run-dir>/checkpoints/latest.
"""

from __future__ import annotations

import argparse

from rsmoe.config import TrainArgs, load_config
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.training.loop import train

INTERMIXED_ARGS = True  # dotted overrides may sit between options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="preset name (tiny, demo, rsmoe-1b, rsmoe-7b) or a YAML path")
    p.add_argument("--stage", type=int, choices=[1, 2], help="1 = dense Stage I, 2 = MoE Stage II (overrides the preset)")
    p.add_argument("--run-dir", help="output directory of this stage (config, logs, tensorboard, checkpoints, final)")
    p.add_argument("--init-from", help="Stage II: the Stage I run directory (or its final/ directory)")
    p.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", help="ZeRO JSON, e.g. ds_configs/zero3.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.steps=50")


def args_from_cli(ns: argparse.Namespace) -> TrainArgs:
    dotted = list(ns.overrides)
    for flag, key in (("stage", "stage"), ("run_dir", "run_dir"), ("init_from", "init_from"), ("deepspeed", "deepspeed_config")):
        value = getattr(ns, flag)
        if value is not None:
            dotted.append(f"{key}={value}")
    return load_config(ns.config, dotted)


def run(ns: argparse.Namespace) -> int:
    try:
        train(args_from_cli(ns))
    except BaseException:
        shutdown_distributed(barrier=False)  # the other ranks may never reach a barrier: do not wait for them
        raise
    shutdown_distributed()
    return 0
