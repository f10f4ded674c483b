"""The paper's ablation in one command (`rsmoe ablate`): arms (arms.py), running them through the same
commands as a normal run, resumably (runner.py), and the table with paired intervals (table.py, plot.py).
docs/ablation.md has the arms, the timing and how to run the arms as SLURM jobs."""

from rsmoe.ablation.arms import ARMS, REFERENCE, Arm, select
from rsmoe.ablation.runner import (
           AblationError,
           AblationOptions,
           plan,
           run_ablation,
           slurm_commands,
)

__all__ = ["ARMS", "REFERENCE", "AblationError", "AblationOptions", "Arm", "plan", "run_ablation", "select",
           "slurm_commands"]
