"""Where a gradient's time goes, counted rather than timed: the vector-field
evaluations that one solve, and one gradient, of experiment 1 (scalar Neural ODE,
`Midpoint`, dt = 0.01, `SaveAt(t1=True)`) perform, for the reversible solver and for
recursive checkpointing with each number of checkpoints.

    python benchmarks/paper/count_evaluations.py          # n = 1 000
    python benchmarks/paper/count_evaluations.py --n 100

The vector field is wrapped to bump a counter (`jax.debug.callback`) each time it is
evaluated, whether on its own or as the primal of a Jacobian-vector or vector-Jacobian
product (each of which evaluates it once). The counts are exact and independent of the
machine; set beside the times of `runtime_complexity.py` they give the cost of one
evaluation in each configuration.
"""

import argparse
import collections

import _common as common
import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp


DT = 0.01
COUNTS = collections.Counter()


def _tick(kind):
    def tick():
        COUNTS[kind] += 1

    return tick


class CountedField(eqx.Module):
    field: common.MLPField

    def __call__(self, t, y, args):
        jax.debug.callback(_tick("evaluation"))
        return self.field(t, y, args)


def configs(n):
    yield (
        "Reversible(Midpoint)",
        dr.Reversible(diffrax.Midpoint()),
        dr.ReversibleAdjoint(),
    )
    yield (
        f"Reversible(Midpoint, λ={common.PAPER_COUPLING})",
        dr.Reversible(diffrax.Midpoint(), coupling_parameter=common.PAPER_COUPLING),
        dr.ReversibleAdjoint(),
    )
    for c in (common.default_checkpoints(n), 8, 4, 2):
        yield (
            f"Midpoint+RecursiveCheckpoint(c={c})",
            diffrax.Midpoint(),
            diffrax.RecursiveCheckpointAdjoint(checkpoints=c),
        )


def count(n, solver, adjoint, gradient: bool) -> dict:
    field = CountedField(common.MLPField(1, time_dependent=False, key=common.key(5678)))

    def loss(field):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            n * DT,
            DT,
            jnp.array([1.0]),
            saveat=diffrax.SaveAt(t1=True),
            adjoint=adjoint,
            max_steps=n,
        )
        return jnp.sum(sol.ys**2)

    fn = eqx.filter_jit(eqx.filter_grad(loss) if gradient else loss)
    jax.block_until_ready(fn(field))  # compile (and count) once
    COUNTS.clear()
    jax.block_until_ready(fn(field))
    jax.effects_barrier()
    return dict(COUNTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    n = parser.parse_args(argv).n
    print(f"Vector-field work per gradient, n = {n} steps: {common.machine()}\n")
    print(
        "| configuration | solve alone: evaluations | per step "
        "| gradient: evaluations | per step |"
    )
    print("|---|---|---|---|---|")
    rows = []
    for label, solver, adjoint in configs(n):
        solve = count(n, solver, adjoint, gradient=False)
        grad = count(n, solver, adjoint, gradient=True)
        row = dict(
            config=label,
            n=n,
            solve_evaluations=solve.get("evaluation", 0),
            evaluations=grad.get("evaluation", 0),
        )
        rows.append(row)
        print(
            f"| {label} | {row['solve_evaluations']} "
            f"| {row['solve_evaluations'] / n:.1f} | {row['evaluations']} "
            f"| {row['evaluations'] / n:.1f} |"
        )
    common.write_json(
        f"count_evaluations_n{n}", dict(machine=common.machine(), rows=rows)
    )


if __name__ == "__main__":
    main()
