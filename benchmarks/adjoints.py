"""Gradient time and memory of `ReversibleAdjoint` side by side with Diffrax's adjoints.

    python benchmarks/adjoints.py --quick     # under a minute
    python benchmarks/adjoints.py             # every regime and step count
    python benchmarks/adjoints.py --sde       # the Neural SDE regimes only

Prints markdown tables and writes the numbers to `benchmarks/results/adjoints.json`.
Timings are medians over repeats after compilation; memory is the temporary memory of
the compiled XLA program (`memory_analysis()`), which is deterministic.

Configuration names are templates on the base solver (`{base}`, Tsit5 unless a regime
says otherwise); `label(config, base)` spells one out. The float64 reference gradients
need `jax_enable_x64`: `main()` turns it on, and so must a caller of `measure`.
"""

import argparse
import functools as ft
import json
import os
import pathlib
import platform
import statistics
import time

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
from diffrax_reversible._misc import relative_error


REVERSIBLE = "Reversible({base})+ReversibleAdjoint"
LOOPED_STAGES = 'Reversible({base}, scan_kind="checkpointed")+ReversibleAdjoint'
# Every stage's activations alive in the backward pass: the default on small states.
UNROLLED_STAGES = "Reversible({base}, per_stage_vjp=False)+ReversibleAdjoint"
# What the default reconstruction check asks for on long float32 solves.
AUTO_CHECKPOINTS = 'Reversible({base})+ReversibleAdjoint(checkpoint_every="auto")'
CONFIGS = {
    REVERSIBLE: (True, dr.ReversibleAdjoint),
    LOOPED_STAGES: ("checkpointed", dr.ReversibleAdjoint),
    UNROLLED_STAGES: (dict(per_stage_vjp=False), dr.ReversibleAdjoint),
    AUTO_CHECKPOINTS: (True, ft.partial(dr.ReversibleAdjoint, checkpoint_every="auto")),
    "Reversible({base})+RecursiveCheckpoint": (
        True,
        diffrax.RecursiveCheckpointAdjoint,
    ),
    "{base}+RecursiveCheckpoint": (False, diffrax.RecursiveCheckpointAdjoint),
    "{base}+Backsolve": (False, diffrax.BacksolveAdjoint),
    "{base}+Direct": (False, diffrax.DirectAdjoint),
}


def label(config: str, base=diffrax.Tsit5) -> str:
    """The name of configuration `config` on base solver `base`."""
    return config.format(base=base.__name__)


class MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


