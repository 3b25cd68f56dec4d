"""Plain-text tables for the console and the README (aligned columns, or Markdown).

    print(report.table(["metric", "SFT", "DPO"], rows))
    print(report.table(header, rows, markdown=True))
"""

from __future__ import annotations

from typing import Any, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to `digits` decimals, everything else as str; None becomes "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False,
          digits: int = 3) -> str:
    """An aligned text table (first column left-aligned, the rest right-aligned), or Markdown."""
    cells = [[str(h) for h in header]] + [[fmt(v, digits) for v in row] for row in rows]
    if any(len(r) != len(header) for r in cells):
        raise ValueError(f"every row needs {len(header)} cells")
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        lines = ["| " + " | ".join(cells[0]) + " |", rule]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def mean_and_spread(values: Sequence[float], digits: int = 3) -> str:
    """"mean ± sd" over seeds (sd with ddof=1; just the value for one seed)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
