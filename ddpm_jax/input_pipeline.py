"""Input pipeline: random-access sources, and batches that are a pure function of (seed, step).

A *source* is a random-access sequence: `len(source)` and `source[i] -> {"image": uint8 [H, W, C],
"label": int}`. Two kinds are built in:

* `"digits"`: scikit-learn's bundled 1,797 8x8 handwritten digits (no download, no data_dir).
  Values 0..16 become uint8 round(v * 255 / 16). Splits: a fixed permutation of all 1,797 indices
  (`np.random.default_rng(0)`); "test" = its last 297 entries, "train" = the other 1,500,
  "all" = everything; each split keeps the original (ascending) order.
* any tfds name (`cifar10`, `mnist`, `celeb_a_hq/256`, `lsun/church_outdoor`, ...), read with
  `tfds.data_source` from ArrayRecord files in `data_dir`: no TensorFlow, no download. Prepare
  it once with `tfds build NAME --data_dir DIR --file_format=array_record`.

The order of training examples is a pure function of (seed, step): global example position
`p = step * G + j` (G the global batch) lies in epoch `p // N` at offset `p % N`, and names the
example `perm_epoch[p % N]` of a permutation drawn from `np.random.default_rng([seed, epoch])`,
which also draws the flips. So resuming at step s needs no iterator state, epochs roll over inside
a batch, and the global batch is the same whatever the number of hosts and devices. Host h of P
takes the contiguous slice [h * G / P, (h + 1) * G / P) of every global batch; every host opens
the whole source and reads only its slice (random access needs no file sharding).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import parallel

Batch = dict[str, np.ndarray]

BUILTIN_DATASETS = ("digits",)
DIGITS_SPLITS = ("train", "test", "all")
DIGITS_NUM_TEST = 297
_DIGITS_SPLIT_SEED = 0
_READ_THREADS = 16  # concurrent reads + decodes per host batch for tfds sources
THREAD_NAME = "ddpm-input-prefetch"  # the prefetch thread, for tests and debuggers


class DatasetInfo(NamedTuple):
    """What the trainer needs to know about a split."""

    num_examples: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the images the source returns
    num_classes: int | None  # None: the dataset has no labels (every label is 0)


# ----------------------------------------------------------------------------------------------
# Sources.


class ArraySource:
    """An in-memory source: uint8 images [N, H, W, C] and int labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int | None):
        if images.ndim != 4 or images.dtype != np.uint8 or len(labels) != len(images):
            raise ValueError(
                f"ArraySource wants uint8 images [N, H, W, C] and labels [N]; got images "
                f"{images.dtype} {images.shape} and labels {np.shape(labels)}."
            )
        self.images = images
        self.labels = np.asarray(labels, np.int32)
        self.info = DatasetInfo(len(images), tuple(images.shape[1:]), num_classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i])}


class TfdsSource:
    """A tfds data source whose examples come out as {"image": uint8 [S, S, C], "label": int}.

    Images of a fixed-shape feature pass through unchanged (load_source checked the shape);
    variable-shape ones (LSUN: JPEGs of any size) are center-cropped and resized to S x S.
    Unlabelled datasets (LSUN, CelebA-HQ) get label 0.
    """

    def __init__(
        self, data_source: Sequence[Any], *, image_size: int, resize: bool, info: DatasetInfo
    ):
        self._data_source = data_source
        self._image_size = image_size
        self._resize = resize
        self.info = info

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self._data_source[int(i)]
        image = np.asarray(example["image"], np.uint8)
        if self._resize:
            image = center_crop_resize(image, self._image_size)
        return {"image": image, "label": int(example.get("label", 0))}


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Central square crop of a uint8 [H, W, C] image, resized (PIL bicubic) to [size, size, C]."""
    h, w, c = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    pil = Image.fromarray(square[..., 0] if c == 1 else square)
    # Pillow's resize filters over the whole footprint when shrinking, so this is antialiased.
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), np.uint8)
    return resized.reshape(size, size, c)


def load_source(config_data, split: str | None = None) -> ArraySource | TfdsSource:
    """Opens `split` (default `config_data.split`) of the dataset `config_data.name`.

    Args:
      config_data: the config's `data` section (name, data_dir, image_size, channels, ...).
      split: which split; tfds slicing syntax ("train[:90%]") works for tfds names.

    Returns:
      A random-access source with `.info` (a DatasetInfo).

    Raises:
      ValueError: unknown name or split, image size / channels that do not match the dataset,
        or class_conditional on a dataset without labels.
      FileNotFoundError: a tfds dataset that is not prepared in data_dir.
    """
    split = config_data.split if split is None else split
    if config_data.name == "digits":
        source = digits_source(split)
    else:
        source = _tfds_source(config_data, split)
    _check_matches_config(source.info, config_data)
    return source


def get_dataset_info(config_data, split: str | None = None) -> DatasetInfo:
    """(num_examples, image_shape, num_classes) of `split` (default `config_data.split`)."""
    return load_source(config_data, split).info


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, 8, 8, 1] in 0..255, and int labels [N]."""
    # Imported here: scikit-learn's datasets module takes ~1 s to import.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices (ascending) into the 1,797 digits of the built-in "train" / "test" / "all" split."""
    num_total = len(_digits_arrays()[0])
    if split == "all":
        return np.arange(num_total)
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown split {split!r} for 'digits'; expected one of {DIGITS_SPLITS}.")
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(num_total)
    chosen = perm[-DIGITS_NUM_TEST:] if split == "test" else perm[:-DIGITS_NUM_TEST]
    return np.sort(chosen)


