"""The ``redistill`` command: one entry point, one subcommand per stage (distill, evaluate, memory, export, deploy, compare).

Each stage package contributes its subcommands through ``add_commands(subparsers)``
in its own ``cli`` module; heavy libraries are imported only inside handlers so
that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from redistill import __version__
from redistill.errors import UserError, did_you_mean

STAGE_CLIS = ("train.cli", "train.diffusion_cli", "bench.quality_cli", "bench.cli", "train.plan_cli", "export.cli", "deploy.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redistill",
        description="ReDistill Edge: distill a low-peak-memory CNN student, export it for TensorRT, "
        "measure it on a Jetson, and compare theory with measurement.",
    )
    parser.add_argument("--version", action="version", version=f"redistill-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in STAGE_CLIS:
        importlib.import_module(mod).add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub_action.choices)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        print(f"redistill: error: unknown command {argv[0]!r}." + did_you_mean(argv[0], commands), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"redistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # the command's own account when it gives one; --resume only where the command has it
        said = str(e) or ("interrupted; checkpoints written so far are intact (use --resume)" if hasattr(args, "resume")
                          else "interrupted")
        print(f"redistill {args.command}: {said}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