class GridField(eqx.Module):
    """Diffusion on a periodic 2D grid plus a pointwise MLP reaction: a large state
    driven by a small network."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        laplacian = (
            (jnp.roll(y, 1, 0) + jnp.roll(y, -1, 0) + jnp.roll(y, 1, 1))
            + jnp.roll(y, -1, 1)
            - 4 * y
        )
        reaction = jax.vmap(jax.vmap(self.mlp))(y[..., None])[..., 0]
        return 0.1 * laplacian + reaction


def _solver(reversible, base_cls=diffrax.Tsit5):
    # `reversible`: False (the base alone), True (`Reversible` with its defaults), a
    # `scan_kind`, or keyword arguments of `Reversible`.
    if not reversible:
        return base_cls()
    if reversible is True:
        kwargs = {}
    elif isinstance(reversible, str):
        kwargs = dict(scan_kind=reversible)
    else:
        kwargs = reversible
    return dr.Reversible(base_cls(), **kwargs)


def _solve_unit_interval(terms, solver, y0, args, adjoint, steps, dtype):
    """`steps` constant steps over [0, 1]; returns the solution at t=1."""
    return diffrax.diffeqsolve(
        terms,
        solver,
        jnp.asarray(0.0, dtype),
        jnp.asarray(1.0, dtype),
        jnp.asarray(1.0 / steps, dtype),
        y0,
        args,
        adjoint=adjoint,
        max_steps=steps,
    ).ys


def neural_ode_problem(state, width, batch, steps, dtype, seed=5678):
    model_key, data_key = jr.split(jr.PRNGKey(seed))
    model = MLPField(
        eqx.nn.MLP(state, state, width, 2, jnp.tanh, key=model_key, dtype=dtype)
    )
    y0s = jr.normal(data_key, (batch, state), dtype)

    def loss(model, y0s, solver, adjoint):
        def solve(y0):
            return _solve_unit_interval(
                diffrax.ODETerm(model), solver, y0, None, adjoint, steps, dtype
            )

        return jnp.mean(jax.vmap(solve)(y0s) ** 2)

    return model, y0s, loss


def grid_problem(size, steps, dtype, seed=5678):
    model = GridField(
        eqx.nn.MLP(1, 1, 16, 1, jnp.tanh, key=jr.PRNGKey(seed), dtype=dtype)
    )
    x = jnp.linspace(0, 2 * jnp.pi, size, dtype=dtype)
    y0 = jnp.sin(x)[:, None] * jnp.cos(x)[None, :]

    def loss(model, y0, solver, adjoint):
        ys = _solve_unit_interval(
            diffrax.ODETerm(model), solver, y0, None, adjoint, steps, dtype
        )
        return jnp.mean(ys**2)

    return model, y0, loss


def _median_time(fn, *args, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _to_float64(tree):
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )


def measure(
    config,
    make_problem,
    *,
    repeats,
    run=True,
    reference=True,
    time_forward=True,
    base=diffrax.Tsit5,
):
    reversible, adjoint_cls = CONFIGS[config]
    solver, adjoint = _solver(reversible, base), adjoint_cls()
    model, data, loss = make_problem(jnp.float32)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    start = time.perf_counter()
    compiled = grad.lower(model, data, solver, adjoint).compile()
    row = {
        "config": label(config, base),
        "compile_s": time.perf_counter() - start,
        "temp_bytes": compiled.compiled.memory_analysis().temp_size_in_bytes,
    }
    if not run:
        return row
    if time_forward:
        forward = eqx.filter_jit(loss)
        jax.block_until_ready(forward(model, data, solver, adjoint))
        row["forward_s"] = _median_time(
            forward, model, data, solver, adjoint, repeats=repeats
        )
    try:
        jax.block_until_ready(compiled(model, data, solver, adjoint))  # warm up
    except Exception as error:  # how it surfaces depends on the jit in use
        if "reconstructed the forward solve" not in str(error):
            raise
        # The default `reconstruction_tol` stopped an inaccurate gradient: a result.
        row["stopped"] = "reconstruction_tol"
        return row
    row["grad_s"] = _median_time(
        compiled, model, data, solver, adjoint, repeats=repeats
    )
    if reference:
        # The float64 gradient of the same discrete solve (same solver), by
        # backpropagating through it.
        model64, data64, loss64 = make_problem(jnp.float64)
        model64, data64 = _to_float64((model, data))
        ref = eqx.filter_jit(eqx.filter_grad(loss64))(
            model64, data64, solver, diffrax.RecursiveCheckpointAdjoint()
        )
        grads = compiled(model, data, solver, adjoint)
        row["grad_rel_error"] = float(relative_error(grads, ref))
    return row


def print_table(title, rows, reversible=label(REVERSIBLE)):
    print(f"\n### {title}\n")
    print(
        "| configuration | steps | gradient (s) | forward (s) | compile (s) "
        "| temp memory (MiB) | grad error vs f64 | time vs ReversibleAdjoint |"
    )
    print("|---|---|---|---|---|---|---|---|")
    reversible_time = {
        r["steps"]: r.get("grad_s") for r in rows if r["config"] == reversible
    }
    for r in rows:
        grad_s = r.get("grad_s")
        base = reversible_time.get(r["steps"])
        ratio = f"{grad_s / base:.2f}x" if grad_s and base else "-"
        fmt = lambda key, spec: format(r[key], spec) if key in r else "-"
        if "stopped" in r:
            error = "stopped by " + r["stopped"]
        else:
            error = fmt("grad_rel_error", ".1e")
        print(
            f"| {r['config']} | {r['steps']} | {fmt('grad_s', '.4f')} "
            f"| {fmt('forward_s', '.4f')} | {r['compile_s']:.2f} "
            f"| {r['temp_bytes'] / 2**20:.3f} "
            f"| {error} "
            f"| {ratio} |"
        )


def neural_sde_problem(state, width, paths, steps, dtype, seed=5678, noise="diagonal"):
    """`noise="diagonal"`: the diffusion an MLP of the state; `"additive"`: of the time
    alone, on a Brownian tree with space-time Lévy area (for `ShARK`)."""
    drift_key, diffusion_key, data_key = jr.split(jr.PRNGKey(seed), 3)
    mlp = lambda key, out: eqx.nn.MLP(
        state, out, width, 1, jnp.tanh, key=key, dtype=dtype
    )
    model = (mlp(drift_key, state), mlp(diffusion_key, state))
    keys = jr.split(data_key, paths)

    def loss(model, keys, solver, adjoint):
        def solve(key):
            brownian = diffrax.VirtualBrownianTree(
                0.0,
                1.0,
                tol=1e-3,
                shape=jax.ShapeDtypeStruct((state,), dtype),
                key=key,
                levy_area=LEVY_AREA[noise],
            )
            if noise == "additive":
                sigma = lambda t, y, args: args[1](jnp.full(state, t, dtype))
            else:
                sigma = lambda t, y, args: args[1](y)
            # The networks travel in `args`, so that `BacksolveAdjoint` can run too.
            terms = diffrax.MultiTerm(
                diffrax.ODETerm(lambda t, y, args: args[0](y)),
                diffrax.ControlTerm(
                    lambda t, y, args: lx.DiagonalLinearOperator(sigma(t, y, args)),
                    brownian,
                ),
            )
            y0 = jnp.ones(state, dtype)
            return _solve_unit_interval(terms, solver, y0, model, adjoint, steps, dtype)

        return jnp.mean(jax.vmap(solve)(keys) ** 2)

    return model, keys, loss


LEVY_AREA = {
    "diagonal": diffrax.BrownianIncrement,
    "additive": diffrax.SpaceTimeLevyArea,
}


def run_neural_sde(options, *, configs, steps_list):
    """Neural SDEs: Heun on diagonal noise, and Heun against ShARK on additive noise."""
    rows = []
    title = (
        "Neural SDE (base {base}): state 4, MLPs width 32, {noise} noise, 16 paths "
        "(no float64 reference: the Brownian tree samples differently in float64)"
    )
    for base, noise in [
        (diffrax.Heun, "diagonal"),
        (diffrax.Heun, "additive"),
        (diffrax.ShARK, "additive"),
    ]:
        make = lambda steps, dtype, noise=noise: neural_sde_problem(
            4, 32, 16, steps, dtype, noise=noise
        )
        # The adjoint SDE of `BacksolveAdjoint` has state-dependent noise, which
        # `ShARK` (additive noise only) refuses.
        configs_here = [
            c for c in configs if not (base is diffrax.ShARK and "Backsolve" in c)
        ]
        rows += run_problem(
            title.format(base=base.__name__, noise=noise),
            make,
            steps_list=steps_list,
            configs=configs_here,
            repeats=options.repeats,
            base=base,
            reference=False,
        )
    return rows


def neural_cde_problem(hidden, channels, batch, steps, dtype, seed=5678):
    model_key, data_key = jr.split(jr.PRNGKey(seed))
    model = eqx.nn.MLP(
        hidden, hidden * channels, 32, 1, jnp.tanh, key=model_key, dtype=dtype
    )
    ts = jnp.linspace(0.0, 1.0, 50, dtype=dtype)
    xs = jnp.cumsum(jr.normal(data_key, (batch, 50, channels), dtype), axis=1) / 7
    coeffs = jax.vmap(lambda x: diffrax.backward_hermite_coefficients(ts, x))(xs)

    def loss(model, coeffs, solver, adjoint):
        def solve(coeffs):
            path = diffrax.CubicInterpolation(ts, coeffs)
            field = lambda t, y, args: args(y).reshape(hidden, channels)
            y0 = jnp.zeros(hidden, dtype).at[:channels].set(path.evaluate(ts[0]))
            terms = diffrax.ControlTerm(field, path)
            return _solve_unit_interval(terms, solver, y0, model, adjoint, steps, dtype)

        return jnp.mean(jax.vmap(solve)(coeffs) ** 2)

    return model, coeffs, loss


def write_rows(rows, path):
    """The measured rows, as JSON, for later comparison."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nWrote {out}")


