"""Ahead-of-time compilation for a TPU slice, on a CPU-only machine: does a step fit, how fast
could it go, what does it communicate?

With the optional `tpu` extra (`pip install libtpu`) and `JAX_PLATFORMS=cpu`,
`jax.experimental.topologies.get_topology_desc` describes a slice's chips as abstract devices;
the real train step (either device wrapper) or the real sampler (its whole `lax.scan`) is lowered
for them from shapes alone and compiled by the TPU compiler. The compiled program reports, per
chip: HBM for arguments, temporaries and outputs (`memory_analysis`), FLOPs and bytes accessed
(`cost_analysis`), and its collectives (counted in the optimised HLO). From the chip's published
peak and HBM bandwidth (`CHIPS`) follows a roofline lower bound on the step time.

    ddpm-jax compile --config configs/cifar10.py --topology v5e-16 --batch_per_chip 8

The command behind it is `ddpm-jax compile` (cli.py); `compile_step` is the library function.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from ddpm_jax import experiment, parallel, sampling, train, train_state

GiB = 1024**3
NOT_FITTING_EXIT_CODE = 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures (bf16 peak, HBM bandwidth and capacity)."""

    generation: str  # as `get_topology_desc` spells it: "v4", "v5e", "v5p", "v6e"
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int
    megacore: bool  # two TensorCores seen as one device; slice names count cores ("v4-8": 4 chips)


# Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# per chip, bf16 peak / HBM bandwidth / HBM capacity.
CHIPS = {
    "v4": Chip("v4", 275e12, 1.2e12, 32 * GiB, megacore=True),
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB, megacore=False),
    "v5p": Chip("v5p", 459e12, 2.765e12, 95 * GiB, megacore=True),
    "v6e": Chip("v6e", 918e12, 1.64e12, 32 * GiB, megacore=False),
}

# Slice names (as Cloud TPU's accelerator types spell them) -> get_topology_desc's topology name.
# v4 and v5p names count TensorCores (two per chip), v5e and v6e names count chips.
TOPOLOGIES = {
    "v4-8": "v4:2x2x1",
    "v4-16": "v4:2x2x2",
    "v4-32": "v4:2x2x4",
    "v4-64": "v4:2x4x4",
    "v5e-1": "v5e:1x1",
    "v5e-4": "v5e:2x2",
    "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8",
    "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1",
    "v5p-16": "v5p:2x2x2",
    "v5p-32": "v5p:2x2x4",
    "v6e-1": "v6e:1x1",
    "v6e-4": "v6e:2x2",
    "v6e-8": "v6e:2x4",
    "v6e-16": "v6e:4x4",
    "v6e-256": "v6e:16x16",
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


class What(enum.Enum):
    """Which program to compile."""

    TRAIN = "train"  # one train step (the wrapped `train.make_step_fn`)
    SAMPLE = "sample"  # the sampler of config.sample: the whole lax.scan over timesteps


def topology_name(name: str) -> str:
    """ "v5e-16" / "v5litepod-16" -> "v5e:4x4"; a name with a ":" is passed through."""
    name = name.strip().lower().replace("v5litepod", "v5e")
    if ":" in name:
        return name
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def chip_of(name: str) -> Chip:
    generation = topology_name(name).split(":")[0]
    if generation not in CHIPS:
        raise ValueError(f"no figures for TPU {generation!r}; known: {', '.join(CHIPS)}")
    return CHIPS[generation]


def tpu_devices(name: str) -> list:
    """The abstract devices (one per chip) of a TPU slice; needs libtpu, not a TPU."""
    from jax.experimental import topologies

    # Compile-only: no TPU is opened, so several processes may load libtpu at once (libtpu
    # otherwise takes a lock file that makes a second compiling process fail).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip = chip_of(name)
    kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
    return list(
        topologies.get_topology_desc(
            platform="tpu", topology_name=topology_name(name), **kwargs
        ).devices
    )


@dataclasses.dataclass(frozen=True)
class Report:
    """What one compile says about one chip of the slice (every chip runs the same program)."""

    what: str
    topology: str
    parallelism: str
    chips: int
    batch_per_chip: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    hbm_capacity_bytes: int
    flops: float  # per chip per call (a train step, or a whole sampling scan)
    bytes_accessed: float
    loop_steps: int  # network calls per call: 1 for a train step, the sampler's scan length
    peak_flops: float
    hbm_bandwidth: float
    collectives: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """HBM the program needs: arguments, outputs (less what aliases a donated argument),
        temporaries and code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_capacity_bytes

    @property
    def roofline_s(self) -> float:
        """A lower bound on the time of one call: max(FLOPs / peak, bytes / bandwidth)."""
        return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    @property
    def images_per_s(self) -> float:
        """Over the whole slice, at the roofline bound."""
        return self.chips * self.batch_per_chip / self.roofline_s

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            total_bytes=self.total_bytes,
            fits=self.fits,
            roofline_s=self.roofline_s,
            images_per_s=self.images_per_s,
            flops_per_image=self.flops / self.batch_per_chip,
        )
        return out

    def describe(self) -> str:
        """A few lines for people."""
        gib = lambda b: f"{b / GiB:.2f} GiB"
        rows = [
            f"{self.what} on {self.topology} ({self.chips} chips), {self.parallelism}, "
            f"{self.batch_per_chip} images per chip:",
            f"  HBM per chip: arguments {gib(self.argument_bytes)}, temporaries "
            f"{gib(self.temp_bytes)}, outputs {gib(self.output_bytes)} (aliased "
            f"{gib(self.alias_bytes)}), code {gib(self.code_bytes)}; total "
            f"{gib(self.total_bytes)} of {gib(self.hbm_capacity_bytes)} "
            f"({100 * self.total_bytes / self.hbm_capacity_bytes:.1f}%)",
            f"  per chip per call ({self.loop_steps} network calls): {self.flops / 1e9:.1f} GFLOP "
            f"({self.flops / self.batch_per_chip / 1e9:.2f} GFLOP per image), "
            f"{self.bytes_accessed / 1e9:.2f} GB accessed",
            f"  roofline: >= {self.roofline_s * 1e3:.2f} ms per call "
            f"(compute {self.flops / self.peak_flops * 1e3:.2f} ms, memory "
            f"{self.bytes_accessed / self.hbm_bandwidth * 1e3:.2f} ms) -> "
            f"<= {self.images_per_s:,.0f} images/s over the slice",
            "  collectives: "
            + (", ".join(f"{k} x{v}" for k, v in self.collectives.items() if v) or "none"),
        ]
        if not self.fits:
            over = self.total_bytes - self.hbm_capacity_bytes
            rows.append(
                f"  DOES NOT FIT: {gib(over)} over the chip's {gib(self.hbm_capacity_bytes)}"
            )
        return "\n".join(rows)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the (optimised) HLO text holds; async pairs count once."""
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text)) for op in _COLLECTIVES}


