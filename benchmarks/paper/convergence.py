"""Experiment 5 of the paper (McCallum & Foster, arXiv 2410.11648), convergence order:
y' = 0.5 y, y(0) = 1, T = 5, float64, constant steps dt = 2^0 ... 2^-5 (and, in
`--full`, down to 2^-10). For each base (Euler, Midpoint, Ralston3, RK4) the error
|y(T) - e^2.5| of the base solver, of `Reversible(base, coupling_parameter=0.999)`
(the paper's) and of `Reversible(base)` (the default, automatic coupling), and the
order fitted by least squares to log2(error) against log2(dt).

    python benchmarks/paper/convergence.py --quick    # dt = 2^0 ... 2^-5
    python benchmarks/paper/convergence.py --full     # dt = 2^0 ... 2^-10

The paper finds the same slopes for base and reversible solver, the reversible
errors no larger than the base's.
"""

import argparse
import math

import _common as common
import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax.numpy as jnp
import numpy as np


T1 = 5.0
EXACT = math.exp(0.5 * T1)


def growth(t, y, args):
    return 0.5 * y


@eqx.filter_jit
def solve(solver, dt, max_steps):
    # `dt` traced: one compilation per solver, not per step size.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(growth),
        solver,
        0.0,
        T1,
        dt,
        jnp.array(1.0),
        max_steps=max_steps,
    )
    return sol.ys[-1]


def solve_errors(solver, dts) -> list[float]:
    max_steps = round(T1 / min(dts)) + 1
    return [abs(float(solve(solver, jnp.array(dt), max_steps)) - EXACT) for dt in dts]


def fitted_order(dts, errors) -> float:
    slope, _ = np.polyfit(np.log2(dts), np.log2(errors), 1)
    return float(slope)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="dt = 2^0 ... 2^-5")
    mode.add_argument("--full", action="store_true", help="dt = 2^0 ... 2^-10")
    options = parser.parse_args(argv)
    dts = [2.0**-k for k in range(11 if options.full else 6)]
    print(f"Experiment 5, convergence: {common.machine()}")
    results = {}
    for name, base_cls in common.BASES.items():
        solvers = {
            "base": base_cls(),
            f"Reversible(λ={common.PAPER_COUPLING})": dr.Reversible(
                base_cls(), coupling_parameter=common.PAPER_COUPLING
            ),
            "Reversible (default coupling)": dr.Reversible(base_cls()),
        }
        results[name] = {
            label: solve_errors(solver, dts) for label, solver in solvers.items()
        }
    header = " | ".join(f"dt = 2^-{k}" for k in range(len(dts)))
    print(f"\n| base | solver | {header} | fitted order |")
    print("|---|---|" + "---|" * (len(dts) + 1))
    for name, rows in results.items():
        for label, errors in rows.items():
            cells = " | ".join(f"{e:.2e}" for e in errors)
            # Round-off floors the smallest errors of the high-order bases: fit only
            # where the error is well above it.
            kept = [(dt, e) for dt, e in zip(dts, errors) if e > 1e-11]
            order = fitted_order(*zip(*kept)) if len(kept) > 1 else float("nan")
            print(f"| {name} | {label} | {cells} | {order:.2f} |")
    common.write_json(
        f"convergence_{'full' if options.full else 'quick'}",
        dict(machine=common.machine(), dts=dts, errors=results),
    )


if __name__ == "__main__":
    main()
