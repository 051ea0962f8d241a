"""`python -m ddpm_jax.main COMMAND ...`: the same as the `ddpm-jax` console script (see cli.py)."""

from ddpm_jax import cli

if __name__ == "__main__":
    cli.run()
