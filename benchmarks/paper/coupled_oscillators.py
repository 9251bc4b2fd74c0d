"""Experiment 3 of the paper (McCallum & Foster, arXiv 2410.11648): a Neural ODE fitted
to two masses coupled by springs. The paper used laboratory recordings, which are not
redistributed; this script simulates the same system instead:

    x1'' = -k x1 + k_c (x2 - x1) - d x1',    x2'' = -k x2 - k_c (x2 - x1) - d x2',

with k = 4, k_c = 2, a little damping d = 0.05, unit masses, from x = (0.5, 0), at rest;
the state (x1, x2, v1, v2) is observed with Gaussian noise of standard deviation 0.01 at
500 points of t in [0, 3] (n = 499 steps). The vector field is the paper's autonomous
MLP. Each base (Euler, Midpoint, Ralston3, RK4) trains as `Reversible(base)` (default
coupling, and the paper's λ = 0.999) and under `RecursiveCheckpointAdjoint` with
c = 31 (Diffrax's default for 499 steps), 16, 8, 4, 2.

    python benchmarks/paper/coupled_oscillators.py --quick   # 30 training steps
    python benchmarks/paper/coupled_oscillators.py --full    # 10 000, as the paper

c = 2 trains a twentieth of the steps (in `--quick`, two) and its runtime is scaled up
from its measured cost per step.
"""

import _common as common
import jax.numpy as jnp
import jax.random as jr


K, K_COUPLING, DAMPING, NOISE = 4.0, 2.0, 0.05, 0.01
POINTS, T1 = 500, 3.0
CHECKPOINTS = (31, 16, 8, 4, 2)
PAPER_RANGE = "reversible 2.0-3.0x faster than c = 31 over the four bases"


def oscillators(t, y, args):
    x1, x2, v1, v2 = y
    a1 = -K * x1 + K_COUPLING * (x2 - x1) - DAMPING * v1
    a2 = -K * x2 - K_COUPLING * (x2 - x1) - DAMPING * v2
    return jnp.stack([v1, v2, a1, a2])


def data():
    ts = jnp.linspace(0.0, T1, POINTS)
    ys = common.solve_exactly(oscillators, jnp.array([0.5, 0.0, 0.0, 0.0]), ts)
    return ts, ys + NOISE * jr.normal(jr.key(1), ys.shape, ys.dtype)


def main(argv=None):
    common.run_over_bases(
        "Experiment 3, coupled oscillators",
        "coupled_oscillators",
        fit=data(),
        state=4,
        time_dependent=False,
        checkpoints=CHECKPOINTS,
        steps=(30, 10_000),
        paper_note=f"Paper (laboratory data): {PAPER_RANGE}.",
        argv=argv,
    )


if __name__ == "__main__":
    main()
