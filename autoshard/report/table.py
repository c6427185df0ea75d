"""Plain-text tables and human units shared by every report (graph, plan, communication)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = ["format_count", "format_table"]

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BINARY = ((2**50, "Pi"), (2**40, "Ti"), (2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki"))


def format_count(value: float, unit: str = "") -> str:
    """`1.23 G` style: SI prefixes for counts, binary prefixes for bytes (unit "B")."""
    scale = _BINARY if unit == "B" else _PREFIXES
    for factor, prefix in scale:
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g} {unit}".rstrip()
    return f"{int(value)} {unit}".rstrip()


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None
) -> str:
    """Render rows as an aligned text table (rich, no colour, never wrapped)."""
    table = Table(*header, title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    buf = io.StringIO()
    Console(file=buf, width=10_000, color_system=None, force_terminal=False).print(table, crop=False)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
