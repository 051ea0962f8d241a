"""Every documented launcher trains under stand-ins for the cluster tools, with a data_dir set.

* launch/local_multiprocess.sh runs as it is: 2 CPU processes x 2 devices over loopback.
* launch/gpu_slurm.sbatch runs under bash, as `sbatch` would run it, with the SLURM variables of
  a batch step and a stand-in `srun` that starts its 2 tasks on this machine with the variables
  a real job step has; JAX's own SLURM detection then connects them.
* launch/tpu_pod.sh runs against a stand-in `gcloud` whose 2 "TPU VM workers" are home
  directories on this machine: `ssh --worker=all` runs the command with bash once per worker,
  with the topology in JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (as a TPU
  VM's metadata would supply it), and `storage rsync` copies locally. The workers' `python3` turns
  `pip install` into a recorded no-op. The workdir is a local directory standing in for gs://
  (the gs:// path layer is tested in tests/test_files.py).

Each launcher trains 2 steps of configs/test.py (one resolution level: compiles dominate) and
must leave a checkpoint whose saved config carries the data_dir given on the command line.
The first tests check that command-line override itself for every optional config field.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from configs import default
from ddpm_jax import input_pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("[!_]*.py"))
JOB_TIMEOUT_S = 240
NUM_STEPS = 2
TRAIN_FLAGS = (
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.model.ch_mult=(1,)",
    "--config.model.attn_resolutions=()",
)

# One xdist worker runs the module (--dist loadgroup): the launchers' processes share 2 cores.
pytestmark = pytest.mark.xdist_group("launch")


# ----------------------------------------------------------------------------------------------
# Optional config fields can be set from the command line (ml_collections cannot override a
# field whose default is a bare None): every launcher sets config.data.data_dir.

_VALUES = {str: "/some/dir", int: "3", float: "0.5", bool: "true"}


def _parse(config_file: Path, *overrides: str):
    """The config as `--config=FILE --config.a.b=v ...` gives it (the trainer's flag parsing)."""
    argv = ["prog", f"--config={config_file}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _unset_fields(config, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose value is None."""
    names = []
    for key, value in config.items():
        if hasattr(value, "items"):
            names += _unset_fields(value, f"{prefix}{key}.")
        elif value is None:
            names.append(prefix + key)
    return names


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _field_type(config, dotted: str) -> type:
    section, _, field = dotted.rpartition(".")
    return (_get(config, section) if section else config).get_type(field)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader
@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.name)
def test_every_unset_config_field_can_be_set_from_the_command_line(config_file):
    config = _parse(config_file)
    for name in {"data.data_dir", *_unset_fields(config)}:  # data_dir: every launcher sets it
        value = _VALUES.get(_field_type(config, name), "x")
        overridden = _parse(config_file, f"--config.{name}={value}")
        assert str(_get(overridden, name)).lower() == value, name


def test_unset_data_dir_is_the_tfds_default(monkeypatch, tmp_path):
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))  # nothing prepared here
    for data_dir in (None, ""):  # the config's placeholder, or what an empty DATA_DIR gives
        data = default.get_config().data
        data.update(name="mnist", image_size=28, data_dir=data_dir)
        with pytest.raises(FileNotFoundError, match=f"default tfds data_dir {tmp_path}"):
            input_pipeline.load_source(data)


# ----------------------------------------------------------------------------------------------
# Helpers for the launchers


def _free_port(low: int = 0, high: int = 0) -> int:
    """A free loopback port, in [low, high] when given."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randint(low, high) if high else 0))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def _write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _environment(**variables: str) -> dict[str, str]:
    """This environment without cluster settings, importing the package from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "OMPI_"))}
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices: each launcher sets its own
    return env | {"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"} | variables


def _run(command: list[str], *, env: dict, cwd: Path, log: Path) -> None:
    """Runs a launcher to its end (bounded); fails the test with its output if it fails."""
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                command, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                timeout=JOB_TIMEOUT_S, start_new_session=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command[0]} ran over {JOB_TIMEOUT_S}s:\n{_tail(log)}")
    assert proc.returncode == 0, f"{command[0]} exited {proc.returncode}:\n{_tail(log)}"


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _assert_trained(workdir: Path, data_dir: str, log: str = "") -> None:
    """A checkpoint of the last step whose saved config holds the data_dir given."""
    step_dir = workdir / "checkpoints" / str(NUM_STEPS)
    assert step_dir.is_dir(), f"no checkpoint {step_dir}\n{log}"
    # The config is saved with the checkpoint as JSON (orbax's JsonCheckpointHandler).
    saved = json.loads((step_dir / "config" / "metadata").read_text())
    assert saved["data"]["data_dir"] == data_dir
    assert saved["train"]["num_steps"] == NUM_STEPS


def _assert_one_job(log: str) -> None:
    """Both processes joined one job of 2 x 2 devices (ddpm_jax.distributed.log_topology)."""
    for i in range(2):
        assert f"process {i}/2: 2 local devices, 4 global devices" in log, log[-3000:]