def digits_source(split: str) -> ArraySource:
    """The built-in digits split "train", "test" or "all" (uint8 [N, 8, 8, 1], labels [N])."""
    images, labels = _digits_arrays()
    idx = digits_split_indices(split)
    return ArraySource(images[idx], labels[idx], num_classes=10)


def _tfds_source(config_data, split: str) -> TfdsSource:
    # An unset data_dir (the config's placeholder None, or "" from a launcher) is tfds's default.
    data_source = _open_tfds(config_data.name, split, config_data.data_dir or None)
    features = data_source.dataset_info.features
    if "image" not in features:
        raise ValueError(f"tfds dataset {config_data.name!r} has no 'image' feature.")
    h, w, c = features["image"].shape
    resize = h is None or w is None
    size = config_data.image_size
    label = features["label"] if "label" in features else None
    num_classes = getattr(label, "num_classes", None)
    info = DatasetInfo(len(data_source), (size, size, c) if resize else (h, w, c), num_classes)
    return TfdsSource(data_source, image_size=size, resize=resize, info=info)


def _open_tfds(name: str, split: str, data_dir: str | None):
    """tfds.data_source without any download, with errors that say what to do."""
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError as e:
        first_line = str(e).splitlines()[0]
        raise ValueError(
            f"Unknown dataset name {name!r}: not built in (built-in: {BUILTIN_DATASETS}) and not "
            f"a tfds dataset ({first_line})"
        ) from e
    except Exception as e:
        _raise_if_not_prepared(name, data_dir, e)
        raise


def _raise_if_not_prepared(name: str, data_dir: str | None, cause: Exception) -> None:
    """Turns tfds's error for a missing or TFRecord-only dataset into one with the fix."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:  # the name or config is wrong: the original error says it best
        return
    root = builder.data_dir_root
    build = f"`tfds build {name} --data_dir {root} --file_format=array_record`"
    if not builder.is_prepared():
        where = "the default tfds data_dir" if data_dir is None else "data_dir"
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {where} {root} (set "
            f"config.data.data_dir to where it is, or prepare it once with {build})."
        ) from cause
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"tfds dataset {name!r} in {root} is stored as {builder.info.file_format.value}; "
            f"random access needs array_record: rebuild it with {build}."
        ) from cause


def _check_matches_config(info: DatasetInfo, config_data) -> None:
    h, w, c = info.image_shape
    want = (config_data.image_size, config_data.image_size, config_data.channels)
    if (h, w, c) != want:
        raise ValueError(
            f"Dataset {config_data.name!r} has images of shape {(h, w, c)} but the config asks "
            f"for image_size={config_data.image_size}, channels={config_data.channels} "
            f"(shape {want}); set config.data.image_size / channels to match (no resize is done)."
        )
    if config_data.get("class_conditional", False):
        if info.num_classes is None:
            raise ValueError(
                f"class_conditional=True but dataset {config_data.name!r} has no labels."
            )
        if info.num_classes != config_data.num_classes:
            raise ValueError(
                f"Dataset {config_data.name!r} has {info.num_classes} classes but "
                f"config.data.num_classes={config_data.num_classes}."
            )


# ----------------------------------------------------------------------------------------------
# The order of examples: pure functions of (seed, step).


@functools.lru_cache(maxsize=4)
def _epoch_plan(seed: int, epoch: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """The permutation int64 [N] and flip flags bool [N] of one epoch (cached, read-only)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(num_examples).astype(np.int64)
    flips = rng.integers(0, 2, size=num_examples).astype(bool)
    perm.flags.writeable = False
    flips.flags.writeable = False
    return perm, flips


