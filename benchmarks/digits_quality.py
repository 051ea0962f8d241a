"""The digits default end to end: train, sample, score the samples, and the test NLL.

Runs the README's main command (as a subprocess, timed), then `ddpm-jax sample` and
`ddpm-jax eval` on its workdir, and prints and writes (JSON) the figures of issue 5:
wall time, final loss, the share of samples a digit classifier trained on the real digits
labels with confidence > 0.9, how evenly the 10 classes are covered, and the test bits/dim.

  python benchmarks/digits_quality.py --workdir runs/digits [--num_samples 1000] [--skip_train]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

QUICK = ("train.num_steps=4", "diffusion.num_timesteps=10", "sample.num_grid=4")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> float:
    """Runs `python -m ddpm_jax.main ARGS`; returns the wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpm_jax.main", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def _last_metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "digits"))
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--nll_examples", type=int, default=297)
    parser.add_argument("--skip_train", action="store_true", help="reuse a trained workdir")
    parser.add_argument("--quick", action="store_true", help="4 steps at T = 10, 8 samples")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    if args.quick:
        args.num_samples, args.nll_examples = 8, 8

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness

    results = {"benchmark": "digits_quality", "workdir": workdir, "env": harness.environment()}
    if not args.skip_train:
        cmd = ["train", "--config", os.path.join(REPO, "configs", "digits.py")]
        if args.quick:
            cmd += [f"--config.{k}" for k in QUICK]
        results["train_wall_s"] = _run([*cmd, "--workdir", workdir])
    results["final_metrics"] = _last_metrics(workdir)

    samples = os.path.join(workdir, "generated", "quality")
    sample_args = ["sample", "--workdir", workdir, "--out", samples, "--seed", "1"]
    results["sample_wall_s"] = _run(
        [
            *sample_args,
            "--num_samples",
            str(args.num_samples),
            "--batch_size",
            str(min(500, args.num_samples)),
        ]
    )
    _run(["eval", "--workdir", workdir, "--samples", samples])
    _run(
        ["eval", "--workdir", workdir, "--split", "test", "--num_examples", str(args.nll_examples)]
    )
    for kind, pattern in (("quality", "quality*.json"), ("nll", "bpd-test*.json")):
        paths = sorted(glob.glob(os.path.join(workdir, "eval", pattern)), key=os.path.getmtime)
        with open(paths[-1]) as f:
            results[kind] = json.load(f)

    quality, nll = results["quality"], results["nll"]
    rows = [
        ("train wall time (s)", f"{results.get('train_wall_s', float('nan')):.0f}"),
        ("final loss (last logged)", f"{results['final_metrics']['loss']:.4f}"),
        ("samples: share with confidence > 0.9", f"{quality['confident_share']:.3f}"),
        ("  real test digits, same classifier", f"{quality['reference']['confident_share']:.3f}"),
        ("samples: class evenness (1 = even)", f"{quality['evenness']:.3f}"),
        ("  real test digits", f"{quality['reference']['evenness']:.3f}"),
        ("samples: class counts", " ".join(str(c) for c in quality["class_counts"])),
        ("test NLL (bits/dim, EMA model)", f"{nll['bpd']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "digits_quality.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
