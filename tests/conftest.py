"""Test setup: several fake CPU devices, set before anything imports jax."""

import os

# Eight host-platform devices let pmap/shard tests run on a CPU-only machine. This must
# happen before jax is first imported, which is why it lives at the top of conftest.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
# Many tests compile the same small programs (the tiny UNet's init and train step); a persistent
# compilation cache shared by the test processes of one run turns the repeats into cache hits.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "DDPM_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "ddpm_jax_xla_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir holding a checkpoint of the tiny test model (T = 20, untrained weights, written
    as a pretrained one): what `sample` and `eval` read."""
    from configs import test as test_config
    from ddpm_jax import experiment, train_state

    path = tmp_path_factory.mktemp("model")
    config = test_config.get_config()
    state = train_state.create(jax.random.key(0), config, experiment.create_model(config))
    train_state.save_pretrained(str(path), jax.device_get(state.params), config)
    return str(path)


def pytest_runtest_setup(item):
    """Before a torch-marked test: make torchvision importable (pytorch-fid, diffusers use it)."""
    if item.get_closest_marker("torch") is not None:
        _import_torchvision_without_ops()


def _import_torchvision_without_ops():
    """PyPI's torchvision is built against CUDA torch; beside torch's CPU build its C ops don't
    load, and its import then fails registering fake kernels for two of them (nms, qnms).
    Defining those two op schemas lets the pure-python rest (models, transforms) import."""
    import importlib.util
    import sys

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_torchvision_without_ops.library = library  # dropping it would undefine them
        import torchvision  # noqa: F401
