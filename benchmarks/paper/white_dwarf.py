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

c = 2 trains a twentieth of the steps (in `--quick`, one) and its runtime is scaled up
from its measured cost per step: a full run of it takes hours, as in the paper.
"""

import argparse

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="30 training steps")
    mode.add_argument("--full", action="store_true", help="1 000 training steps")
    parser.add_argument("--bases", nargs="+", default=list(common.BASES))
    parser.add_argument("--steps", type=int, help="override the training steps")
    options = parser.parse_args(argv)
    steps = options.steps or (1000 if options.full else 30)
    chunk = max(1, steps // 10)
    print(f"Experiment 2, white dwarf: {common.machine()}; {steps} training steps")
    ts, ys = data()

    def loss(model, solver, adjoint):
        return common.mse_at_steps(model, solver, adjoint, ts=ts, ys=ys)

    results = {}
    for base in options.bases:
        print(f"\n{base}, load {common.load()}")
        model = common.MLPField(2, time_dependent=True, key=common.key(0))
        configs = common.configurations(base, CHECKPOINTS, short_fraction=1 / 20)
        results[base] = common.train_interleaved(
            configs, loss, model, steps=steps, chunk=chunk
        )
    print(f"\nload average at the end: {common.load()}")
    for base, rows in results.items():
        print(f"\n### {base}\n")
        common.print_training_table(rows, PAPER if base == "Euler" else None)
    print(f"\nPaper: {PAPER_RANGE}.")
    common.write_json(
        f"white_dwarf_{'full' if options.full else 'quick'}",
        dict(machine=common.machine(), steps=steps, results=results),
    )


if __name__ == "__main__":
    main()
