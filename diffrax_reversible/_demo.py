"""Differentiates a Neural ODE and a large-state PDE through a reversible solve, side by
side with what a Diffrax user runs today: `Tsit5()` with Diffrax's adjoints. Prints the
gradients' difference, the compiled memory and the time of one gradient. Run with
`python -m diffrax_reversible`."""

import argparse
import statistics
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array

from ._adjoint import ReversibleAdjoint
from ._misc import relative_error
from ._solver import Reversible


class _MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


class _ReactionDiffusion(eqx.Module):
    """A reaction-diffusion equation on a periodic grid, with a learnable stencil and
    reaction rate: a large state driven by a few parameters."""

    stencil: Array
    rate: Array

    def __call__(self, t, y, args):
        del t, args
        vertical, horizontal = self.stencil
        laplacian = vertical * (jnp.roll(y, 1, 0) + jnp.roll(y, -1, 0) - 2 * y)
        laplacian += horizontal * (jnp.roll(y, 1, 1) + jnp.roll(y, -1, 1) - 2 * y)
        return laplacian + self.rate * jnp.tanh(y)


class _Problem(eqx.Module):
    title: str = eqx.field(static=True)
    field: eqx.Module
    y0: Array
    t1: float = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    batched: bool = eqx.field(static=True)  # `y0` is a batch of initial states.

    def loss(self, field, y0, solver, adjoint):
        def solve(y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                solver,
                0.0,
                self.t1,
                self.t1 / self.steps,
                y0,
                adjoint=adjoint,
                max_steps=self.steps,
            ).ys

        ys = jax.vmap(solve)(y0) if self.batched else solve(y0)
        return jnp.mean((ys - 0.1) ** 2)


def _neural_ode(steps, batch, dtype, key):
    model_key, data_key = jr.split(key)
    mlp = eqx.nn.MLP(8, 8, 64, 1, activation=jnp.tanh, key=model_key, dtype=dtype)
    return _Problem(
        f"Neural ODE: MLP 8->64->8, batch {batch}, {steps} steps on [0, 1]",
        _MLPField(mlp),
        jr.normal(data_key, (batch, 8), dtype),
        1.0,
        steps,
        batched=True,
    )


def _reaction_diffusion(steps, size, dtype):
    x = jnp.linspace(0, 2 * jnp.pi, size, dtype=dtype)
    return _Problem(
        f"Reaction-diffusion PDE: {size}x{size} grid, learnable stencil, "
        f"{steps} steps on [0, 5]",
        _ReactionDiffusion(jnp.array([0.2, 0.1], dtype), jnp.array(0.5, dtype)),
        jnp.sin(x)[:, None] * jnp.cos(2 * x)[None, :],
        5.0,
        steps,
        batched=False,
    )


# (name, whether the solver is `Reversible(Tsit5())`, adjoint)
_DEFAULT = (
    "Tsit5() + RecursiveCheckpointAdjoint (Diffrax's default)",
    False,
    diffrax.RecursiveCheckpointAdjoint(),
)
_OURS = ("Reversible(Tsit5()) + ReversibleAdjoint", True, ReversibleAdjoint())
_EVERY_ADJOINT = (
    _DEFAULT,
    ("Tsit5() + DirectAdjoint", False, diffrax.DirectAdjoint()),
    ("Tsit5() + BacksolveAdjoint", False, diffrax.BacksolveAdjoint()),
    _OURS,
)


def _status(message):
    # A progress line that the next one overwrites, where the terminal allows.
    if sys.stdout.isatty():
        print(f"\r\033[K{message}", end="", flush=True)


def _measure(problem, name, reversible, adjoint, repeats):
    solver = Reversible(diffrax.Tsit5()) if reversible else diffrax.Tsit5()
    grad = eqx.filter_jit(
        eqx.filter_grad(lambda f, y0: problem.loss(f, y0, solver, adjoint))
    )
    _status(f"  compiling {name} ...")
    start = time.perf_counter()
    compiled = grad.lower(problem.field, problem.y0).compile()
    compile_time = time.perf_counter() - start
    temp_bytes = compiled.compiled.memory_analysis().temp_size_in_bytes
    times = []
    for i in range(repeats + 1):  # The first call is not timed: it allocates.
        _status(f"  running {name} ({i + 1}/{repeats + 1}) ...")
        start = time.perf_counter()
        grads = jax.block_until_ready(compiled(problem.field, problem.y0))
        times.append(time.perf_counter() - start)
    _status("")
    return grads, temp_bytes, compile_time, statistics.median(times[1:])


def _compare(problem, adjoints, repeats):
    print(problem.title)
    rows = []
    reference = None
    for name, reversible, adjoint in adjoints:
        grads, temp_bytes, compile_time, run_time = _measure(
            problem, name, reversible, adjoint, repeats
        )
        if reference is None:
            reference = grads
        difference = float(relative_error(grads, reference))
        rows.append((name, difference, temp_bytes / 2**20, compile_time, run_time))
    print(
        "| adjoint | gradient rel. diff vs Diffrax's default | temp memory (MiB) "
        "| compile (s) | gradient (s) |"
    )
    print("|---|---|---|---|---|")
    for name, difference, mib, compile_time, run_time in rows:
        print(
            f"| {name} | {difference:.1e} | {mib:.2f} | {compile_time:.1f} "
            f"| {run_time:.3f} |"
        )
    *others, (_, _, our_mib, _, our_time) = rows
    for name, _, mib, _, run_time in others:
        print(
            f"{name}: {mib / our_mib:.1f}x the memory of ReversibleAdjoint, "
            f"{run_time / our_time:.2f}x its gradient time"
        )
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ode-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pde-steps", type=int, default=2000)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--seed", type=int, default=5678)
    options = parser.parse_args(argv)
    if options.float64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if options.float64 else jnp.float32
    print(
        f"diffrax-reversible demo: one gradient each, {jnp.dtype(dtype).name}, "
        f"{jax.devices()[0].platform}, median of {options.repeats} runs after "
        "compilation. 'gradient rel. diff' is against Tsit5() + "
        "RecursiveCheckpointAdjoint: Reversible(Tsit5()) is a different discretisation "
        "of the same ODE, of the same order.\n"
    )
    neural_ode = _neural_ode(
        options.ode_steps, options.batch, dtype, jr.PRNGKey(options.seed)
    )
    _compare(neural_ode, _EVERY_ADJOINT, options.repeats)
    # Diffrax's default only: each program takes seconds to compile, and the demo
    # should take under a minute.
    pde = _reaction_diffusion(options.pde_steps, options.grid, dtype)
    _compare(pde, (_DEFAULT, _OURS), options.repeats)


if __name__ == "__main__":
    main()
