"""Benchmarks compare the tree with an earlier implementation in the same run; the tree keeps no copy
of it: `module_at(rev, path)` loads `path` as it was at commit `rev` (from git) as a module of its own."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def module_at(rev: str, path: str, what: str = "benchmark") -> ModuleType:
    """`path` (e.g. rsmoe/data/loader.py) at `rev`, importable by name (DataLoader workers look classes up
    by module name, so it is registered in sys.modules and written to a file)."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"{what}: cannot read {path} at {rev} from git ({e}); run from a git checkout that has this commit, "
                 "or pass another revision")
    name = f"{Path(path).stem}_{rev}"
    file = Path(tempfile.mkdtemp(prefix="rsmoe-baseline-")) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
