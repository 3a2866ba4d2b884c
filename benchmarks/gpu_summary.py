"""One cell of gpu_check.sh's table from a step's output: the benchmark's settings line, its table (column
names once, then one line per row, ratio rows included), its compile and pixel-difference lines, or pytest's
summary line; for a failed or timed-out step, that and the output's last line.

    python benchmarks/gpu_summary.py STEP_OUTPUT RC LIMIT_S
"""

import sys
from pathlib import Path

NOTES = ("compile", "largest pixel difference")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def summary(text: str, rc: int, limit_s: int) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    table = [line for line in lines if line.startswith("|") and not line.startswith("|---")]
    parts = []
    if rc in (124, 137):
        parts.append(f"**timed out after {limit_s} s**")
    elif rc:
        parts.append(f"**failed (exit {rc})**: {lines[-1] if lines else 'no output'}")
    parts += [line.lstrip("# ") for line in lines if line.startswith("# ")]  # a benchmark's settings line
    if table:
        head = cells(table[0])
        parts.append(f"{head[0]}: " + " / ".join(head[1:]))
        parts += [f"{row[0]}: " + " / ".join(c for c in row[1:] if c) for row in map(cells, table[1:])]
    parts += [line for line in lines if line.startswith(NOTES)]
    pytest = [line for line in lines if any(w in line for w in (" passed", " skipped", " failed", " error"))]
    if not table and pytest:
        parts.append(pytest[-1].strip("= "))
    if not parts:
        parts.append(lines[-1] if lines else "no output")
    return "<br>".join(parts).replace("|", "\\|").replace("`", "'")


def main(argv: list[str]) -> int:
    path, rc, limit_s = Path(argv[0]), int(argv[1]), int(argv[2])
    print(summary(path.read_text(errors="replace"), rc, limit_s))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
