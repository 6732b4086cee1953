"""The `arrcoc-sam` console command. Each subcommand lives in its own module and exposes `main(argv) -> int`."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("arrcoc_sam.relevance.training", "Train a relevance model (same flags as scripts/train_relevance.py)."),
    "quickstart": ("arrcoc_sam.relevance.quickstart", "AdamW vs SAM on the embedded scene data; writes a report."),
    "evaluate-robustness": ("arrcoc_sam.relevance.robustness_cli", "Perturbation-robustness report for checkpoints."),
    "allocate": ("arrcoc_sam.relevance.allocation_cli", "Precision-aware token allocation for a dataset."),
}


def _usage() -> str:
    lines = ["usage: arrcoc-sam COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<22}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `arrcoc-sam COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``arrcoc-sam COMMAND ARGS``; offline unless the caller set the hub variables otherwise. Returns the
    command's exit status; 2, with the usage on stderr, for a missing or unknown command."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # before any HF import
        os.environ.setdefault(name, "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a missing command is a usage error, as for any other command line
        print(f"{_usage()}\n\narrcoc-sam: error: give a COMMAND", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"arrcoc-sam: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    program = sys.argv[0]
    sys.argv[0] = f"arrcoc-sam {name}"  # parsers that take their name from argv[0] show the subcommand in usage
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    raise SystemExit(main())
