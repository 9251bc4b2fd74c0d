"""Strong orders of stochastic Runge--Kutta bases inside `Reversible`, beside the base
solvers' own, on SDEs with known solutions on the same Brownian path.

    python benchmarks/srk_strong_order.py             # 512 paths, a few minutes
    python benchmarks/srk_strong_order.py --paths 64  # quicker, noisier

- Ornstein--Uhlenbeck (additive noise) for every SRK base and `Heun`;
- geometric Brownian motion (diagonal, commutative noise, Stratonovich) for the bases
  valid on it: `SPaRK`, `GeneralShARK`, `SlowRK`, and `Heun`. (`ShARK`, `SRA1` and
  `SEA` are for additive noise only: Diffrax refuses them there.)

Constant steps `dt = 2^-3 … 2^-8` on `[0, 1]`, float64; the error is the
root-mean-square over paths of `|X_N - X(1)|`; the order is the least-squares slope of
`log2(error)` against `log2(dt)`. See `tests/strong_order.py` for the SDEs and their
exact solutions. Prints a markdown table and writes `results/srk_strong_order.json`.
"""

import argparse
import json
import pathlib
import platform
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax


jax.config.update("jax_enable_x64", True)

import diffrax
import diffrax_reversible as dr
import jax.random as jr
from tests.strong_order import DOCUMENTED_ORDERS, exact_solutions, order, strong_errors


DTS = [2.0**-k for k in range(3, 9)]
SDE_NAMES = {
    "ou": "Ornstein–Uhlenbeck (additive)",
    "gbm": "geometric Brownian motion (commutative)",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    keys = jr.split(jr.key(options.seed), options.paths)
    start = time.perf_counter()
    rows = []
    for sde in SDE_NAMES:
        exact = exact_solutions(sde, keys)
        for (sde_, name), documented in DOCUMENTED_ORDERS.items():
            if sde_ != sde:
                continue
            base = getattr(diffrax, name)()
            errors = {
                "base": strong_errors(base, sde, DTS, keys, exact),
                "reversible": strong_errors(dr.Reversible(base), sde, DTS, keys, exact),
            }
            rows.append(
                dict(
                    sde=sde,
                    solver=name,
                    documented=documented,
                    base_order=order(DTS, errors["base"]),
                    reversible_order=order(DTS, errors["reversible"]),
                    base_errors=errors["base"].tolist(),
                    reversible_errors=errors["reversible"].tolist(),
                )
            )
            print(_row(rows[-1]), flush=True)
    elapsed = time.perf_counter() - start
    print()
    print(table(rows))
    print(
        f"\n{options.paths} paths, dt = 2^-3 … 2^-8, float64; "
        f"{jax.default_backend()} ({platform.processor() or platform.machine()}); "
        f"{elapsed:.0f} s."
    )
    out = pathlib.Path(__file__).parent / "results" / "srk_strong_order.json"
    out.parent.mkdir(exist_ok=True)
    meta = dict(paths=options.paths, seed=options.seed, dts=DTS, seconds=elapsed)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")


def _row(row) -> str:
    last = lambda errors: f"{errors[-1]:.1e}"
    return (
        f"| {SDE_NAMES[row['sde']]} | `{row['solver']}` | {row['documented']} | "
        f"{row['base_order']:.2f} | {row['reversible_order']:.2f} | "
        f"{last(row['base_errors'])} | {last(row['reversible_errors'])} |"
    )


def table(rows) -> str:
    header = (
        "| SDE | base | documented strong order | measured: base | measured: "
        "`Reversible(base)` | error at dt = 2^-8: base | `Reversible(base)` |\n"
        "|---|---|---|---|---|---|---|"
    )
    return "\n".join([header] + [_row(row) for row in rows])


if __name__ == "__main__":
    main()
