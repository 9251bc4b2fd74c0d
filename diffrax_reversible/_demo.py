"""Differentiates a small Neural ODE through a reversible solve, side by side with
Diffrax's default adjoint. Run with `python -m diffrax_reversible`."""

import argparse
import statistics
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._adjoint import ReversibleAdjoint
from ._misc import relative_error
from ._solver import Reversible


class _Func(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


def _make_loss(adjoint, num_steps, data_dim):
    def loss(model, y0s):
        def solve(y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(model),
                Reversible(diffrax.Tsit5()),
                0.0,
                1.0,
                1.0 / num_steps,
                y0,
                saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 5, dtype=y0.dtype)),
                adjoint=adjoint,
                max_steps=num_steps,
            ).ys

        ys = jax.vmap(solve)(y0s)
        target = jnp.sin(jnp.arange(data_dim, dtype=ys.dtype))
        return jnp.mean((ys - target) ** 2)

    return loss


def _measure(adjoint, model, y0s, num_steps, repeats):
    grad = eqx.filter_jit(eqx.filter_grad(_make_loss(adjoint, num_steps, y0s.shape[1])))
    start = time.perf_counter()
    compiled = grad.lower(model, y0s).compile()
    compile_time = time.perf_counter() - start
    temp_bytes = compiled.compiled.memory_analysis().temp_size_in_bytes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grads = jax.block_until_ready(compiled(model, y0s))
        times.append(time.perf_counter() - start)
    return grads, temp_bytes, compile_time, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data-dim", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--seed", type=int, default=5678)
    options = parser.parse_args(argv)
    if options.float64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if options.float64 else jnp.float32

    model_key, data_key = jr.split(jr.PRNGKey(options.seed))
    mlp = eqx.nn.MLP(
        options.data_dim,
        options.data_dim,
        options.width,
        2,
        activation=jnp.tanh,
        key=model_key,
        dtype=dtype,
    )
    model = _Func(mlp)
    y0s = jr.normal(data_key, (options.batch, options.data_dim), dtype)

    print(
        f"Neural ODE: MLP {options.data_dim}->{options.width}->{options.width}->"
        f"{options.data_dim}, batch {options.batch}, {options.steps} steps of "
        f"Reversible(Tsit5()), {jnp.dtype(dtype).name}, {jax.devices()[0].platform}"
    )
    rows = []
    reference = None
    for name, adjoint in [
        (
            "RecursiveCheckpointAdjoint (Diffrax's default)",
            diffrax.RecursiveCheckpointAdjoint(),
        ),
        ("DirectAdjoint (stores the solve)", diffrax.DirectAdjoint()),
        ("ReversibleAdjoint", ReversibleAdjoint()),
    ]:
        grads, temp_bytes, compile_time, run_time = _measure(
            adjoint, model, y0s, options.steps, options.repeats
        )
        if reference is None:
            reference = grads
        rows.append(
            (
                name,
                float(relative_error(grads, reference)),
                temp_bytes / 2**20,
                compile_time,
                run_time,
            )
        )

    header = (
        "| adjoint | gradient rel. diff vs default | temp memory (MiB) "
        "| compile (s) | gradient (s) |"
    )
    print(header)
    print("|---|---|---|---|---|")
    for name, diff, mib, compile_time, run_time in rows:
        print(
            f"| {name} | {diff:.2e} | {mib:.2f} | {compile_time:.2f} | {run_time:.3f} |"
        )
    reversible = rows[-1]
    for name, _, mib, _, run_time in rows[:-1]:
        print(
            f"vs {name}: {mib / reversible[2]:.1f}x the memory, "
            f"{run_time / reversible[4]:.2f}x the gradient time of ReversibleAdjoint"
        )


if __name__ == "__main__":
    main()
