"""Digits: quality and wall time of every sampler at 10, 20, 50 steps, from one checkpoint.

  ddpm-jax train --config configs/digits.py --workdir runs/digits_cond \\
      --config.data.class_conditional=True --config.train.label_dropout=0.1
  python benchmarks/sampler_quality.py --workdir runs/digits_cond [--num 500] [--quick]

Per row: the share of samples the digits classifier recognises with confidence > 0.9, how often
its class is the requested label, and the wall time of one call after compiling (every local
device; --quick: 2 step counts, 40 samples, no 1,000-step chain). Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from ddpm_jax import digits, experiment, parallel, sampling, train_state

CASES = [
    ("ddim", "uniform"),
    ("respaced", "uniform"),
    ("dpm++2m", "logsnr"),
    ("dpm++2m", "uniform"),
]


def measure(config, model, schedule, params, num, **spec_fields) -> dict:
    """One sampler: compile and run once, then time a second call with another key."""
    spec = experiment.sampler_spec(config, eta=0.0, **spec_fields)
    sample_fn = sampling.make_pmapped_sampler(
        model.apply,
        schedule,
        spec,
        experiment.model_output(config),
        per_device_batch=-(-num // jax.local_device_count()),
        image_shape=experiment.image_shape(config),
        num_classes=experiment.num_classes(config),
    )
    n = -(-num // jax.local_device_count()) * jax.local_device_count()
    labels = np.arange(n, dtype=np.int32) % 10
    jax.block_until_ready(sample_fn(jax.random.key(0), params, labels).images)
    start = time.perf_counter()
    images = np.asarray(sampling.to_uint8(sample_fn(jax.random.key(1), params, labels).images))
    wall = time.perf_counter() - start
    quality = digits.sample_quality(images)
    agreement = float(np.mean(digits.predict_proba(images).argmax(1) == labels))
    return {**spec_fields, "confident": quality["confident_share"],
            "label_agreement": agreement, "wall_s": wall}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    ema, config, _ = train_state.restore_ema_params(args.workdir)
    model, schedule = experiment.create_model(config), experiment.create_schedule(config)
    params = parallel.replicate(ema)
    num = 40 if args.quick else args.num
    step_counts = (5, 10) if args.quick else (10, 20, 50)
    rows = [] if args.quick else [measure(config, model, schedule, params, num, sampler="ddpm")]
    for steps in step_counts:
        for sampler, spacing in CASES:
            rows.append(measure(config, model, schedule, params, num, sampler=sampler,
                                steps=steps, spacing=spacing))  # fmt: skip
    if experiment.num_classes(config) and config.train.label_dropout > 0:
        for guidance in (1.0, 3.0):
            spec = dict(sampler="dpm++2m", steps=step_counts[-1], spacing="logsnr")
            rows.append(measure(config, model, schedule, params, num, **spec, guidance=guidance))
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "num": num, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
