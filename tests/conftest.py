"""Test setup: several fake CPU devices, set before anything imports jax."""

import os

# Eight host-platform devices let pmap/shard tests run on a CPU-only machine. This must
# happen before jax is first imported, which is why it lives at the top of conftest.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
