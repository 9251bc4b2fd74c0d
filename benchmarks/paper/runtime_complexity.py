"""Experiment 1 of the paper (McCallum & Foster, arXiv 2410.11648), runtime complexity:
one gradient of a scalar Neural ODE (the paper's MLP, 1 -> 10 -> 1, tanh), `Midpoint`,
dt = 0.01, T = 1 ... 10 (n = 100 ... 1 000 steps), float64, the loss `sum(y(T)^2)`;
`Reversible(Midpoint())+ReversibleAdjoint` (default coupling, and the paper's
λ = 0.999) against `Midpoint()+RecursiveCheckpointAdjoint(checkpoints=c)` with Diffrax's
default `c = floor(-1.5 + sqrt(2 n + 0.25)) + 1` (about sqrt(2 n)), 8, 4 and 2.

    python benchmarks/paper/runtime_complexity.py --quick   # n = 100, 500, 1 000
    python benchmarks/paper/runtime_complexity.py --full    # n = 100, 200, ..., 1 000
    ... --saveat t1 steps                                   # also SaveAt(steps=True)

Each configuration's gradient is compiled once, then timed as the mean over `--calls`
calls; the median and the fastest over repeats are reported, the configurations
interleaved within each repeat (the machine is shared: read the ratios, and the load
printed with them; the fastest repeat is the least disturbed). Beside each gradient is
the time of the solve alone (no gradient), which splits a gradient's cost into the
forward solve and what the backward pass adds.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import _common as common
import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


DT = 0.01
REVERSIBLE = "Reversible(Midpoint)"
REVERSIBLE_FIXED = f"Reversible(Midpoint, λ={common.PAPER_COUPLING})"
# The paper's runtimes for one gradient at n = 1 000, in seconds (its Figure of
# runtime against n, on a GPU-less workstation; the reversible solver with λ = 0.999).
PAPER_N1000 = {REVERSIBLE_FIXED: 0.073, "c=default": 0.296, "c=8": 0.632}
PAPER_N1000 |= {"c=4": 1.676, "c=2": 15.04}


def configurations(n: int) -> dict[str, tuple]:
    configs = {
        REVERSIBLE: (dr.Reversible(diffrax.Midpoint()), dr.ReversibleAdjoint()),
        REVERSIBLE_FIXED: (
            dr.Reversible(diffrax.Midpoint(), coupling_parameter=common.PAPER_COUPLING),
            dr.ReversibleAdjoint(),
        ),
    }
    for c in (common.default_checkpoints(n), 8, 4, 2):
        name = f"Midpoint+RecursiveCheckpoint(c={c})"
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=c)
        configs[name] = (diffrax.Midpoint(), adjoint)
    return configs


def _paper_key(config: str, n: int) -> str | None:
    if n != 1000:
        return None
    if config == REVERSIBLE_FIXED:
        return config
    if f"(c={common.default_checkpoints(n)})" in config:
        return "c=default"
    for c in (8, 4, 2):
        if config.endswith(f"(c={c})"):
            return f"c={c}"
    return None


def scalar_field() -> common.MLPField:
    """The experiment's model, the paper's MLP 1 -> 10 -> 1."""
    return common.MLPField(1, time_dependent=False, key=jr.key(5678))


def scalar_loss(n: int, saveat: str, solver, adjoint) -> Callable:
    """The experiment's loss, `sum(y^2)` over `SaveAt(t1=True)` or
    `SaveAt(steps=True)`, as a function of the vector field."""

    def loss(field):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            n * DT,
            DT,
            jnp.array([1.0]),
            saveat=diffrax.SaveAt(**{saveat: True}),
            adjoint=adjoint,
            max_steps=n,
        )
        return jnp.sum(jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0) ** 2)

    return loss


def _loss_and_gradient(n: int, saveat: str, solver, adjoint):
    loss = scalar_loss(n, saveat, solver, adjoint)
    return eqx.filter_jit(loss), eqx.filter_jit(eqx.filter_grad(loss)), scalar_field()


def run(n: int, saveat: str, repeats: int, calls: int) -> list[dict]:
    rows = {}
    for name, (solver, adjoint) in configurations(n).items():
        solve, grad, field = _loss_and_gradient(n, saveat, solver, adjoint)
        start = time.perf_counter()
        jax.block_until_ready(grad(field))
        compile_s = time.perf_counter() - start
        jax.block_until_ready(solve(field))
        rows[name] = dict(config=name, n=n, saveat=saveat, compile_s=compile_s)
        rows[name]["_calls"] = dict(grad=(grad, field), solve=(solve, field))
    times = {(name, kind): [] for name in rows for kind in ("grad", "solve")}
    for _ in range(repeats):
        for name, row in rows.items():
            for kind, (fn, field) in row["_calls"].items():
                start = time.perf_counter()
                for _ in range(calls):
                    jax.block_until_ready(fn(field))
                times[name, kind].append((time.perf_counter() - start) / calls)
    for name, row in rows.items():
        del row["_calls"]
        row["grad_s"] = statistics.median(times[name, "grad"])
        # Other processes only ever add time: the fastest repeat is the least
        # disturbed one.
        row["grad_min_s"] = min(times[name, "grad"])
        row["solve_s"] = statistics.median(times[name, "solve"])
    return list(rows.values())


def print_table(rows: list[dict]) -> None:
    ours = {(r["n"], r["saveat"]): r for r in rows if r["config"] == REVERSIBLE_FIXED}
    print(
        "| SaveAt | n | configuration | gradient, median (ms) | fastest (ms) "
        "| solve alone (ms) | gradient / solve | compile (s) "
        "| / Reversible(λ=0.999): median | fastest | paper (s) | paper ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mine = ours[(r["n"], r["saveat"])]
        key = _paper_key(r["config"], r["n"]) if r["saveat"] == "t1" else None
        paper = ratio = ""
        if key is not None:
            paper = f"{PAPER_N1000[key]:.3f}"
            ratio = f"{PAPER_N1000[key] / PAPER_N1000[REVERSIBLE_FIXED]:.2f}x"
        print(
            f"| {r['saveat']} | {r['n']} | {r['config']} | {1e3 * r['grad_s']:.2f} "
            f"| {1e3 * r['grad_min_s']:.2f} | {1e3 * r['solve_s']:.2f} "
            f"| {r['grad_s'] / r['solve_s']:.1f} | {r['compile_s']:.1f} "
            f"| {r['grad_s'] / mine['grad_s']:.2f}x "
            f"| {r['grad_min_s'] / mine['grad_min_s']:.2f}x | {paper} | {ratio} |"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="n = 100, 500, 1000")
    mode.add_argument("--full", action="store_true", help="n = 100, 200, ..., 1000")
    parser.add_argument("--saveat", nargs="+", default=["t1"], choices=["t1", "steps"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--calls", type=int, default=10, help="gradients per timed repeat"
    )
    options = parser.parse_args(argv)
    steps = range(100, 1001, 100) if options.full else (100, 500, 1000)
    repeats = options.repeats or (15 if options.full else 5)
    print(
        f"Experiment 1, runtime complexity: {common.machine()}; load average "
        f"before: {common.load()}"
    )
    rows = []
    for saveat in options.saveat:
        for n in steps:
            rows += run(n, saveat, repeats, options.calls)
            print(f"  n = {n} done, load {common.load()}", flush=True)
    print(
        f"load average after: {common.load()}; {repeats} repeats of "
        f"{options.calls} gradients each\n"
    )
    print_table(rows)
    common.write_json(
        f"runtime_complexity_{'full' if options.full else 'quick'}",
        dict(machine=common.machine(), repeats=repeats, calls=options.calls, rows=rows),
    )


if __name__ == "__main__":
    main()
