"""Where the time of one reversible gradient step goes, for a given Neural ODE size.

    python benchmarks/profile_step.py                       # the "tiny" regime
    python benchmarks/profile_step.py --state 8 --width 64 --batch 32

Each row runs its operation 1000 times inside one compiled `lax.scan` and reports
the time per iteration (median of repeats): loop overhead counts, as in a solve.
"""

import argparse
import statistics
import time

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


def _time_per_iteration(fn, carry, iterations, repeats):
    @jax.jit
    def run(carry):
        return jax.lax.scan(lambda c, _: (fn(c), None), carry, length=iterations)[0]

    jax.block_until_ready(run(carry))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(carry))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", type=int, default=2)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()

    mlp = eqx.nn.MLP(
        options.state, options.state, options.width, 2, jnp.tanh, key=jr.PRNGKey(0)
    )
    term = diffrax.ODETerm(lambda t, y, args: jax.vmap(args)(y))
    y = jr.normal(jr.PRNGKey(1), (options.batch, options.state))
    solver = dr.Reversible(diffrax.Tsit5())
    fixed = dr.Reversible(diffrax.Tsit5(), coupling_parameter=0.999)
    base = diffrax.Tsit5()
    t0, t1 = 0.0, 1e-3

    def base_step(x):
        return solver.base_step(term, t0, t1, x, mlp)[0]

    def diffrax_base_step(x):
        return base.step(term, t0, t1, x, mlp, base.init(term, t0, t1, x, mlp), True)[0]

    def base_step_vjp(x):
        out, pull_back = eqx.filter_vjp(lambda x, m: base_step_of(x, m), x, mlp)
        return pull_back(out)[0]

    def base_step_of(x, m):
        return solver.base_step(term, t0, t1, x, m)[0]

    def diffrax_base_step_vjp(x):
        def step(x, m):
            state = base.init(term, t0, t1, x, m)
            return base.step(term, t0, t1, x, m, state, True)[0]

        out, pull_back = eqx.filter_vjp(step, x, mlp)
        return pull_back(out)[0]

    def reversible_step_with(solver):
        def step(yz):
            y, z = yz
            y, _, _, z, _ = solver.step(term, t0, t1, y, mlp, z, False)
            return y, z

        return step

    state = solver.init(term, t0, t1, y, mlp)

    def reverse_step(carry):
        # Parameter cotangents are accumulated, as in the backward pass, so that XLA
        # cannot drop their computation.
        (y, z), (y_bar, z_bar), mlp_bar = carry
        (y, z), (y_bar, z_bar, mlp_bar_step, _, _), _ = solver.reverse_step(
            term, t0, t1, y, z, mlp, y_bar, z_bar, None
        )
        mlp_bar = jax.tree_util.tree_map(lambda a, b: a + b, mlp_bar, mlp_bar_step)
        return (y, z), (y_bar, z_bar), mlp_bar

    def base_step_vjp_with_params(carry):
        x, mlp_bar = carry
        out, pull_back = eqx.filter_vjp(base_step_of, x, mlp)
        x_bar, mlp_bar_step = pull_back(out)
        mlp_bar = jax.tree_util.tree_map(lambda a, b: a + b, mlp_bar, mlp_bar_step)
        return x_bar, mlp_bar

    mlp_zeros = jax.tree_util.tree_map(
        jnp.zeros_like, eqx.filter(mlp, eqx.is_inexact_array)
    )

    rows = [
        ("vector field evaluation", lambda x: jax.vmap(mlp)(x), y),
        ("base step (Tsit5, unrolled)", base_step, y),
        ("base step (Tsit5, Diffrax's stage loop)", diffrax_base_step, y),
        ("VJP of a base step (unrolled)", base_step_vjp, y),
        ("VJP of a base step (Diffrax's stage loop)", diffrax_base_step_vjp, y),
        (
            "forward reversible step (2 base steps), automatic coupling",
            reversible_step_with(solver),
            (y, state),
        ),
        (
            "forward reversible step (2 base steps), coupling 0.999",
            reversible_step_with(fixed),
            (y, state),
        ),
        (
            "VJP of a base step, with parameter cotangents",
            base_step_vjp_with_params,
            (y, mlp_zeros),
        ),
        (
            "fused reverse step (2 base-step VJPs, with parameter cotangents)",
            reverse_step,
            ((y, state), (y, jax.tree_util.tree_map(jnp.ones_like, state)), mlp_zeros),
        ),
    ]
    print(
        f"Neural ODE vector field: MLP {options.state}->{options.width}->"
        f"{options.width}->{options.state}, batch {options.batch}, float32, "
        f"{jax.devices()[0].platform}\n"
    )
    print("| operation | time per iteration (µs) |")
    print("|---|---|")
    for name, fn, carry in rows:
        seconds = _time_per_iteration(fn, carry, 1000, options.repeats)
        print(f"| {name} | {seconds * 1e6:.2f} |")


if __name__ == "__main__":
    main()
