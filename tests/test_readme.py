"""README.md's code: the Python example runs as written, and its command lines parse and run."""

from __future__ import annotations

import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(language: str) -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_python_example_runs_and_draws_uint8_images():
    (block,) = _blocks("python")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    images = np.asarray(namespace["images"])
    assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8
    assert namespace["x_t"].shape == (16, 8, 8, 1)


def test_the_set_up_commands_are_what_ci_runs():
    blocks = [b.strip() for b in _blocks("")]
    assert blocks[0] == (
        "pip install -e . && ddpm-jax train --config configs/digits.py --workdir runs/digits"
    )
    assert blocks[1] == 'pip install -e ".[test]" && python -m pytest -n 2'
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "grep -m1 '^pip install -e \"\\.\\[test\\]\"' README.md" in f.read()


def _commands(section: str) -> list[str]:
    """The `ddpm-jax ...` lines of the first bash block after `section`, continuations joined."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = re.search(r"```bash\n(.*?)```", text[text.index(section) :], flags=re.S).group(1)
    block = block.replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip().startswith("ddpm-jax ")]


def test_the_sampling_section_commands_run_on_a_small_checkpoint(workdir, tmp_path):
    """README's sample / eval / export lines, on the tiny test checkpoint and small counts."""
    import shlex
    import subprocess
    import sys

    lines = _commands("## Sampling, likelihood, FID and pretrained weights")
    assert len(lines) == 5, lines
    # A line with [optional flags] runs as it is and with them.
    optional = [re.sub(r"\[(.*?)\]", r"\1", line) for line in lines if "[" in line]
    lines = [re.sub(r"\[.*?\]", "", line) for line in lines] + optional
    small = {"--num_samples": "16", "--batch_size": "8"}
    for line in lines:
        line = line.replace("runs/digits", workdir).replace("runs/ddpm-cifar10", workdir)
        args = shlex.split(line, comments=True)[1:]
        args = [small.get(prev, arg) for prev, arg in zip(["", *args[:-1]], args, strict=True)]
        args = [str(tmp_path / "exported") if a == "exported/" else a for a in args]
        if args[0] == "eval" and "--split" in args:
            args += ["--num_examples", "8", "--batch_size", "8"]
        result = subprocess.run(
            [sys.executable, "-m", "ddpm_jax.main", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        assert result.returncode == 0, (line, result.stderr[-2000:])
    assert os.path.isfile(tmp_path / "exported" / "diffusion_pytorch_model.safetensors")