def _global_plan(step, num_examples, global_batch_size, seed) -> tuple[np.ndarray, np.ndarray]:
    for value, what in [(num_examples, "num_examples"), (global_batch_size, "global_batch_size")]:
        if value < 1:
            raise ValueError(f"{what} must be >= 1, got {value}.")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}.")
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty(global_batch_size, np.int64)
    flips = np.empty(global_batch_size, bool)
    for epoch in np.unique(epochs):  # one epoch, or two where the batch rolls over
        perm, epoch_flips = _epoch_plan(seed, int(epoch), num_examples)
        here = epochs == epoch
        indices[here] = perm[offsets[here]]
        flips[here] = epoch_flips[offsets[here]]
    return indices, flips


def global_batch_indices(
    step: int, *, num_examples: int, global_batch_size: int, seed: int
) -> np.ndarray:
    """Example indices int64 [G] of the global batch of `step` (every host computes the same)."""
    return _global_plan(step, num_examples, global_batch_size, seed)[0]


def global_batch_flips(
    step: int, *, num_examples: int, global_batch_size: int, seed: int
) -> np.ndarray:
    """Which examples of the global batch of `step` are mirrored (if flips are on): bool [G]."""
    return _global_plan(step, num_examples, global_batch_size, seed)[1]


def host_slice(global_batch: np.ndarray, *, process_index: int, process_count: int) -> np.ndarray:
    """Host `process_index`'s contiguous share [h * G / P, (h + 1) * G / P) of a global batch."""
    size = len(global_batch)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    if size % process_count:
        raise ValueError(
            f"Global batch of {size} does not split evenly over process_count={process_count}."
        )
    per_host = size // process_count
    return global_batch[process_index * per_host : (process_index + 1) * per_host]


# ----------------------------------------------------------------------------------------------
# Iterators.


def make_train_iterator(
    config_data,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    prefetch: int = 2,
    device_put: bool = False,
) -> Iterator[Batch]:
    """Endless training batches of this host, from `start_step` on.

    Args:
      config_data: the config's `data` section (name, data_dir, split, image_size, channels,
        random_flip, ...).
      global_batch_size: G, over all devices of all hosts.
      seed: the data seed (the order and flips depend on it only, not on the model's rng).
      start_step: the step of the first batch; resuming at step s is just start_step=s.
      process_index / process_count / local_device_count: this host's place; None reads jax's.
      prefetch: batches a background thread prepares ahead; 0 makes them on demand, in the
        caller's thread.
      device_put: also put image and label on the local devices (see `device_put_batch`) from
        the background thread, so the host-to-device copy overlaps the step; "index" stays numpy.

    Returns:
      An iterator of {"image": float32 [D, B, H, W, C] in [-1, 1], "label": int32 [D, B],
      "index": int64 [D, B]} with D = local_device_count, B = G / (process_count * D); "index"
      is the example's index in the split. Call `.close()` (or drop it) to stop the thread.
    """
    layout = _layout(global_batch_size, process_index, process_count, local_device_count)
    source = load_source(config_data)
    num_examples = len(source)
    flip = bool(config_data.random_flip)

    def make_batch(step: int, pool) -> Batch:
        indices, flips = _global_plan(step, num_examples, global_batch_size, seed)
        indices, flips = (host_slice(a, **layout.host) for a in (indices, flips))
        images, labels = _read(source, indices, pool)
        if flip:
            images[flips] = images[flips, :, ::-1]
        return _to_device_layout(
            {"image": _to_float(images), "label": labels, "index": indices}, layout.devices
        )

    steps = _count_from(start_step)
    return _iterate(make_batch, steps, source, prefetch=prefetch, device_put=device_put)


