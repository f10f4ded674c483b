"""`rsmoe check-layout` (the command docs/cluster.md gives for a 2-GPU node) on two CPU ranks: PASS."""

from __future__ import annotations

import sys

from tests.helpers import run


def test_check_layout_passes_on_two_cpu_ranks(tmp_path):
    proc = run([sys.executable, "-m", "rsmoe.cli", "check-layout", "--gpus", "2", "--ep", "2", "--cpu", "--steps", "4",
                "--work", str(tmp_path / "work")], timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS")
    assert "per-expert losses: max relative difference" in proc.stdout


def test_check_layout_refuses_a_layout_that_cannot_be(tmp_path):
    proc = run([sys.executable, "-m", "rsmoe.cli", "check-layout", "--gpus", "3", "--ep", "2", "--cpu"], timeout=120)
    assert proc.returncode == 2 and "must divide the 2 experts of the check and --gpus 3" in proc.stderr
