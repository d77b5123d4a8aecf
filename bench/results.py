"""The one writer of benchmark results: markdown tables, the targets table, the saved files.

Every study prints and saves its figures through this module, so their tables look alike
(a header, an alignment row, one line per row) and every target is judged the same way:
``check`` records what was measured against its limit and in which direction "better" lies,
and ``targets_table`` renders the checks as "target | measured | limit | met".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson

Cell = Any


def row(cells: Iterable[Cell]) -> str:
    """One markdown table line (a ``|`` inside a cell is escaped so it cannot split it)."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def table(headers: Sequence[str], rows: Iterable[Iterable[Cell]], align: str = "") -> str:
    """A markdown table. ``align`` has one letter per column, ``l`` (text) or ``r`` (figures);
    missing letters mean ``r`` after the first column, which is ``l``."""
    align = (align or "l").ljust(len(headers), "r")
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align[:len(headers)]) + "|"
    return "\n".join([row(headers), rule, *(row(r) for r in rows)])


def check(target: str, measured: float | None, limit: float,
          higher_is_better: bool = False) -> dict[str, Any]:
    """One target: met when ``measured`` is on the right side of ``limit`` (None: not met)."""
    met = measured is not None and (measured >= limit if higher_is_better else measured <= limit)
    return {"target": target, "measured": measured, "limit": limit, "met": met,
            "higher_is_better": higher_is_better}


def targets_table(checks: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """The checks as "target | measured | limit | met" ("" when there are none)."""
    if not checks:
        return ""
    return table(("target", "measured", "limit", "met"), (
        (c["target"], "-" if c["measured"] is None else f"{c['measured']:.{digits}f}",
         f"{'≥' if c.get('higher_is_better') else '≤'} {c['limit']:g}",
         "yes" if c["met"] else "NO") for c in checks), "lrrl")


def dump_json(path: Path, data: Any) -> None:
    """Indented JSON (numpy numbers included), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def save(out: Path, name: str, data: Any, text: str) -> list[Path]:
    """``<out>/<name>.json`` and ``<name>.md``: the figures, and the page that shows them."""
    written = [out / f"{name}.json", out / f"{name}.md"]
    dump_json(written[0], data)
    written[1].write_text(text)
    return written