def run_problem(
    title, make, *, steps_list, configs, repeats, base=diffrax.Tsit5, reference=True
):
    rows = []
    for steps in steps_list:
        for config in configs:
            row = measure(
                config,
                lambda dtype: make(steps, dtype),
                repeats=repeats,
                base=base,
                reference=reference,
            )
            row.update(regime=title, steps=steps)
            rows.append(row)
    print_table(title, rows, reversible=label(REVERSIBLE, base))
    return rows


def run_neural_ode(name, *, state, width, batch, steps_list, configs, repeats):
    rows = []
    for steps in steps_list:
        for config in configs:
            make = lambda dtype: neural_ode_problem(state, width, batch, steps, dtype)
            row = measure(config, make, repeats=repeats)
            row.update(regime=name, steps=steps)
            rows.append(row)
            print(f"  {name} {steps} {config}: {row.get('grad_s', 0):.4f}s", flush=True)
    print_table(
        f"Neural ODE, {name}: state {state}, MLP width {width}, batch {batch}", rows
    )
    return rows


def run_memory(size, steps_list, configs):
    rows = []
    for steps in steps_list:
        for config in configs:
            make = lambda dtype: grid_problem(size, steps, dtype)
            row = measure(config, make, repeats=0, run=False)
            row.update(regime="memory", steps=steps)
            rows.append(row)
    print(f"\n### Memory: {size}x{size} grid, diffusion + pointwise MLP, float32\n")
    print(
        "Compiled temporary memory of one gradient, MiB (ratio to the first column).\n"
    )
    print("| steps | " + " | ".join(label(c) for c in configs) + " |")
    print("|---" * (len(configs) + 1) + "|")
    for steps in steps_list:
        mib = [r["temp_bytes"] / 2**20 for r in rows if r["steps"] == steps]
        cells = [f"{m:.3f} ({m / mib[0]:.1f}x)" for m in mib]
        print(f"| {steps} | " + " | ".join(cells) + " |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sde", action="store_true", help="only the Neural SDE regimes (Heun, ShARK)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="default: results/adjoints.json (adjoints_sde.json with --sde)",
    )
    options = parser.parse_args()
    jax.config.update("jax_enable_x64", True)  # for the float64 reference gradients
    device = jax.devices()[0].platform
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {device}; "
        f"jax {jax.__version__}, diffrax {diffrax.__version__}; float32"
    )
    fast = [
        REVERSIBLE,
        "Reversible({base})+RecursiveCheckpoint",
        "{base}+RecursiveCheckpoint",
    ]
    rows = []
    if options.sde:
        every = [c for c in CONFIGS if c not in (LOOPED_STAGES, UNROLLED_STAGES)]
        rows += run_neural_sde(options, configs=every, steps_list=[100, 1000])
    elif options.quick:
        rows += run_neural_ode(
            "tiny",
            state=2,
            width=10,
            batch=1,
            steps_list=[1000],
            configs=fast,
            repeats=3,
        )
        rows += run_memory(
            64, [100, 10_000], (REVERSIBLE, "{base}+RecursiveCheckpoint")
        )
        rows += run_problem(
            "Large state: 64x64 grid, diffusion + pointwise MLP",
            lambda steps, dtype: grid_problem(64, steps, dtype),
            steps_list=[100],
            configs=(REVERSIBLE, "{base}+RecursiveCheckpoint"),
            repeats=3,
        )
    else:
        every = [c for c in CONFIGS if c not in (LOOPED_STAGES, UNROLLED_STAGES)]
        rows += run_neural_ode(
            "tiny",
            state=2,
            width=10,
            batch=1,
            steps_list=[100, 1000, 10_000],
            configs=every,
            repeats=options.repeats,
        )
        rows += run_neural_ode(
            "medium",
            state=8,
            width=64,
            batch=32,
            steps_list=[100, 1000],
            configs=every,
            repeats=options.repeats,
        )
        rows += run_neural_ode(
            "large",
            state=8,
            width=128,
            batch=256,
            steps_list=[200],
            configs=fast,
            repeats=options.repeats,
        )
        memory_configs = (
            REVERSIBLE,
            UNROLLED_STAGES,
            LOOPED_STAGES,
            "{base}+RecursiveCheckpoint",
            "{base}+Backsolve",
            "Reversible({base})+RecursiveCheckpoint",
        )
        rows += run_memory(64, [100, 1000, 10_000, 100_000], memory_configs)
        rows += run_problem(
            "Large state: 64x64 grid, diffusion + pointwise MLP",
            lambda steps, dtype: grid_problem(64, steps, dtype),
            steps_list=[100, 1000],
            configs=(
                REVERSIBLE,
                UNROLLED_STAGES,
                "{base}+RecursiveCheckpoint",
                "{base}+Backsolve",
            ),
            repeats=options.repeats,
        )
        rows += run_neural_sde(options, configs=every, steps_list=[100, 1000])
        rows += run_problem(
            "Neural CDE: hidden 8, 3 channels, batch 32 series of 50 points, "
            "cubic interpolation",
            lambda steps, dtype: neural_cde_problem(8, 3, 32, steps, dtype),
            steps_list=[100, 1000],
            configs=every,
            repeats=options.repeats,
        )
    name = "adjoints_sde.json" if options.sde else "adjoints.json"
    default_out = pathlib.Path(__file__).parent / "results" / name
    write_rows(rows, options.out or default_out)


if __name__ == "__main__":
    main()
