"""The paper's runtime protocol (McCallum & Foster, arXiv 2410.11648, runtime
complexity experiment): `Reversible(Midpoint())+ReversibleAdjoint` against
`Midpoint()+RecursiveCheckpointAdjoint(checkpoints=c)`.

    python benchmarks/paper_protocol.py            # n = 100, 500, 1000
    python benchmarks/paper_protocol.py --quick    # n = 100, 1000; fewer repeats

A scalar Neural ODE (MLP 1 -> 10 -> 1, tanh), `Midpoint`, dt = 0.01, n steps (T = n dt),
float64, the loss `sum(y^2)` over `SaveAt(t1=True)` or over `SaveAt(steps=True)` with
`max_steps = n`; `Reversible` with its default (automatic) coupling and with the
paper's `λ = 0.999`; RCA with c = 2, 4, 8 and its default
`c = floor(-1.5 + sqrt(2 n + 0.25)) + 1`. One gradient, timed after compilation, as
the mean over `--calls` calls; the median and the fastest over repeats, the
configurations interleaved within each repeat (the machine is shared: read the
ratios, and the load printed with them; the fastest repeat is the least disturbed).
"""

import argparse
import math
import os
import platform
import statistics
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import diffrax_reversible as dr  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402


DT = 0.01
REVERSIBLE = "Reversible(Midpoint)+ReversibleAdjoint"
# The paper's fixed coupling, without the automatic coupling's Jacobian-vector product
# per step.
REVERSIBLE_FIXED = "Reversible(Midpoint, coupling_parameter=0.999)+ReversibleAdjoint"


def default_checkpoints(n: int) -> int:
    """Diffrax's default number of checkpoints for `max_steps = n`."""
    return math.floor(-1.5 + math.sqrt(2 * n + 0.25)) + 1


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def _configs(
    n: int,
) -> dict[str, tuple[diffrax.AbstractSolver, diffrax.AbstractAdjoint]]:
    configs = {
        REVERSIBLE: (dr.Reversible(diffrax.Midpoint()), dr.ReversibleAdjoint()),
        REVERSIBLE_FIXED: (
            dr.Reversible(diffrax.Midpoint(), coupling_parameter=0.999),
            dr.ReversibleAdjoint(),
        ),
    }
    for c in (default_checkpoints(n), 8, 4, 2):
        name = f"Midpoint+RecursiveCheckpoint(c={c})"
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=c)
        configs[name] = (diffrax.Midpoint(), adjoint)
    return configs


def _gradient(n: int, saveat: str, solver, adjoint):
    field = _Field(eqx.nn.MLP(1, 1, 10, 1, activation=jnp.tanh, key=jr.key(5678)))
    y0 = jnp.array([1.0])

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(field):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            n * DT,
            DT,
            y0,
            saveat=diffrax.SaveAt(**{saveat: True}),
            adjoint=adjoint,
            max_steps=n,
        )
        return jnp.sum(jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0) ** 2)

    return grad, field


def run(n: int, saveat: str, repeats: int, calls: int) -> list[dict]:
    rows = {}
    for name, (solver, adjoint) in _configs(n).items():
        grad, field = _gradient(n, saveat, solver, adjoint)
        start = time.perf_counter()
        jax.block_until_ready(grad(field))
        rows[name] = dict(
            config=name, n=n, saveat=saveat, compile_s=time.perf_counter() - start
        )
        rows[name]["_call"] = (grad, field)
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, row in rows.items():
            grad, field = row["_call"]
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(grad(field))
            times[name].append((time.perf_counter() - start) / calls)
    for name, row in rows.items():
        del row["_call"]
        row["grad_s"] = statistics.median(times[name])
        # Other processes only ever add time: the fastest repeat is the least
        # disturbed one.
        row["grad_min_s"] = min(times[name])
    return list(rows.values())


def print_table(rows: list[dict]) -> None:
    ours = {(r["n"], r["saveat"]): r for r in rows if r["config"] == REVERSIBLE}
    print(
        "| SaveAt | n | configuration | gradient, median (ms) | fastest (ms) "
        "| compile (s) | time / ReversibleAdjoint's: median | fastest |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mine = ours[(r["n"], r["saveat"])]
        print(
            f"| {r['saveat']} | {r['n']} | {r['config']} | {1e3 * r['grad_s']:.2f} "
            f"| {1e3 * r['grad_min_s']:.2f} | {r['compile_s']:.1f} "
            f"| {r['grad_s'] / mine['grad_s']:.2f}x "
            f"| {r['grad_min_s'] / mine['grad_min_s']:.2f}x |"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--calls", type=int, default=10, help="gradients per timed repeat"
    )
    options = parser.parse_args(argv)
    steps = (100, 1000) if options.quick else (100, 500, 1000)
    repeats = options.repeats or (5 if options.quick else 15)
    print(
        f"backend {jax.default_backend()} ({platform.machine()}, "
        f"{os.cpu_count()} cores), jax {jax.__version__}, diffrax "
        f"{diffrax.__version__}; load average before: {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for saveat in ("t1", "steps"):
        for n in steps:
            rows += run(n, saveat, repeats, options.calls)
    print(
        f"load average after: {os.getloadavg()[0]:.2f}; {repeats} repeats of "
        f"{options.calls} gradients each\n"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