# ----------------------------------------------------------------------------------------------
# launch/local_multiprocess.sh, as it is


@pytest.mark.multiprocess
def test_local_multiprocess_trains_two_processes(tmp_path):
    workdir, data_dir = tmp_path / "run", str(tmp_path / "data")
    command = [
        str(REPO / "launch" / "local_multiprocess.sh"),
        "2",
        "train",
        "--config",
        "configs/test.py",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *TRAIN_FLAGS,
    ]
    log = tmp_path / "launcher.log"
    _run(command, env=_environment(PYTHON=sys.executable), cwd=REPO, log=log)
    text = log.read_text(errors="replace")
    _assert_one_job(text)
    _assert_trained(workdir, data_dir, _tail(log))


# ----------------------------------------------------------------------------------------------
# launch/gpu_slurm.sbatch under a stand-in srun

# What a job step's tasks see (JAX's SlurmCluster reads SLURM_JOB_ID, SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; ddpm_jax reads SLURM_STEP_NUM_TASKS). Each task
# gets 2 fake CPU devices in place of GPUs.
FAKE_SRUN = """#!{python}
import os, subprocess, sys, time

args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.environ["FAKE_SRUN_RECORD"], "a") as f:
    f.write(" ".join(options) + "\\n")
ntasks = int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for i in range(ntasks):
    env = dict(os.environ)
    env.update(
        SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_NTASKS=str(ntasks),
        SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="localhost", SLURM_PROCID=str(i),
        SLURM_LOCALID=str(i), SLURM_NODEID="0", JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    procs.append(subprocess.Popen(args, env=env))
while any(p.poll() is None for p in procs):  # --kill-on-bad-exit: a failure stops the rest
    if "--kill-on-bad-exit=1" in options and any(p.poll() not in (None, 0) for p in procs):
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.2)
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""


def _venv(tmp_path: Path) -> Path:
    """The virtual environment running the tests, or a stand-in whose `python` is this one."""
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        return Path(sys.prefix)
    venv = tmp_path / "venv"
    _write_script(venv / "bin" / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    return venv


@pytest.mark.multiprocess
def test_gpu_slurm_sbatch_trains_under_srun(tmp_path):
    fake_bin = tmp_path / "bin"
    _write_script(fake_bin / "srun", FAKE_SRUN.format(python=sys.executable))
    workdir, data_dir = tmp_path / "run", str(tmp_path / "data")
    port = _free_port(65536 - 2**12, 65535)  # JAX's SLURM port: 61440 + job id % 4096
    env = _environment(
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        FAKE_SRUN_RECORD=str(tmp_path / "srun.txt"),
        WORKDIR=str(workdir),
        CONFIG="test.py",
        VENV=str(_venv(tmp_path)),
        DATA_DIR=data_dir,
        # What sbatch sets for the batch script (one node, 2 tasks of 1 GPU).
        SLURM_JOB_ID=str(4096 * 1000 + port - (65536 - 2**12)),
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_GPUS_ON_NODE="2",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    log = tmp_path / "ddpm-jax.log"
    _run(
        ["bash", str(REPO / "launch" / "gpu_slurm.sbatch"), *TRAIN_FLAGS],
        env=env,
        cwd=REPO,
        log=log,
    )
    assert (tmp_path / "srun.txt").read_text().split() == ["--kill-on-bad-exit=1"]
    _assert_one_job(log.read_text(errors="replace"))  # through JAX's SLURM detection
    _assert_trained(workdir, data_dir, _tail(log))


# ----------------------------------------------------------------------------------------------
# launch/tpu_pod.sh against a stand-in gcloud

NUM_WORKERS = 2

FAKE_GCLOUD = """#!{python}
import os, shutil, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_GCLOUD_ROOT"])
args = sys.argv[1:]
with open(root / "calls.txt", "a") as f:
    f.write(repr(args) + "\\n")
if args[:2] == ["storage", "rsync"]:  # run on a worker: gs:// is a local directory here
    source, dest = args[-2:]
    shutil.copytree(source, dest, dirs_exist_ok=True)
    sys.exit(0)
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, name, rest = args[3], args[4], args[5:]
workers = [root / f"worker{{i}}" for i in range({num_workers})]
if verb == "describe":
    sys.exit(0 if (root / "created").exists() else 1)
if verb == "create":
    (root / "created").write_text(name)
    for home in workers:
        home.mkdir(exist_ok=True)
    sys.exit(0)
if verb == "scp":  # scp SOURCE NAME:DEST ... --worker=all
    source, dest = args[4], args[5].split(":", 1)[1]
    for home in workers:
        shutil.copy(source, home / dest)
    sys.exit(0)
if verb == "ssh":  # ssh NAME ... --worker=all --command CMD
    assert "--worker=all" in rest, rest
    command = rest[rest.index("--command") + 1]
    status = 0
    for i, home in enumerate(workers):
        env = dict(os.environ)
        env.update(
            HOME=str(home), PATH=f"{{home}}/bin:{{os.environ['PATH']}}", JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_COORDINATOR_ADDRESS=os.environ["FAKE_TPU_COORDINATOR"],
            JAX_NUM_PROCESSES="{num_workers}", JAX_PROCESS_ID=str(i),
        )
        status = status or subprocess.run(["bash", "-c", command], env=env, cwd=home).returncode
    sys.exit(status)
