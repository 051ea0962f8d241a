"""Input pipeline: digits, tfds (mocked, offline), batches as a pure function of (seed, step)."""

import itertools
import threading

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from ddpm_jax import input_pipeline, parallel


def _data(**overrides):
    data = default.get_config().data
    data.update(overrides)
    return data


def _take(iterator, n):
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


def _flat(batch, key):
    """[D, B, ...] -> [D * B, ...]: the host's batch in order."""
    return batch[key].reshape(-1, *batch[key].shape[2:])


def _train(data=None, **kwargs):
    kwargs = {
        "global_batch_size": 16,
        "seed": 0,
        "process_index": 0,
        "process_count": 1,
        "local_device_count": 4,
    } | kwargs
    return input_pipeline.make_train_iterator(data or _data(), **kwargs)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_source_images_labels_and_info():
    source = input_pipeline.load_source(_data(), "all")
    assert len(source) == 1797
    example = source[5]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
    assert source.images.min() == 0 and source.images.max() == 255  # 16 -> 255
    assert set(np.unique(source.images)) <= {round(v * 255 / 16) for v in range(17)}
    assert set(source.labels.tolist()) == set(range(10))
    info = input_pipeline.get_dataset_info(_data())
    assert info == (1500, (8, 8, 1), 10)


def test_digits_splits_are_fixed_disjoint_and_cover_everything():
    train = input_pipeline.digits_split_indices("train")
    test = input_pipeline.digits_split_indices("test")
    assert (len(train), len(test)) == (1500, 297)
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    np.testing.assert_array_equal(test, input_pipeline.digits_split_indices("test"))
    everything = input_pipeline.load_source(_data(), "all")
    test_source = input_pipeline.load_source(_data(), "test")
    np.testing.assert_array_equal(test_source.images, everything.images[test])


