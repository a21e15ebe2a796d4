"""The ``smedit`` command line.

Subcommands live in :data:`COMMANDS` as ``"module:function"`` strings; only the chosen one is
imported, so ``smedit info`` does not pay for training code. A setup function receives its
``argparse`` sub-parser, adds its options and returns the runner ``(args) -> exit code``. To add
a subcommand, add one line to :data:`COMMANDS` (or call :func:`register_command`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Optional, Sequence

from .commands.base import Runner, Setup
from .errors import FolderInUseError
from .methods import METHODS


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    """A subcommand: one-line help and the ``"module:function"`` of its setup function."""

    help: str
    setup: str

    def load(self) -> Setup:
        module, attr = self.setup.split(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS: dict[str, CommandSpec] = {
    "info": CommandSpec("versions, devices, EasyEdit era and registered methods", "smedit_plugin.commands.info:setup"),
    "base-eval": CommandSpec("metrics of the unedited model on ZsRE or CounterFact records",
                             "smedit_plugin.commands.base_eval:setup"),
    "train": CommandSpec("train a hypernetwork method into an archive", "smedit_plugin.commands.train:setup"),
    "demo": CommandSpec("edit unseen ZsRE facts into the real SmolLM2-135M and show its answers change",
                        "smedit_plugin.commands.demo:setup"),
    "compare": CommandSpec("train and evaluate several methods on the same model, records and protocol",
                           "smedit_plugin.commands.compare:setup"),
    "sweep": CommandSpec("a grid of methods x edit counts x seeds, each cell in its own process, resumable",
                         "smedit_plugin.commands.sweep:setup"),
    "hparams": CommandSpec("list the shipped YAML hparams, or export them in EasyEdit's hparams/ layout",
                           "smedit_plugin.commands.hparams:setup"),
    "bench": CommandSpec("speed and peak memory of one large batch edit per hypernetwork method",
                         "smedit_plugin.commands.bench:setup"),
}


def register_command(name: str, help: str, setup: str, *, replace: bool = False) -> None:
    """Add a subcommand; refuses to replace an existing one unless ``replace=True``."""
    if ":" not in setup:
        raise ValueError(f"setup must be 'module:function', got {setup!r}")
    if name in COMMANDS and not replace:
        raise ValueError(f"subcommand {name!r} already exists; pass replace=True to override it")
    COMMANDS[name] = CommandSpec(help, setup)


def _chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named on the command line (its first non-option token)."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, Runner]]:
    """The top-level parser; only the subcommand named in ``argv`` gets its full options."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="smedit", description=f"{', '.join(METHODS)} for EasyEdit")
    parser.add_argument("--version", action="version", version=f"smedit-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(argv)
    runners: dict[str, Runner] = {}
    for name, spec in COMMANDS.items():
        command_parser = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == chosen:
            runners[name] = spec.load()(command_parser)
    return parser, runners


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``smedit`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, runners = build_parser(args_list)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return runners[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, FolderInUseError) as exc:
        print(f"smedit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
