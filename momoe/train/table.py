"""Plain-text tables for the command line."""
from typing import Any, List, Sequence


def format_number(value: Any, digits: int = 3) -> str:
    """Floats with `digits` decimals (from 10,000 on in exponent form: 1.230e+09), ints with separators."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    cells: List[List[str]] = [list(headers)] + [[format_number(v, digits) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
