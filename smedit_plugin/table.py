"""The one fixed-width table layout of the CLI: label columns left-aligned, the others (numbers) right-aligned."""
from __future__ import annotations

from typing import Sequence


def format_table(head: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> str:
    """``head`` over a rule of dashes over ``lines`` (cells already formatted as text), two spaces between columns.

    The first ``left`` columns are text and left-aligned.
    """
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def row(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([row(head), row(["-" * w for w in widths])] + [row(line) for line in lines])
