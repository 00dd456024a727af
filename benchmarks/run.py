"""``make bench``: run every CPU benchmark, each in its own process, and collect their JSON.

Each benchmark runs its baselines side by side in the same process and reports medians and ratios; this
runner only sequences them, bounds their time and writes ``<out>/<name>.json`` plus ``<out>/summary.json``
(status, wall time and the command of each). A benchmark whose module is missing or that fails is
recorded as such; the runner's exit code is non-zero if any failed.

    python -m benchmarks.run --out reports/bench [--only codec,grpc] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> (module, full args, quick args); "{json}" is replaced by the output path.
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "codec": (
        "benchmarks.codec_bench",
        ["--json", "{json}", "--contexts", "8", "--repeats", "5", "--plot", "{out}/codec_size_quality.png"],
        ["--json", "{json}", "--contexts", "2", "--repeats", "2"],
    ),
    "backend": ("benchmarks.backend_bench", ["--json", "{json}"], ["--json", "{json}", "--repeats", "2"]),
    "grpc": ("benchmarks.grpc_bench", ["--json", "{json}"], ["--json", "{json}", "--reps", "2"]),
    "ttft": (
        "benchmarks.ttft_bench",
        ["--json", "{json}", "--plot", "{out}/ttft_vs_bandwidth.png"],
        ["--json", "{json}", "--tokens", "2048", "--repeats", "1", "--trace-runs", "4"],
    ),
    "sparse": ("benchmarks.sparse_bench", ["--json", "{json}"], ["--json", "{json}", "--tokens", "8192"]),
    "sparse_fidelity": (
        "client.sparse.eval",
        ["--json", "{json}", "--plot", "{out}/sparse_fidelity.png"],
        ["--json", "{json}"],
    ),
    "scaling": (
        "benchmarks.scaling_bench",
        ["--json", "{json}", "--plot", "{out}/scaling.png"],
        ["--json", "{json}", "--seconds", "5", "--reps", "1"],
    ),
}


def select_benchmarks(only: str) -> list[str]:
    """Names from a comma-separated ``--only`` value (all when empty); ``ValueError`` for unknown ones."""
    names = [n for n in only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s): {', '.join(unknown)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/bench", help="directory for the JSON and PNG files")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="smaller settings (smoke runs)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        names = select_benchmarks(args.only)
    except ValueError as e:
        print(f"benchmarks.run: error: {e}", file=sys.stderr)
        return 2
    summary: dict[str, dict[str, object]] = {}
    for name in names:
        module, full, quick = BENCHMARKS[name]
        path = out / f"{name}.json"
        cmd = [sys.executable, "-m", module] + [
            a.replace("{json}", str(path)).replace("{out}", str(out)) for a in (quick if args.quick else full)
        ]
        entry: dict[str, object] = {"command": " ".join(cmd[1:]), "json": str(path)}
        if importlib.util.find_spec(module) is None:
            entry["status"] = "missing"
        else:
            print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=args.timeout, check=False)
                ok = proc.returncode == 0 and path.exists()
                entry["status"] = "ok" if ok else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                entry["status"] = f"timeout after {args.timeout:.0f}s"
            entry["seconds"] = round(time.perf_counter() - t0, 1)
        summary[name] = entry
        print(f"[bench] {name}: {entry['status']}", file=sys.stderr, flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if all(e["status"] == "ok" for e in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
