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
