"""The symptom cases of `tests/symptom_cases.py`: each run with
`Reversible(base, coupling_parameter=...)` + `ReversibleAdjoint()` and with its
reference (the base solver with `RecursiveCheckpointAdjoint`).

    python benchmarks/trust_cases.py                    # coupling 0.999
    python benchmarks/trust_cases.py --coupling 0.5
    python benchmarks/trust_cases.py --coupling auto    # passed through as the string
    python benchmarks/trust_cases.py --case decay --case heat_pde

Prints a markdown table: forward and gradient relative errors against the reference,
the result of the solve (or the exception raised, type and first line), the number of
steps (rejected ones in brackets), the reconstruction error that `ReversibleAdjoint`
measured, and the wall time of compiling and running each case once.
"""

import argparse
import pathlib
import platform
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax


jax.config.update("jax_enable_x64", True)

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax_reversible._misc import relative_error
from tests.symptom_cases import CASES, result_name


def _coupling(value: str) -> float | str:
    return value if value == "auto" else float(value)


def _rel_error(x, reference, scale: float) -> float:
    """`relative_error`, measured against at least `scale`."""
    return float(relative_error(x, reference, also_scale=jnp.asarray(scale)))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    # An `EquinoxRuntimeError` (`throw=True`) starts with the traceback inside JIT; its
    # message is on the line that names the error.
    name = f"{type(error).__name__}: "
    for line in lines:
        if name in line:
            message = line.split(name, 1)[1]
            break
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(error).__name__}: {message}".replace("|", "\\|")


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
        out = jtu.tree_map(
            lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, out
        )
    except Exception as error:  # Reported in the table.
        out = error
    return out, time.perf_counter() - start


def _nanmax(values: list[float]) -> float:
    return float(jnp.max(jnp.array(values)))  # NaN if any is NaN.


def _summary(x) -> str:
    """A pytree of arrays, briefly: small arrays in full, larger ones by their largest
    magnitude."""
    parts = []
    for leaf in jtu.tree_leaves(eqx.filter(x, eqx.is_inexact_array)):
        leaf = np.asarray(leaf, dtype=np.float64)
        if leaf.size <= 4:
            parts.append(np.array2string(leaf.ravel(), precision=3, separator=", "))
        else:
            parts.append(f"max abs {np.max(np.abs(leaf)):.3g}")
    return " ".join(parts)


def _steps(out) -> str:
    return f"{int(out['num_steps'])} ({int(out['num_rejected_steps'])})"


def _checkpoint_every(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else text
    return int(text)


def _reconstruction_tol(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else text
    return float(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coupling", type=_coupling, default=0.999)
    parser.add_argument(
        "--throw",
        action="store_true",
        help="solve with `throw=True` (default: `throw=False`, to show `sol.result`)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_checkpoint_every,
        default=None,
        help='`ReversibleAdjoint(checkpoint_every=...)`: an integer, "auto" or "none"',
    )
    parser.add_argument(
        "--reconstruction-tol",
        type=_reconstruction_tol,
        default="auto",
        help='`ReversibleAdjoint(reconstruction_tol=...)`: a number, "auto" or "none"',
    )
    parser.add_argument(
        "--case",
        action="append",
        choices=[case.name for case in CASES],
        help="run only this case (repeatable)",
    )
    cli = parser.parse_args()

    print(
        f"backend {jax.default_backend()} ({platform.machine()}), "
        f"jax {jax.__version__}, diffrax {diffrax.__version__}, "
        f"equinox {eqx.__version__}, diffrax_reversible {dr.__version__}"
    )
    print(
        f"Reversible(base, coupling_parameter={cli.coupling!r}) + ReversibleAdjoint("
        f"checkpoint_every={cli.checkpoint_every!r}, "
        f"reconstruction_tol={cli.reconstruction_tol!r}) "
        f"against base + RecursiveCheckpointAdjoint(); throw={cli.throw}"
    )
    print()
    print(
        "| case | base | forward rel. error | gradient rel. error "
        "| result / exception | steps (rejected) | reference steps (rejected) "
        "| reconstruction error | time (s) | reference time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    values = []
    for case in CASES:
        if cli.case and case.name not in cli.case:
            continue
        reference, reference_time = _timed(case.reference, throw=cli.throw)
        errors = []
        try:
            solver = dr.Reversible(case.base(), coupling_parameter=cli.coupling)
            adjoint = dr.ReversibleAdjoint(
                checkpoint_every=cli.checkpoint_every,
                reconstruction_tol=cli.reconstruction_tol,
                reconstruction_callback=lambda e: errors.append(float(e)),
            )
        except Exception as error:
            out, elapsed = error, 0.0
        else:
            out, elapsed = _timed(case.run, solver, adjoint, throw=cli.throw)
        if isinstance(reference, Exception):
            reference_steps = "reference failed: " + _first_line(reference)
        else:
            reference_steps = _steps(reference)
        if isinstance(out, Exception):
            forward = gradient = steps = "–"
            outcome = _first_line(out)
        else:
            steps = _steps(out)
            outcome = result_name(out["result"])
            if isinstance(reference, Exception):
                forward = gradient = "–"
            else:
                scale = out["scale"]
                forward = f"{_rel_error(out['value'], reference['value'], scale):.2e}"
                gradient = f"{_rel_error(out['grad'], reference['grad'], 0.0):.2e}"
        reconstruction = f"{_nanmax(errors):.2e}" if errors else "–"
        print(
            f"| {case.name} | {case.base.__name__} | {forward} | {gradient} "
            f"| {outcome} | {steps} | {reference_steps} | {reconstruction} "
            f"| {elapsed:.1f} | {reference_time:.1f} |"
        )
        sys.stdout.flush()
        values.append((case.name, out, reference))
    print()
    print("| case | value | reference value | gradient | reference gradient |")
    print("|---|---|---|---|---|")
    for name, out, reference in values:
        cells = [
            "–" if isinstance(o, Exception) else _summary(o[key])
            for key in ("value", "grad")
            for o in (out, reference)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