def test_train_batch_shapes_dtypes_and_range():
    (batch,) = _take(_train(), 1)
    assert batch["image"].shape == (4, 4, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 4) and batch["label"].dtype == np.int32
    assert batch["index"].shape == (4, 4) and batch["index"].dtype == np.int64
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    source = input_pipeline.load_source(_data())
    index = _flat(batch, "index")
    np.testing.assert_array_equal(_flat(batch, "label"), source.labels[index])
    np.testing.assert_allclose(_flat(batch, "image"), source.images[index] / 127.5 - 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Batches as a pure function of (seed, step)


def _indices(step, n=10, g=4, seed=0):
    return input_pipeline.global_batch_indices(step, num_examples=n, global_batch_size=g, seed=seed)


def test_same_seed_and_step_same_batch_other_step_or_seed_differs():
    np.testing.assert_array_equal(_indices(7, n=1500, g=64), _indices(7, n=1500, g=64))
    assert not np.array_equal(_indices(7, n=1500, g=64), _indices(8, n=1500, g=64))
    assert not np.array_equal(_indices(7, n=1500, g=64), _indices(7, n=1500, g=64, seed=1))


@pytest.mark.parametrize("n, g", [(10, 4), (10, 5), (7, 16)])
def test_every_example_exactly_once_per_epoch(n, g):
    """Positions [e * N, (e + 1) * N) are a permutation of the N examples, batch edges aside."""
    steps = -(-3 * n // g) + 1
    flat = np.concatenate([_indices(s, n=n, g=g) for s in range(steps)])
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(flat[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # a new order each epoch


def test_resume_equals_tail_of_uninterrupted_run_across_an_epoch_boundary():
    # 1500 training digits, 64 per step: epoch 0 ends inside step 23.
    full = _take(_train(global_batch_size=64, local_device_count=8), 26)
    resumed = _take(_train(global_batch_size=64, local_device_count=8, start_step=22), 4)
    for a, b in zip(full[22:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_hosts_take_disjoint_slices_that_concatenate_to_the_global_batch():
    one = _take(_train(global_batch_size=32, process_count=1, local_device_count=8), 2)
    hosts = [
        _take(_train(global_batch_size=32, process_index=h, process_count=2), 2) for h in (0, 1)
    ]
    for step in range(2):
        parts = [_flat(hosts[h][step], "index") for h in (0, 1)]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), _flat(one[step], "index"))
        images = np.concatenate([_flat(hosts[h][step], "image") for h in (0, 1)])
        np.testing.assert_array_equal(images, _flat(one[step], "image"))


def test_host_slice_is_contiguous():
    x = np.arange(12)
    np.testing.assert_array_equal(
        input_pipeline.host_slice(x, process_index=2, process_count=3), [8, 9, 10, 11]
    )


def test_flips_are_deterministic_and_mirror_about_half():
    kwargs = {"global_batch_size": 256, "local_device_count": 8, "start_step": 3}
    plain = _take(_train(**kwargs), 1)[0]
    flipped, again = (_take(_train(_data(random_flip=True), **kwargs), 1)[0] for _ in range(2))
    np.testing.assert_array_equal(flipped["image"], again["image"])
    flips = input_pipeline.global_batch_flips(3, num_examples=1500, global_batch_size=256, seed=0)
    expected = np.where(
        flips[:, None, None, None], _flat(plain, "image")[:, :, ::-1], _flat(plain, "image")
    )
    np.testing.assert_array_equal(_flat(flipped, "image"), expected)
    assert 0.35 < flips.mean() < 0.65


# ---------------------------------------------------------------------------------------------
# Eval iterator


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_iterator_covers_split_in_order_once_with_padding_masked(process_count):
    per_host = [
        list(
            input_pipeline.make_eval_iterator(
                _data(),
                batch_size=64,
                process_index=h,
                process_count=process_count,
                local_device_count=4,
            )
        )
        for h in range(process_count)
    ]
    assert all(len(batches) == 5 for batches in per_host)  # ceil(297 / 64)
    index = np.concatenate([_flat(batches[k], "index") for k in range(5) for batches in per_host])
    mask = np.concatenate([_flat(batches[k], "mask") for k in range(5) for batches in per_host])
    np.testing.assert_array_equal(index[mask], np.arange(297))
    assert mask.sum() == 297 and np.all(index[~mask] == -1)
    source = input_pipeline.load_source(_data(), "test")
    last = per_host[-1][-1]
    assert last["image"].shape == (4, 64 // process_count // 4, 8, 8, 1)
    images = np.concatenate([_flat(batches[0], "image") for batches in per_host])
    np.testing.assert_allclose(images, source.images[:64] / 127.5 - 1.0, atol=1e-6)


def test_eval_iterator_num_examples_limits_the_pass():
    batches = list(
        input_pipeline.make_eval_iterator(
            _data(), batch_size=8, num_examples=20, process_count=1, local_device_count=2
        )
    )
    assert len(batches) == 3
    assert sum(int(b["mask"].sum()) for b in batches) == 20


# ---------------------------------------------------------------------------------------------
# Background thread and devices


class _ExplodingImages:
    """Images that fail on the 5th read (a disk error at step 4)."""

    def __init__(self, images):
        self._images, self._calls = images, itertools.count()

    def __len__(self):
        return len(self._images)

    def __getitem__(self, index):
        if next(self._calls) == 4:
            raise RuntimeError("disk on fire at step 4")
        return self._images[index]


def test_prefetch_thread_propagates_errors_and_stops_on_close(monkeypatch):
    real_load = input_pipeline.load_source

    def load_source(*args, **kwargs):
        source = real_load(*args, **kwargs)
        source.images = _ExplodingImages(source.images)
        return source

    monkeypatch.setattr(input_pipeline, "load_source", load_source)
    iterator = _train()
    for _ in range(4):
        next(iterator)
    with pytest.raises(RuntimeError, match="disk on fire at step 4"):
        next(iterator)

    iterator = _train(prefetch=3)
    next(iterator)
    assert any(t.name == input_pipeline.THREAD_NAME for t in threading.enumerate())
    iterator.close()
    assert not any(t.name == input_pipeline.THREAD_NAME for t in threading.enumerate())


def test_no_prefetch_gives_the_same_batches():
    a = _take(_train(prefetch=0), 3)
    b = _take(_train(prefetch=2), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_put_sharded_shards_axis_0_over_local_devices_for_pmap():
    devices = jax.local_devices()
    (batch,) = _take(_train(global_batch_size=8 * len(devices), local_device_count=len(devices)), 1)
    on_device = parallel.put_sharded({"image": batch["image"]})
    shards = on_device["image"].addressable_shards
    assert [s.device for s in shards] == devices and shards[0].data.shape[0] == 1
    means = jax.pmap(lambda x: x.mean(), axis_name="batch")(on_device["image"])
    np.testing.assert_allclose(means, batch["image"].mean(axis=(1, 2, 3, 4)), rtol=1e-5)
    (put,) = _take(
        _train(global_batch_size=16, local_device_count=len(devices), device_put=True), 1
    )
    assert isinstance(put["image"], jax.Array) and isinstance(put["index"], np.ndarray)


# ---------------------------------------------------------------------------------------------
# tfds, offline: tfds.testing.mock_data patches tfds.data_source


@pytest.mark.parametrize(
    "name, size, channels", [("cifar10", 32, 3), ("mnist", 28, 1), ("fashion_mnist", 28, 1)]
)
def test_tfds_source_through_data_source(name, size, channels):
    data = _data(name=name, image_size=size, channels=channels, data_dir="/nonexistent")
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        assert input_pipeline.get_dataset_info(data) == (24, (size, size, channels), 10)
        batches = _take(_train(data, global_batch_size=16, local_device_count=4), 2)
    assert batches[0]["image"].shape == (4, 4, size, size, channels)
    assert batches[0]["image"].dtype == np.float32
    assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0
    labels = np.concatenate([_flat(b, "label") for b in batches])
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10


def test_tfds_variable_size_images_are_center_cropped_and_resized_unlabelled_get_0():
    data = _data(name="lsun/church_outdoor", image_size=16, channels=3, random_flip=True)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        assert input_pipeline.get_dataset_info(data) == (8, (16, 16, 3), None)
        (batch,) = _take(_train(data, global_batch_size=8, local_device_count=2), 1)
    assert batch["image"].shape == (2, 4, 16, 16, 3)
    assert np.all(batch["label"] == 0)


def test_center_crop_resize_keeps_the_middle():
    image = np.zeros((20, 40, 1), np.uint8)
    image[:, 10:30] = 200  # the central 20 x 20 square
    np.testing.assert_array_equal(input_pipeline.center_crop_resize(image, 20), image[:, 10:30])
    small = input_pipeline.center_crop_resize(image, 5)
    assert small.shape == (5, 5, 1) and np.all(small == 200)


# ---------------------------------------------------------------------------------------------
# Errors that name the bad value


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="no_such_dataset_xyz.*digits"):
        input_pipeline.load_source(_data(name="no_such_dataset_xyz"))


def test_unknown_digits_split():
    with pytest.raises(ValueError, match="'validation'.*train"):
        input_pipeline.load_source(_data(), "validation")


def test_unprepared_tfds_dataset_says_how_to_build_it(tmp_path):
    data = _data(name="mnist", image_size=28, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"tfds build mnist --data_dir {tmp_path}"):
        input_pipeline.load_source(data)


@pytest.mark.parametrize("size, channels", [(16, 1), (8, 3)])
def test_image_shape_mismatch_names_both(size, channels):
    with pytest.raises(ValueError, match=rf"\(8, 8, 1\).*image_size={size}, channels={channels}"):
        input_pipeline.load_source(_data(image_size=size, channels=channels))


def test_tfds_image_size_mismatch_names_both():
    data = _data(name="celeb_a_hq/256", image_size=64, channels=3)
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match=r"\(256, 256, 3\).*image_size=64"):
            input_pipeline.load_source(data)


def test_class_conditional_needs_labels():
    data = _data(name="celeb_a_hq/256", image_size=256, channels=3, class_conditional=True)
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match="class_conditional.*no labels"):
            input_pipeline.load_source(data)


def test_global_batch_not_divisible_names_the_numbers():
    with pytest.raises(ValueError, match=r"30 .*process_count \(2\).*local_device_count \(8\)"):
        _train(global_batch_size=30, process_count=2, local_device_count=8)
