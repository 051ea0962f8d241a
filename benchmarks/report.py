"""Renders the JSON of a run (benchmarks/results/*.json, results_gpu/gpu_check.json) as Markdown.

  python benchmarks/report.py [--results benchmarks/results] [--out RESULTS_DIR/REPORT.md]

Each JSON file becomes a section: its machine line and its table (the columns it stored). The
curated benchmarks/RESULTS.md quotes these reports; it is edited by hand, never overwritten.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def section(name: str, payload: dict) -> str:
    env = payload.get("env", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = [f"## `{name}` ({payload.get('benchmark', '?')})", ""]
    lines.append(f"{env.get('date')}; {env.get('backend')} x{env.get('local_devices')} "
                 f"({env.get('device_kind')}; {env.get('cpu')}); {versions}")  # fmt: skip
    if payload.get("columns"):
        lines += ["", harness.format_table(payload["rows"], [tuple(c) for c in payload["columns"]])]
    else:  # gpu_check.json, digits_quality.json: the record as it is
        lines += ["", "```json", json.dumps(payload, indent=1, default=str)[:6000], "```"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=harness.RESULTS_DIR)
    parser.add_argument("--gpu_results", default=os.path.join(harness.HERE, "results_gpu"))
    parser.add_argument("--out", default=None, help="default: <results>/REPORT.md")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(args.results, "REPORT.md")
    parts = ["# Benchmarks", "", "Rendered by `benchmarks/report.py` from the JSON of a run."]
    for title, directory in (("CPU", args.results), ("GPU", args.gpu_results)):
        parts += ["", f"# {title}"]
        for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
            with open(path) as f:
                parts += ["", section(os.path.basename(path), json.load(f))]
    with open(args.out, "w") as f:
        f.write("\n".join(parts) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