# --------------------------------------------------------------------------------------------
# Lowering the real programs from shapes.
# --------------------------------------------------------------------------------------------


def _lower_train(config, wrapper: parallel.Wrapper, batch_per_chip: int):
    schedule = experiment.create_schedule(config)
    model = experiment.create_model(config)
    state = jax.eval_shape(lambda r: train_state.create(r, config, model), jax.random.key(0))
    d = wrapper.num_devices
    h, w, c = experiment.image_shape(config)
    batches = {  # [devices, steps = 1, b, ...], as the loop feeds them
        "image": jax.ShapeDtypeStruct((d, 1, batch_per_chip, h, w, c), jnp.float32),
        "label": jax.ShapeDtypeStruct((d, 1, batch_per_chip), jnp.int32),
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = train.make_p_train_step(config, schedule, wrapper)
    place = parallel.Place
    return step.lower(
        wrapper.abstract(state, place.REPLICATED),
        wrapper.abstract(batches, place.PER_DEVICE),
        wrapper.abstract(key, place.SAME),
    )


def _lower_sample(config, wrapper: parallel.Wrapper, batch_per_chip: int):
    """The sampler of config.sample on each chip: `sampling.draw`'s scan over all its steps."""
    schedule = experiment.create_schedule(config)
    model = experiment.create_model(config)
    shape = (batch_per_chip, *experiment.image_shape(config))
    spec = experiment.sampler_spec(config)
    output = experiment.model_output(config)
    num_classes = experiment.num_classes(config)

    def device_fn(rng, params, device_index):
        rng_labels, rng = jax.random.split(jax.random.fold_in(rng, device_index))
        labels = None
        if num_classes is not None:
            labels = sampling.sample_labels(rng_labels, batch_per_chip, num_classes)
        denoise_fn = sampling.make_denoise_fn(model.apply, params, labels=labels)
        return sampling.draw(rng, denoise_fn, schedule, shape, spec=spec, output=output)

    place = parallel.Place
    wrapped = wrapper.wrap(
        device_fn,
        in_places=(place.SAME, place.REPLICATED, place.PER_DEVICE),
        out_places=place.PER_DEVICE,
    )
    state = jax.eval_shape(lambda r: train_state.create(r, config, model), jax.random.key(0))
    key = jax.eval_shape(lambda: jax.random.key(0))
    indices = jax.ShapeDtypeStruct((wrapper.num_devices,), jnp.int32)
    return wrapped.lower(
        wrapper.abstract(key, place.SAME),
        wrapper.abstract(state.ema_params, place.REPLICATED),
        wrapper.abstract(indices, place.PER_DEVICE),
    )


_LOWER = {What.TRAIN: _lower_train, What.SAMPLE: _lower_sample}


def compile_step(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    batch_per_chip: int,
    parallelism: parallel.Parallelism = parallel.Parallelism.PMAP,
    what: What = What.TRAIN,
    cache_dir: str | None = None,
) -> Report:
    """Compiles the train step (or the sampler) of `config` for a TPU slice; reports one chip.

    Args:
      config: the experiment config (its train.batch_size is ignored: `batch_per_chip` rules).
      topology: a slice name ("v5e-16", "v4-8") or get_topology_desc's ("v5e:4x4").
      batch_per_chip: images per chip per call.
      parallelism: the device wrapper to compile.
      what: the train step or the sampler.
      cache_dir: if given, reports are kept there as JSON, keyed by (config, topology, batch,
        wrapper, program, jax and libtpu versions): the TPU compiler takes minutes per program on
        a small CPU machine.

    Raises:
      ValueError: an unknown topology, or batch_per_chip < 1.
      ImportError: libtpu is not installed (`pip install 'ddpm-jax[tpu]'`).
    """
    what, parallelism = What(what), parallel.Parallelism(parallelism)
    if batch_per_chip < 1:
        raise ValueError(f"batch_per_chip must be >= 1, got {batch_per_chip}")
    chip = chip_of(topology)
    key = _cache_key(config, topology, batch_per_chip, parallelism, what)
    cached = _cache_path(cache_dir, key)
    if cached is not None and cached.exists():
        return _from_dict(json.loads(cached.read_text()))
    devices = tpu_devices(topology)
    wrapper = parallel.Wrapper(parallelism, devices=devices)
    compiled = _LOWER[what](config, wrapper, batch_per_chip).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's cost analysis counts a loop body once: the sampler's scan body (one network call
    # and its update) is scaled by its trip count; what lies outside the loop is negligible.
    loop_steps = _loop_steps(config) if what is What.SAMPLE else 1
    report = Report(
        what=what.value,
        topology=topology,
        parallelism=parallelism.value,
        chips=len(devices),
        batch_per_chip=batch_per_chip,
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        hbm_capacity_bytes=chip.hbm_bytes,
        flops=float(cost.get("flops", 0.0)) * loop_steps,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)) * loop_steps,
        loop_steps=loop_steps,
        peak_flops=chip.peak_flops,
        hbm_bandwidth=chip.hbm_bandwidth,
        collectives=count_collectives(compiled.as_text()),
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(report.to_dict(), indent=1))
    return report


