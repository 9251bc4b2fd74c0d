"""Experiment 4 of the paper (McCallum & Foster, arXiv 2410.11648): a Neural ODE fitted
to a chaotic double pendulum with adaptive steps. The paper used laboratory recordings;
this script simulates the system instead: unit masses and lengths, g = 9.81, released
at rest from θ = (π/2, π/2); the state (θ1, θ2, ω1, ω2) scaled by 1/10 (the paper scaled
its recordings likewise) on a grid of 500 points of t in [0, 2].

The model is the paper's autonomous MLP, solved with `Bosh3` and
`PIDController(rtol=1e-6, atol=1e-6)`, `max_steps = 1 000`, `SaveAt(steps=True)`; the
step outputs are linearly interpolated onto the grid for the loss. It trains as
`Reversible(Bosh3())` (default coupling, and the paper's λ = 0.999) and as
`Bosh3()` under `RecursiveCheckpointAdjoint` with c = 44 (Diffrax's default for
1 000 steps), 32, 16, 8, 4, 2.

    python benchmarks/paper/double_pendulum.py --quick   # 200 training steps
    python benchmarks/paper/double_pendulum.py --full    # 10 000, as the paper

c = 2 trains a twentieth of the steps (in `--quick`, ten) and its runtime is scaled up
from its measured cost per step. Adaptive steps make the cost per step depend on the
model, so this scaling is rougher here than on constant steps.
"""

import _common as common
import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr


POINTS, T1, SCALE, MAX_STEPS = 500, 2.0, 0.1, 1000
CHECKPOINTS = (44, 32, 16, 8, 4, 2)
PAPER = {
    "Reversible(Bosh3, λ=0.999)": ("21.9 min", "1.00x"),
    "Bosh3+RecursiveCheckpoint(c=32)": ("62.4 min", "2.85x"),
    "Bosh3+RecursiveCheckpoint(c=2)": ("846 min", "38.6x"),
}


def double_pendulum(t, y, args):
    g = 9.81
    θ1, θ2, ω1, ω2 = y
    δ = θ1 - θ2
    den = 3 - jnp.cos(2 * δ)
    a1 = (
        -3 * g * jnp.sin(θ1)
        - g * jnp.sin(θ1 - 2 * θ2)
        - 2 * jnp.sin(δ) * (ω2**2 + ω1**2 * jnp.cos(δ))
    ) / den
    a2 = (2 * jnp.sin(δ) * (2 * ω1**2 + 2 * g * jnp.cos(θ1) + ω2**2 * jnp.cos(δ))) / den
    return jnp.stack([ω1, ω2, a1, a2])


def data():
    ts = jnp.linspace(0.0, T1, POINTS)
    y0 = jnp.array([jnp.pi / 2, jnp.pi / 2, 0.0, 0.0])
    return ts, SCALE * common.solve_exactly(double_pendulum, y0, ts)


def interpolate_steps(ts_steps, ys_steps, t0, y0, grid):
    """Linear interpolation of the step outputs (and the start) onto `grid`. Unused
    output slots (`inf`) are moved past the end of the grid, in increasing order."""
    count = ts_steps.shape[0]
    beyond = grid[-1] + 1.0 + jnp.arange(count, dtype=ts_steps.dtype)
    finite = jnp.isfinite(ts_steps)
    ts = jnp.concatenate([t0[None], jnp.where(finite, ts_steps, beyond)])
    ys = jnp.concatenate([y0[None], jnp.where(finite[:, None], ys_steps, 0.0)])
    return jax.vmap(lambda y: jnp.interp(grid, ts, y), in_axes=1, out_axes=1)(ys)


def main(argv=None):
    options, steps = common.command_line(
        "Experiment 4, double pendulum", (200, 10_000), bases=False, argv=argv
    )
    chunk = max(1, steps // 10)
    print(f"Experiment 4, double pendulum: {common.machine()}; {steps} steps")
    ts, ys = data()
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)

    def loss(model, solver, adjoint):
        ts_steps, ys_steps = common.solve_at_steps(
            model,
            solver,
            adjoint,
            ts=ts,
            y0=ys[0],
            controller=controller,
            max_steps=MAX_STEPS,
        )
        pred = interpolate_steps(ts_steps, ys_steps, ts[0], ys[0], ts)
        return jnp.mean((pred - ys) ** 2)

    model = common.MLPField(4, time_dependent=False, key=jr.key(0))
    configs = common.configurations(diffrax.Bosh3(), CHECKPOINTS)
    rows, models = common.train_interleaved(
        configs, loss, model, steps=steps, chunk=chunk
    )
    for row, config, trained in zip(rows, configs, models):
        # The cost of a solve grows with the steps the trained model needs.
        sol_ts, _ = common.solve_at_steps(
            trained,
            config["solver"],
            config["adjoint"],
            ts=ts,
            y0=ys[0],
            controller=controller,
            max_steps=MAX_STEPS,
        )
        row["solver_steps"] = int(jnp.isfinite(sol_ts).sum())
    print(f"\nload average at the end: {common.load()}\n")
    common.print_training_table(rows, PAPER)
    print(
        "\nAccepted steps of one solve with each trained model: "
        + ", ".join(f"{row['config']} {row['solver_steps']}" for row in rows)
    )
    common.write_json(
        common.run_name("double_pendulum", options),
        dict(machine=common.machine(), steps=steps, results={"Bosh3": rows}),
    )


if __name__ == "__main__":
    main()
