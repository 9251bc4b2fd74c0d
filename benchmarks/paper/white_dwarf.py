"""Experiment 2 of the paper (McCallum & Foster, arXiv 2410.11648): a Neural ODE fitted
to the Chandrasekhar white dwarf equation,

    y1' = y2,    y2' = -(y1^2 - C)^(3/2) - 2 y2 / (t + 0.5),    C = 0.001,  y0 = (1, 0),

on t in [0, 5] with dt = 0.005 (n = 1 000 steps), the data the true solution at every
step. The vector field is the paper's MLP fed (t, y). Each base (Euler, Midpoint,
Ralston3, RK4) trains as `Reversible(base)` (default coupling, and the paper's
λ = 0.999) and under `RecursiveCheckpointAdjoint` with c = 44 (Diffrax's default for
1 000 steps), 32, 16, 8, 4, 2.

    python benchmarks/paper/white_dwarf.py --quick    # 30 training steps
    python benchmarks/paper/white_dwarf.py --full     # 1 000, as the paper

c = 2 trains a twentieth of the steps (in `--quick`, two) and its runtime is scaled up
from its measured cost per step: a full run of it takes hours, as in the paper.
"""

import _common as common
import jax.numpy as jnp


C = 0.001
T1 = 5.0
DT = 0.005
CHECKPOINTS = (44, 32, 16, 8, 4, 2)
# The paper's Figure/Table for this experiment gives the Euler runtimes in minutes and
# the range of the ratio over the four bases.
PAPER = {
    "Reversible(Euler, λ=0.999)": ("1.52 min", "1.00x"),
    "Euler+RecursiveCheckpoint(c=44)": ("5.22 min", "3.43x"),
}
PAPER_RANGE = "reversible 2.2-3.4x faster than c = 44 over the four bases, equal loss"


def white_dwarf(t, y, args):
    t = t + 0.5
    return jnp.stack([y[1], -((y[0] ** 2 - C) ** 1.5) - 2 * y[1] / t])


def data():
    ts = jnp.linspace(0.0, T1, round(T1 / DT) + 1)
    return ts, common.solve_exactly(white_dwarf, jnp.array([1.0, 0.0]), ts)


def main(argv=None):
    common.run_over_bases(
        "Experiment 2, white dwarf",
        "white_dwarf",
        fit=data(),
        state=2,
        time_dependent=True,
        checkpoints=CHECKPOINTS,
        steps=(30, 1000),
        paper=PAPER,
        paper_note=f"Paper: {PAPER_RANGE}.",
        argv=argv,
    )


if __name__ == "__main__":
    main()
