"""The `rsmoe` command. Each subcommand lives in its own module with `add_arguments` and `main`/`run`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "train": ("rsmoe.train", "train Stage I or Stage II (also: deepspeed train.py ...)"),
    "prepare": ("rsmoe.data.sample", "build webdataset shards from the bundled real sample data"),
    "convert": ("rsmoe.data.convert", "convert a public RS dataset (RSICap, UCM, RSVQA, ...) to shards"),
    "eval": ("rsmoe.eval.run", "score captioning and VQA on shards; writes results.json and a report"),
    "caption": ("rsmoe.serve", "caption images with a trained model (no launcher needed)"),
    "ask": ("rsmoe.serve_ask", "answer a question about an image with a trained model"),
    "serve": ("rsmoe.serving.cli", "serve a trained model over HTTP: API + web page"),
    "export": ("rsmoe.export", "export a run to safetensors, peft adapters, merged HF models"),
    "assets": ("rsmoe.assets", "list or prepare the offline demo weights"),
    "bench": ("rsmoe.bench", "run a benchmark from bench/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsmoe", description="RS-MoE: remote-sensing captioning and VQA with LLM experts.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command '{name}' (choose from {', '.join(COMMANDS)})")
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"rsmoe {name}: not available in this version ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    p = argparse.ArgumentParser(prog=f"rsmoe {name}", description=(module.__doc__ or help_text),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    # Commands that take dotted overrides let them mix with options (`--stage 2 optim.lr=1e-4 --run-dir x`).
    ns = p.parse_intermixed_args(argv[1:]) if getattr(module, "INTERMIXED_ARGS", False) else p.parse_args(argv[1:])
    runner = getattr(module, "run", None) or module.main
    rc = runner(ns)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
