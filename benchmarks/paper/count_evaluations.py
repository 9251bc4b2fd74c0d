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
import equinox as eqx
import jax
import runtime_complexity


COUNTS = collections.Counter()


def _count_evaluation():
    COUNTS["evaluation"] += 1


class CountedField(eqx.Module):
    field: common.MLPField

    def __call__(self, t, y, args):
        jax.debug.callback(_count_evaluation)
        return self.field(t, y, args)


def count(loss, field, gradient: bool) -> int:
    fn = eqx.filter_jit(eqx.filter_grad(loss) if gradient else loss)
    jax.block_until_ready(fn(field))  # compile (and count) once
    COUNTS.clear()
    jax.block_until_ready(fn(field))
    jax.effects_barrier()
    return COUNTS["evaluation"]


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
    # Experiment 1's configurations, with its model and loss.
    for label, (solver, adjoint) in runtime_complexity.configurations(n).items():
        loss = runtime_complexity.scalar_loss(n, "t1", solver, adjoint)
        field = CountedField(runtime_complexity.scalar_field())
        row = dict(
            config=label,
            n=n,
            solve_evaluations=count(loss, field, gradient=False),
            evaluations=count(loss, field, gradient=True),
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
