"""One Markdown report of every benchmark: ``reports/REPORT.md`` with tables and PNG plots.

    python -m benchmarks.report --out reports/ [--full] [--only codec,sparse] [--from-json DIR]

Runs the benchmarks through ``benchmarks.run`` (each in its own process, quick settings unless ``--full``)
into ``<out>/bench/``, or, with ``--from-json DIR``, only reads the JSON a previous run left there. Then,
for each benchmark: its status, command and wall time; a table of its figures (every number of its JSON,
flattened to dotted keys; lists of samples shown by their median); and a plot made by the benchmark's own
``plot(result, path)`` from its JSON (size/quality curve, TTFT vs bandwidth, sparse-recall fidelity,
scaling), or a PNG the benchmark wrote itself. A benchmark that could not run (missing module, no root
for network shaping, no Redis) is listed with the reason from its run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.run import BENCHMARKS, select_benchmarks

MAX_ROWS = 60  # per benchmark table; the JSON next to the report has everything
_SKIP_KEYS = {"samples", "argv", "command", "env", "host", "platform"}


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, rendered value)`` of every number / short string / bool leaf of a JSON value.

    Lists of numbers become their median (with ``n``); lists of objects are indexed ``key[i]``.
    """
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            if k in _SKIP_KEYS:
                continue
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list):
        nums = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        if value and len(nums) == len(value):
            if len(nums) == 1:
                return [(prefix, _fmt(nums[0]))]
            return [(f"{prefix} (median of {len(nums)})", _fmt(statistics.median(nums)))]
        out = []
        for i, v in enumerate(value):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    if isinstance(value, bool) or value is None:
        return [(prefix, str(value))]
    if isinstance(value, int | float):
        return [(prefix, _fmt(value))]
    if isinstance(value, str) and len(value) <= 80:
        return [(prefix, value.replace("|", "\\|"))]
    return []


def _fmt(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def _table(rows: list[tuple[str, str]]) -> str:
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"| … | {len(rows) - MAX_ROWS} more in the JSON |")
    return "\n".join(lines)


def plot_from_json(module: str, result: dict[str, Any], png: Path) -> str:
    """Draw ``png`` with ``module.plot(result, path)``; returns "" or why no plot was made."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return f"cannot import {module}: {e}"
    fn = getattr(mod, "plot", None)
    if fn is None:
        return f"{module} has no plot()"
    try:
        fn(result, str(png))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a result without the plotted series
        return f"{module}.plot failed on this result: {type(e).__name__}: {e}"
    return ""


def render(bench_dir: Path, out: Path, names: list[str], mode: str) -> str:
    """The Markdown of the report for the results in ``bench_dir``; plots are written under ``out``."""
    summary_path = bench_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    parts = [
        "# kvstream benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m benchmarks.report` ({mode}); raw "
        f"results in `{bench_dir.relative_to(out) if bench_dir.is_relative_to(out) else bench_dir}/`.",
        "",
        "| benchmark | status | seconds | command |",
        "|---|---|---|---|",
    ]
    for name in names:
        e = summary.get(name, {})
        parts.append(
            f"| {name} | {e.get('status', 'not run')} | {e.get('seconds', '-')} | `{e.get('command', '-')}` |"
        )
    for name in names:
        module = BENCHMARKS[name][0]
        path = bench_dir / f"{name}.json"
        parts += ["", f"## {name} (`{module}`)", ""]
        if not path.exists():
            status = summary.get(name, {}).get("status", "not run")
            parts.append(f"No result ({status}).")
            continue
        result = json.loads(path.read_text())
        if isinstance(result, dict) and result.get("skipped"):
            parts.append(f"Skipped by the benchmark: {result['skipped']}")
            continue
        png = out / f"{name}.png"
        why = plot_from_json(module, result, png)
        if not why:
            parts += [f"![{name}]({png.name})", ""]
        else:
            made = sorted(bench_dir.glob(f"{name}*.png"))  # a PNG the benchmark wrote itself
            parts += [f"![{name}]({p.relative_to(out)})" for p in made if p.is_relative_to(out)]
            parts += ["", f"_No plot from the JSON: {why}._", ""]
        parts.append(_table(flatten(result)))
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports", help="directory for REPORT.md, plots and bench/ results")
    ap.add_argument("--full", action="store_true", help="full benchmark settings (default: quick)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    ap.add_argument("--from-json", help="render the results already in this directory, run nothing")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        names = select_benchmarks(args.only)
    except ValueError as e:
        print(f"benchmarks.report: error: {e}", file=sys.stderr)
        return 2
    if args.from_json:
        bench_dir, mode = Path(args.from_json), "rendered from earlier results"
        if not bench_dir.is_dir():
            print(f"benchmarks.report: error: no directory {bench_dir}", file=sys.stderr)
            return 2
    else:
        bench_dir, mode = out / "bench", "full settings" if args.full else "quick settings"
        cmd = [sys.executable, "-m", "benchmarks.run", "--out", str(bench_dir), "--only", ",".join(names)]
        cmd += ["--timeout", str(args.timeout)] + ([] if args.full else ["--quick"])
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)  # failures are recorded per benchmark
    report = out / "REPORT.md"
    report.write_text(render(bench_dir, out, names, mode))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
