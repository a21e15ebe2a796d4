"""``smedit hparams``: list the shipped YAML hparams, or export them in EasyEdit's ``hparams/`` layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from .base import Runner


def setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="write every shipped YAML into DIR as METHOD/model.yaml and TRAINING/METHOD/model.yaml")

    def run(args: argparse.Namespace) -> int:
        from ..fileio import check_output_targets
        from ..shipped import export_hparams, hparams_root, shipped_names

        check_output_targets(folders={"--export": args.export})
        if args.export is None:
            print(f"shipped hparams ({hparams_root()}); load one with smedit_plugin.load_hparams('METHOD/model'):")
            print("\n".join(f"  {name}" for name in shipped_names()))
            return 0
        written = export_hparams(args.export)
        print(f"wrote {len(written)} YAML files under {args.export}")
        return 0

    return run
