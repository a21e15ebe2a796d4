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
import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .methods import METHODS, method_names

Runner = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], Runner]


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    """A subcommand: one-line help and the ``"module:function"`` of its setup function."""

    help: str
    setup: str

    def load(self) -> Setup:
        module, attr = self.setup.split(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS: dict[str, CommandSpec] = {
    "info": CommandSpec("versions, devices, EasyEdit era and registered methods", "smedit_plugin.cli:setup_info"),
    "base-eval": CommandSpec("metrics of the unedited model on ZsRE or CounterFact records",
                             "smedit_plugin.cli:setup_base_eval"),
    "train": CommandSpec(f"train a hypernetwork method ({', '.join(method_names(needs_archive=True))}) into an archive",
                         "smedit_plugin.commands:setup_train"),
    "demo": CommandSpec("edit unseen ZsRE facts into the real SmolLM2-135M and show its answers change",
                        "smedit_plugin.demo:setup_demo"),
    "compare": CommandSpec("train and evaluate several methods on the same model, records and protocol",
                           "smedit_plugin.commands:setup_compare"),
    "hparams": CommandSpec("list the shipped YAML hparams, or export them in EasyEdit's hparams/ layout",
                           "smedit_plugin.cli:setup_hparams"),
    "bench": CommandSpec("speed and peak memory of one large batch edit per hypernetwork method",
                         "smedit_plugin.bench:setup_bench"),
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
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"smedit {args.command}: error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# smedit info
# --------------------------------------------------------------------------------------------

def _devices() -> str:
    import torch

    parts = ["cpu"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append(f"cuda x{len(names)} ({', '.join(names)})")
    else:
        parts.append("cuda not available")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        parts.append("mps")
    return ", ".join(parts)


def _easyedit_status() -> str:
    """Whether EasyEdit imports here and, if it does, its era (A = PyPI wheel, C = current GitHub)."""
    if importlib.util.find_spec("easyeditor") is None:
        return "not installed"
    from . import easyedit

    easyedit.install_transformers_shim()
    try:
        easyedit.import_easyeditor(tolerate_missing_vision=True)
    except ImportError as exc:
        return f"installed but fails to import: {exc}"
    return f"installed, era {easyedit.detect_era()}"


def info_lines() -> list[str]:
    """What ``smedit info`` prints, one ``label: value`` per line."""
    import torch
    import transformers

    from ._version import __version__
    from .fileio import cache_dir
    from .gguf_convert import PRETRAINED, converted_model_dir

    converted = [name for name in PRETRAINED if (converted_model_dir(name) / "config.json").is_file()]
    return [
        f"smedit-plugin: {__version__}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"torch: {torch.__version__}",
        f"transformers: {transformers.__version__}",
        f"devices: {_devices()}",
        f"easyeditor: {_easyedit_status()}",
        f"methods: {', '.join(METHODS)}",
        f"cache: {cache_dir()} (converted models: {', '.join(converted) or 'none'})",
    ]


def setup_info(parser: argparse.ArgumentParser) -> Runner:
    def run(args: argparse.Namespace) -> int:
        print("\n".join(info_lines()))
        return 0

    return run


# --------------------------------------------------------------------------------------------
# smedit hparams
# --------------------------------------------------------------------------------------------

def setup_hparams(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="write every shipped YAML into DIR as METHOD/model.yaml and TRAINING/METHOD/model.yaml")

    def run(args: argparse.Namespace) -> int:
        from .shipped import export_hparams, hparams_root, shipped_names

        if args.export is None:
            print(f"shipped hparams ({hparams_root()}); load one with smedit_plugin.load_hparams('METHOD/model'):")
            print("\n".join(f"  {name}" for name in shipped_names()))
            return 0
        written = export_hparams(args.export)
        print(f"wrote {len(written)} YAML files under {args.export}")
        return 0

    return run


# --------------------------------------------------------------------------------------------
# smedit base-eval
# --------------------------------------------------------------------------------------------

def format_metrics_table(metrics: dict, title: str) -> str:
    """A small fixed-width table of efficacy / generalization / specificity / portability in percent."""
    from .evaluation import METRICS
    from .table import format_table

    return title + "\n" + format_table(["metric", "value"], [
        [name, "n/a" if metrics[name] is None else f"{100 * metrics[name]:.1f} %"] for name in METRICS])


def setup_base_eval(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, gemma-3-270m, or a Hugging Face path/id (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="ZsRE or CounterFact JSON file (default: the packaged 64-record ZsRE eval sample)")
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default=None,
                        help="file schema; detected from the first record when omitted")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics and per-record scores to this JSON file")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if present, else CPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return run_base_eval


def run_base_eval(args: argparse.Namespace) -> int:
    from ._version import __version__
    from .records import detect_dataset, load_records, sample_path
    from .evaluation import evaluate_records
    from .fileio import write_json_atomic
    from .models import load_model_and_tokenizer

    data = Path(args.data) if args.data else sample_path("zsre_sample_eval")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    dataset = args.dataset or detect_dataset(data)
    records = load_records(data, dataset, limit=args.limit)
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_records(model, tok, records, dataset=dataset, batch_size=args.batch_size,
                               progress=not args.no_progress)
    eval_seconds = time.perf_counter() - start
    print(format_metrics_table(metrics, f"{args.model} (unedited) on {len(records)} {dataset} records from {data}"))
    if args.out is not None:
        import torch
        import transformers

        write_json_atomic(args.out, {
            "command": "base-eval",
            "model": args.model,
            "data": str(data),
            "dataset": dataset,
            "limit": args.limit,
            "load_seconds": round(load_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "versions": {"smedit_plugin": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            **metrics,
        })
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