def make_eval_iterator(
    config_data,
    *,
    batch_size: int,
    split: str | None = None,
    num_examples: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    prefetch: int = 2,
    device_put: bool = False,
) -> Iterator[Batch]:
    """One pass, in order, over the first `num_examples` (default all) of `split`, e.g. for bpd.

    Global batch k holds examples [k * batch_size, (k + 1) * batch_size); the last one is padded
    (zero images, label 0, index -1, mask False). Hosts split each global batch as in training,
    and every host yields the same number of batches, ceil(num_examples / batch_size).

    Args:
      config_data: the config's `data` section.
      batch_size: the global eval batch, over all devices of all hosts.
      split: default `config_data.eval_split`.
      num_examples: evaluate only the first this many; None: the whole split.
      process_index / process_count / local_device_count / prefetch / device_put: as in
        `make_train_iterator`.

    Returns:
      An iterator of {"image": float32 [D, B, H, W, C] in [-1, 1], "label": int32 [D, B],
      "index": int64 [D, B], "mask": bool [D, B]}; flips are never applied.
    """
    layout = _layout(batch_size, process_index, process_count, local_device_count)
    source = load_source(config_data, config_data.eval_split if split is None else split)
    total = len(source) if num_examples is None else min(num_examples, len(source))
    num_batches = -(-total // batch_size)

    def make_batch(step: int, pool) -> Batch:
        positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
        positions = host_slice(positions, **layout.host)
        mask = positions < total
        images, labels = _read(source, positions[mask], pool)
        batch = {
            "image": np.zeros((len(positions), *source.info.image_shape), np.float32),
            "label": np.zeros(len(positions), np.int32),
            "index": np.where(mask, positions, -1),
            "mask": mask,
        }
        batch["image"][mask] = _to_float(images)
        batch["label"][mask] = labels
        return _to_device_layout(batch, layout.devices)

    return _iterate(
        make_batch, range(num_batches), source, prefetch=prefetch, device_put=device_put
    )


class _Layout(NamedTuple):
    host: dict[str, int]  # host_slice's keyword arguments
    devices: int  # local device count


def _layout(global_batch_size, process_index, process_count, local_device_count) -> _Layout:
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if local_device_count is None:
        local_device_count = jax.local_device_count()
    shards = process_count * local_device_count
    if global_batch_size < 1 or global_batch_size % shards:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by process_count "
            f"({process_count}) * local_device_count ({local_device_count}) = {shards}."
        )
    host = {"process_index": process_index, "process_count": process_count}
    return _Layout(host, local_device_count)


def iterate_images(source, *, batch_size: int, num_examples: int | None = None):
    """uint8 image batches [<= batch_size, H, W, C] of the first `num_examples` of a source, in
    order (for reference statistics; the training and eval iterators feed devices instead)."""
    total = len(source) if num_examples is None else min(num_examples, len(source))
    with futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for start in range(0, total, batch_size):
            indices = np.arange(start, min(start + batch_size, total))
            yield _read(source, indices, pool)[0]


def _read(source, indices: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, H, W, C] (a fresh array) and int32 labels [n] of `indices`."""
    if isinstance(source, ArraySource):
        return source.images[indices], source.labels[indices]
    examples = list(pool.map(source.__getitem__, indices))
    images = np.empty((len(indices), *source.info.image_shape), np.uint8)
    for k, example in enumerate(examples):
        images[k] = example["image"]
    return images, np.array([e["label"] for e in examples], np.int32)


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def _to_device_layout(batch: Batch, num_devices: int) -> Batch:
    """[n, ...] -> [num_devices, n / num_devices, ...] for every entry."""
    return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _count_from(start: int) -> Iterator[int]:
    step = start
    while True:
        yield step
        step += 1


def _iterate(make_batch, steps: Iterable[int], source, *, prefetch: int, device_put: bool):
    """Batches for `steps`, made in a background thread `prefetch` ahead (0: no thread)."""
    if isinstance(source, ArraySource):
        pool = None  # in memory: one vectorised gather, nothing to overlap
    else:
        pool = futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="ddpm-input-read")

    def produce(step: int) -> Batch:
        batch = make_batch(step, pool)
        if device_put:
            on_device = parallel.put_sharded({k: v for k, v in batch.items() if k != "index"})
            batch = {**batch, **on_device}
        return batch

    if prefetch > 0:
        batches = _prefetch(produce, steps, size=prefetch)
    else:
        batches = map(produce, steps)
    return _closing(batches, pool)


def _closing(batches: Iterator[Batch], pool) -> Iterator[Batch]:
    try:
        yield from batches  # closing this generator closes `batches` too
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _prefetch(produce: Callable[[int], Batch], steps: Iterable[int], *, size: int):
    """Runs `produce` over `steps` in one background thread, at most `size` results ahead.

    The consumer gets results in order; an exception in the thread is re-raised in the consumer
    at the position it happened. Closing the generator (or dropping it) stops and joins the
    thread.
    """
    results: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for step in steps:
                if stop.is_set() or not put((produce(step), None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((None, e))

    thread = threading.Thread(target=work, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            item, error = results.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()