def _loop_steps(config) -> int:
    spec = experiment.sampler_spec(config)
    if spec.sampler is sampling.Sampler.DDIM:
        return spec.steps
    return config.diffusion.num_timesteps


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def fits(config, topology: str, batch_per_chip: int, **kwargs) -> tuple[bool, Report | None]:
    """(whether it fits, the report; None when the compiler itself ran out of memory)."""
    try:
        report = compile_step(config, topology, batch_per_chip=batch_per_chip, **kwargs)
    except Exception as e:  # noqa: BLE001 - the TPU compiler's OOM is an XlaRuntimeError
        if is_out_of_memory(e):
            return False, None
        raise
    return report.fits, report


def max_batch_per_chip(config, topology: str, *, limit: int = 1 << 14, **kwargs) -> Report | None:
    """The report of the largest batch per chip that fits: doubling, then bisection.

    Returns None when not even one image per chip fits.
    """
    best, low, high = None, 0, None  # low fits (0: trivially), high does not
    b = 1
    while high is None and b <= limit:
        ok, report = fits(config, topology, b, **kwargs)
        if ok:
            best, low, b = report, b, 2 * b
        else:
            high = b
    high = high or limit + 1
    while high - low > 1:
        mid = (low + high) // 2
        ok, report = fits(config, topology, mid, **kwargs)
        if ok:
            best, low = report, mid
        else:
            high = mid
    return best


def _cache_key(config, topology, batch, parallelism, what) -> str:
    import importlib.metadata as md

    try:
        libtpu = md.version("libtpu")
    except md.PackageNotFoundError:
        libtpu = "none"
    blob = json.dumps(
        [
            experiment.to_json(config),
            topology_name(topology),
            batch,
            parallelism.value,
            what.value,
            jax.__version__,
            libtpu,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_path(cache_dir: str | None, key: str) -> epath.Path | None:
    return None if not cache_dir else epath.Path(cache_dir) / f"{key}.json"


def _from_dict(d: dict[str, Any]) -> Report:
    fields = {f.name for f in dataclasses.fields(Report)}
    return Report(**{k: v for k, v in d.items() if k in fields})


def libtpu_available() -> bool:
    """Whether the TPU compiler (the `tpu` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None