sys.exit(f"fake gcloud: unexpected {{args}}")
"""

# A worker's python3: `-m pip ...` is recorded, not run; the rest runs this Python on the
# worker's copy of the code, and its exit status is recorded.
FAKE_PYTHON3 = """#!/bin/bash
if [[ "$1" == -m && "$2" == pip ]]; then
  echo "${{*:3}}" >> "$HOME/pip.txt"
  exit 0
fi
PYTHONPATH="$HOME/ddpm_jax" {python} "$@"
status=$?
echo "$status $*" >> "$HOME/python.txt"
exit $status
"""


def _snapshot_repository(dest: Path) -> Path:
    """This checkout's files (committed or not) as the HEAD of a new repository: the archive
    tpu_pod.sh copies to the workers then holds the code under test."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((REPO / name).read_bytes())
            (dest / name).chmod((REPO / name).stat().st_mode)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + step, cwd=dest, check=True, capture_output=True)
    return dest


def _wait_for_workers(homes: list[Path]) -> list[str]:
    """Each worker's recorded training exit, waiting (bounded) for the detached processes."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    records = [home / "python.txt" for home in homes]
    while not all(r.exists() for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = "\n".join(_tail(home / "ddpm_train.log", 30) for home in homes)
    assert all(r.exists() for r in records), f"workers ran over {JOB_TIMEOUT_S}s:\n{logs}"
    return [r.read_text() for r in records]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.multiprocess
def test_tpu_pod_sh_trains_on_every_worker(tmp_path):
    checkout = _snapshot_repository(tmp_path / "checkout")
    fake_root, fake_bin = tmp_path / "gcloud", tmp_path / "bin"
    fake_root.mkdir()
    _write_script(
        fake_bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable, num_workers=NUM_WORKERS)
    )
    data_gcs = tmp_path / "bucket" / "tensorflow_datasets"
    (data_gcs / "cifar10").mkdir(parents=True)
    (data_gcs / "cifar10" / "marker").write_text("prepared")
    workdir = tmp_path / "run 1"  # a space: the remote command quotes the workdir
    env = _environment(
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        FAKE_GCLOUD_ROOT=str(fake_root),
        FAKE_TPU_COORDINATOR=f"127.0.0.1:{_free_port()}",
        TPU_NAME="ddpm-test",
        ZONE="test-zone",
        WORKDIR=str(workdir),
        CONFIG="test.py",
        DATA_GCS=str(data_gcs),
        DATA_DIR="$HOME/tfds",  # expanded on the workers, as the script's header says
    )
    log = tmp_path / "tpu_pod.log"
    homes = [fake_root / f"worker{i}" for i in range(NUM_WORKERS)]
    for home in homes:
        _write_script(home / "bin" / "python3", FAKE_PYTHON3.format(python=sys.executable))
    pids = []
    try:
        _run(["bash", str(checkout / "launch" / "tpu_pod.sh"), *TRAIN_FLAGS], env=env,
             cwd=tmp_path, log=log)  # fmt: skip
        pids = _started_pids(log.read_text(errors="replace"))
        assert len(pids) == NUM_WORKERS, _tail(log)
        records = _wait_for_workers(homes)
    finally:  # the script returns once the workers started: none may outlive the test
        _kill(pids or _started_pids(log.read_text(errors="replace")))
    for i, (home, record) in enumerate(zip(homes, records)):
        status, _, args = record.strip().partition(" ")
        assert status == "0", f"worker {i} exited {status}:\n{_tail(home / 'ddpm_train.log')}"
        assert args.startswith("-m ddpm_jax.main train --config configs/test.py"), args
        assert f"--config.data.data_dir={home}/tfds" in args
        assert (home / "tfds" / "cifar10" / "marker").read_text() == "prepared"  # DATA_GCS
        pip = (home / "pip.txt").read_text().splitlines()
        assert pip == [
            "install -q -U pip",
            f"install -q jax[tpu] gcsfs google-cloud-storage {home}/ddpm_jax",
        ]
        # The archive held this checkout's code.
        assert (home / "ddpm_jax" / "ddpm_jax" / "distributed.py").read_bytes() == (
            REPO / "ddpm_jax" / "distributed.py"
        ).read_bytes()
    _assert_one_job("".join((home / "ddpm_train.log").read_text() for home in homes))
    _assert_trained(workdir, f"{homes[0]}/tfds", _tail(homes[0] / "ddpm_train.log"))
    calls = (fake_root / "calls.txt").read_text()
    assert "'create', 'ddpm-test', '--zone', 'test-zone'" in calls


def _started_pids(text: str) -> list[int]:
    """The pids tpu_pod.sh reports for the detached workers ("<host>: started (pid N), ...")."""
    return [
        int(re.search(r"\(pid (\d+)\)", line)[1]) for line in text.splitlines() if "(pid " in line
    ]
