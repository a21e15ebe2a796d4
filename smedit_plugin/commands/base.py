"""What every subcommand module shares: the runner and setup types, kept apart from :mod:`smedit_plugin.cli` so
that the commands never import the CLI that names them."""
from __future__ import annotations

import argparse
from typing import Callable

#: Runs a parsed subcommand; returns the process exit code.
Runner = Callable[[argparse.Namespace], int]
#: Adds a subcommand's options to its ``argparse`` sub-parser and returns its runner.
Setup = Callable[[argparse.ArgumentParser], Runner]
