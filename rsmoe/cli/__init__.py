"""The `rsmoe` command: one thin module per subcommand, and the one place user errors become exit codes.

Every command module has a docstring (its --help description), `add_arguments(parser)` and
`run(namespace) -> int`; commands that take dotted overrides set `INTERMIXED_ARGS = True`.
`main` turns a `rsmoe.errors.UserError` (or a missing file) into one line on stderr and exit code 2,
and a `Halted` run into one line and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import sys

from rsmoe.errors import Halted, UserError, one_line

# name -> (module, one-line help). Modules are imported only when their command runs (fast --help).
COMMANDS = {
    "train": ("rsmoe.cli.train", "train Stage I or Stage II (also: deepspeed train.py ...)"),
    "prepare": ("rsmoe.cli.prepare", "build webdataset shards from the bundled real sample data"),
    "convert": ("rsmoe.cli.convert", "convert a public RS dataset (RSICap, UCM, RSVQA, ...) to shards"),
    "eval": ("rsmoe.cli.eval", "score captioning and VQA on shards; writes results.json and a report"),
    "caption": ("rsmoe.cli.caption", "caption images with a trained model (no launcher needed)"),
    "ask": ("rsmoe.cli.ask", "answer a question about an image with a trained model"),
    "serve": ("rsmoe.cli.serve", "serve a trained model over HTTP: API + web page"),
    "export": ("rsmoe.cli.export", "export a run to safetensors, peft adapters, merged HF models"),
    "ablate": ("rsmoe.cli.ablate", "train and evaluate the paper's ablation arms; one table with intervals"),
    "assets": ("rsmoe.cli.assets", "list or prepare the offline demo weights"),
    "check-layout": ("rsmoe.cli.check_layout", "check a parallel layout on this machine (tiny preset): PASS/FAIL"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsmoe", description="RS-MoE: remote-sensing captioning and VQA with LLM experts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.set_defaults(_module=module)
    return parser


def command_parser(name: str, module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"rsmoe {name}", description=(module.__doc__ or COMMANDS[name][1]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()  # else the error line is glued to the end of a half-drawn bar


def report(name: str, exc: BaseException) -> int:
    """The one user-error policy: one line on stderr (once per job when every rank has the same
    error), exit 2 for something to fix, 1 for a run that stopped itself."""
    _close_progress_bars()
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank == 0 or not getattr(exc, "same_on_every_rank", False):
        where = f"[rank {rank}] " if rank else ""
        print(f"rsmoe {name}: error: {where}{one_line(exc)}", file=sys.stderr)
    return 1 if isinstance(exc, Halted) else 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command '{name}' (choose from {', '.join(COMMANDS)})")
    module = importlib.import_module(COMMANDS[name][0])
    p = command_parser(name, module)
    # Commands that take dotted overrides let them mix with options (`--stage 2 optim.lr=1e-4 --run-dir x`).
    ns = p.parse_intermixed_args(argv[1:]) if getattr(module, "INTERMIXED_ARGS", False) else p.parse_args(argv[1:])
    try:
        return int(module.run(ns) or 0)
    except (UserError, Halted, FileNotFoundError, NotADirectoryError) as exc:
        end_helper_processes()
        return report(name, exc)
    except BaseException:
        end_helper_processes()
        raise


def end_helper_processes() -> None:
    """A failing command ends its helper processes (DataLoader workers) at once. The workers ignore
    SIGTERM, so that a preemption signal sent to the whole job cannot kill them while the trainer
    writes its checkpoint; but then the interpreter's exit (which terminates daemonic children with
    SIGTERM and joins them) would wait for them forever, and a crashed job would hold its nodes."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
