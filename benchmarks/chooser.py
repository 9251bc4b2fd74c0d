"""The measurements behind "Choosing an adjoint": every adjoint on every regime.

    python benchmarks/chooser.py --quick     # regimes 1, 5 and 7, 3 repeats
    python benchmarks/chooser.py             # all eight regimes
    python benchmarks/chooser.py --regimes 2,4

On an idle 2-core CPU about 3 and 10-20 minutes; most of it is compiling, which a
loaded machine slows several times over.

For each regime (constant steps on [0, 1], a loss that is a mean of squares of the
solution) and each adjoint: the compiled temporary memory of one gradient (from
`memory_analysis()`: deterministic), the gradient's time (median over repeats, the
adjoints interleaved: each repeat runs every adjoint once) and its relative difference
to a float64 `RecursiveCheckpointAdjoint` gradient of the base solver. Ours solves a
different (reversible) discretisation, so that difference is the discretisation's, not
the adjoint's: the "exactness" column compares ours with backpropagating through that
same discretisation instead (`Reversible(base)+RecursiveCheckpointAdjoint`, same
dtype).

Prints Markdown (one table per regime, then a summary of ratios to ours) and writes the
rows to `benchmarks/results/chooser.json`. The load average is printed before and after
each regime: the timings are only as steady as the machine.
"""

import argparse
import dataclasses
import logging
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
from diffrax_reversible._misc import relative_error


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from adjoints import (
    _solver,
    _to_float64,
    AUTO_CHECKPOINTS,
    CONFIGS,
    grid_problem,
    label,
    neural_cde_problem,
    neural_ode_problem,
    neural_sde_problem,
    REVERSIBLE,
    write_rows,
)


# Configuration names, and what they run, are `adjoints.py`'s; only forward mode is new.
OURS = REVERSIBLE
RCA = "{base}+RecursiveCheckpoint"
DIRECT = "{base}+Direct"
BACKSOLVE = "{base}+Backsolve"
FORWARD = "{base}+ForwardMode (jacfwd)"
# The remedy that the reconstruction check's message suggests; measured only where ours
# (the defaults) is stopped, and then the row the others' ratios are taken to.
OURS_CHECKPOINTED = AUTO_CHECKPOINTS
# Not a contender: our discretisation, backpropagated through; only ours is compared
# with it.
SAME_DISCRETISATION = "Reversible({base})+RecursiveCheckpoint"
# name: (`_solver`'s `reversible`, adjoint class).
ADJOINTS = {**CONFIGS, FORWARD: (False, diffrax.ForwardMode)}
CONTENDERS = (OURS, RCA, DIRECT, BACKSOLVE, FORWARD)
# A compiled gradient wanting more temporary memory than this is not run (the machine
# is shared); its memory is still reported.
RUN_MEMORY_LIMIT = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class Regime:
    number: int
    title: str
    make: Callable  # dtype -> (model, data, loss), as `adjoints.py`'s builders
    dtype: object = jnp.float32
    base: type = diffrax.Tsit5
    # ForwardMode costs one tangent per parameter: only where they are few.
    forward_mode: bool = False
    # The SDE's Brownian tree samples differently in float64: no reference there.
    float64_reference: bool = True
    # Time only gradients whose first call took less than this.
    time_limit_s: float = float("inf")
    # The number of a regime with `steps_ratio` times fewer steps and otherwise the
    # same: a gradient whose time there, times `steps_ratio`, exceeds `time_limit_s` is
    # not run. (A lower bound: RCA's recomputation grows faster than the steps.)
    predict_from: int | None = None
    steps_ratio: float = 1.0


def _regimes():
    f64 = jnp.float64
    return (
        Regime(
            1,
            "small ODE, few steps: state 2, MLP width 10, batch 1, 100 steps",
            lambda dtype: neural_ode_problem(2, 10, 1, 100, dtype),
            forward_mode=True,
        ),
        Regime(
            2,
            "small ODE, many steps: state 2, MLP width 10, batch 1, 10 000 steps",
            lambda dtype: neural_ode_problem(2, 10, 1, 10_000, dtype),
            forward_mode=True,
        ),
        Regime(
            3,
            "small ODE, float64: state 2, MLP width 10, batch 1, 1000 steps",
            lambda dtype: neural_ode_problem(2, 10, 1, 1000, dtype),
            dtype=f64,
            forward_mode=True,
        ),
        Regime(
            4,
            "batched ODE: state 8, MLP width 64, batch 32, 1000 steps",
            lambda dtype: neural_ode_problem(8, 64, 32, 1000, dtype),
        ),
        Regime(
            5,
            "large state, few steps: 64x64 grid, diffusion + pointwise MLP, 100 steps",
            lambda dtype: grid_problem(64, 100, dtype),
            forward_mode=True,
        ),
        Regime(
            6,
            "large state, many steps: 64x64 grid, diffusion + pointwise MLP, "
            "10 000 steps",
            lambda dtype: grid_problem(64, 10_000, dtype),
            forward_mode=True,
            time_limit_s=10.0,
            predict_from=5,
            steps_ratio=100,
        ),
        Regime(
            7,
            "Neural SDE (base Heun): state 4, MLPs width 32, diagonal noise, 16 paths, "
            "1000 steps",
            lambda dtype: neural_sde_problem(4, 32, 16, 1000, dtype),
            base=diffrax.Heun,
            float64_reference=False,
        ),
        Regime(
            8,
            "Neural CDE: hidden 8, 3 channels, batch 32 series of 50 points, "
            "1000 steps",
            lambda dtype: neural_cde_problem(8, 3, 32, 1000, dtype),
        ),
    )


def _forward_mode_grad(loss):
    """The gradient by `jax.jacfwd` over the flattened parameters: ForwardMode does not
    support reverse mode, and one tangent per parameter is its price."""

    def grad(model, data, solver, adjoint):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        flat, unflatten = jax.flatten_util.ravel_pytree(params)

        def flat_loss(flat):
            return loss(eqx.combine(unflatten(flat), static), data, solver, adjoint)

        return unflatten(jax.jacfwd(flat_loss)(flat))

    return grad


def _reason(error):
    # The first line, short and safe inside a Markdown table cell.
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {line[:120]}".replace("|", "/")


def _relative(grads, reference):
    return float(relative_error(grads, _to_float64(reference)))


@dataclasses.dataclass
class Cell:
    name: str
    compiled: object = None
    args: tuple = ()
    row: dict = dataclasses.field(default_factory=dict)
    grads: object = None


def _compile(name, regime, model, data, loss):
    reversible, adjoint_cls = ADJOINTS[name]
    cell = Cell(label(name, regime.base))
    cell.row.update(regime=regime.number, adjoint=cell.name)
    grad = _forward_mode_grad(loss) if name == FORWARD else eqx.filter_grad(loss)
    cell.args = (model, data, _solver(reversible, regime.base), adjoint_cls())
    start = time.perf_counter()
    try:
        cell.compiled = eqx.filter_jit(grad).lower(*cell.args).compile()
    except Exception as error:
        cell.row["note"] = "unsupported: " + _reason(error)
        return cell
    cell.row["compile_s"] = time.perf_counter() - start
    if cell.row["compile_s"] > 60:
        cell.row["note"] = f"compiling took {cell.row['compile_s']:.0f} s"
    memory = cell.compiled.compiled.memory_analysis()
    cell.row["temp_bytes"] = memory.temp_size_in_bytes
    return cell


def _first_call(cell):
    """Runs the gradient once (warm-up, and the gradient to compare); its time decides
    whether the repeats are worth running."""
    if cell.compiled is None:
        return
    if cell.row["temp_bytes"] > RUN_MEMORY_LIMIT:
        cell.row["note"] = "not run: its temporary memory"
        return
    start = time.perf_counter()
    try:
        cell.grads = jax.block_until_ready(cell.compiled(*cell.args))
    except Exception as error:  # how it surfaces depends on the jit in use
        if "reconstructed the forward solve" in str(error):
            # The default `reconstruction_tol` stopped an inaccurate gradient.
            cell.row["note"] = "stopped by reconstruction_tol"
        else:
            cell.row["note"] = "failed: " + _reason(error)
        return
    cell.row["first_call_s"] = time.perf_counter() - start


def _predicted_s(regime, cell, earlier_rows):
    for r in earlier_rows:
        if r["regime"] == regime.predict_from and r["adjoint"] == cell.name:
            return r["grad_s"] * regime.steps_ratio if "grad_s" in r else None
    return None


def _float64_reference(regime, model, data):
    """Backpropagation through the base solver, in float64."""
    _, _, loss64 = regime.make(jnp.float64)
    model64, data64 = _to_float64((model, data))
    return eqx.filter_jit(eqx.filter_grad(loss64))(
        model64, data64, regime.base(), diffrax.RecursiveCheckpointAdjoint()
    )


def _time_interleaved(cells, regime, repeats):
    """Each repeat runs every timed adjoint once, so that a change in the machine's load
    falls on all of them alike."""
    timed = [
        c
        for c in cells
        if c.grads is not None and c.row["first_call_s"] < regime.time_limit_s
    ]
    for c in cells:
        if c.grads is not None and all(c is not t for t in timed):
            c.row["note"] = (
                f"not timed: one call took {c.row['first_call_s']:.1f} s "
                f"(> {regime.time_limit_s:g} s)"
            )
    times = {c.name: [] for c in timed}
    for _ in range(repeats):
        for c in timed:
            start = time.perf_counter()
            jax.block_until_ready(c.compiled(*c.args))
            times[c.name].append(time.perf_counter() - start)
    for c in timed:
        c.row["times_s"] = times[c.name]
        c.row["grad_s"] = statistics.median(times[c.name])


def measure_regime(regime, repeats, earlier_rows=()):
    load_before = os.getloadavg()
    start = time.perf_counter()
    model, data, loss = regime.make(regime.dtype)
    names = [n for n in CONTENDERS if n != FORWARD or regime.forward_mode]
    cells = [_compile(n, regime, model, data, loss) for n in names]
    for c in cells:
        predicted = _predicted_s(regime, c, earlier_rows)
        if predicted is not None and predicted >= regime.time_limit_s:
            c.row["note"] = (
                f"not run: regime {regime.predict_from}'s time x "
                f"{regime.steps_ratio:g} predicts {predicted:.0f} s "
                f"(> {regime.time_limit_s:g} s)"
            )
        else:
            _first_call(c)
    # The row that the ratios are to: ours, or the remedy where ours stopped.
    ours = cells[0]
    if ours.row.get("note") == "stopped by reconstruction_tol":
        remedy = _compile(OURS_CHECKPOINTED, regime, model, data, loss)
        _first_call(remedy)
        cells.insert(1, remedy)
        ours = remedy if remedy.grads is not None else ours
    ours.row["baseline"] = True
    same = None
    if ours.grads is not None:
        same = _compile(SAME_DISCRETISATION, regime, model, data, loss)
        _first_call(same)
        if same.grads is not None:
            ours.row["exactness"] = _relative(ours.grads, same.grads)
    if regime.float64_reference and any(c.grads is not None for c in cells):
        reference = _float64_reference(regime, model, data)
        for c in cells:
            if c.grads is not None:
                c.row["rel_diff_f64"] = _relative(c.grads, reference)
    _time_interleaved(cells, regime, repeats)
    for c in cells if same is None else [*cells, same]:
        c.grads = None  # the large-state gradients need not outlive their regime
    rows = [c.row for c in cells]
    for row in rows:
        row["load_before"] = load_before
        row["load_after"] = os.getloadavg()
    print_regime(regime, rows, time.perf_counter() - start)
    return rows


def _ratio(row, ours, key):
    if key in row and key in ours and ours[key]:
        return row[key] / ours[key]
    return None


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _baseline(rows):
    return next(r for r in rows if r.get("baseline"))


def print_regime(regime, rows, seconds):
    ours = _baseline(rows)
    load_before, load_after = rows[0]["load_before"], rows[0]["load_after"]
    dtype = jnp.dtype(regime.dtype).name
    print(f"\n### {regime.number}. {regime.title}, {dtype}\n")
    print(
        f"Load average (1, 5, 15 min) {_load(load_before)} before, "
        f"{_load(load_after)} after; {seconds:.0f} s for the regime."
    )
    if regime.time_limit_s != float("inf"):
        print(
            f"Gradients timed only where one call took under {regime.time_limit_s:g} s."
        )
    if ours is not rows[0]:
        print(
            "Ours stopped (the reconstruction check): ratios are to "
            f"`{ours['adjoint']}`, the remedy its message suggests."
        )
    if not regime.float64_reference:
        print("No float64 reference: the Brownian tree samples differently in float64.")
    same = label(SAME_DISCRETISATION, regime.base)
    print(
        "\n| adjoint | temp memory (MiB) | memory / ours | gradient (s) | time / ours "
        f"| rel. diff vs f64 base | exactness: vs {same}, {dtype} | notes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        memory = r.get("temp_bytes")
        memory_ratio, time_ratio = (
            _ratio(r, ours, "temp_bytes"),
            _ratio(r, ours, "grad_s"),
        )
        print(
            f"| {r['adjoint']} "
            f"| {_fmt(memory and memory / 2**20, '.3f')} "
            f"| {_fmt(memory_ratio, '.2f')} "
            f"| {_fmt(r.get('grad_s'), '.4f')} "
            f"| {_fmt(time_ratio, '.2f')} "
            f"| {_fmt(r.get('rel_diff_f64'), '.1e')} "
            f"| {_fmt(r.get('exactness'), '.1e') if r is ours else ''} "
            f"| {r.get('note', '')} |",
            flush=True,
        )


def _load(load):
    return "/".join(f"{x:.1f}" for x in load)


def print_summary(regimes, rows):
    names = [n.format(base="base") for n in CONTENDERS if n != OURS]
    print("\n### Summary: memory / time, each as a ratio to ours\n")
    print(
        "Ours is `Reversible(base)+ReversibleAdjoint`; a ratio above 1 means more "
        "memory or time than ours. — : not measured (see the regime's notes).\n"
    )
    print("| regime | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for regime in regimes:
        mine = [r for r in rows if r["regime"] == regime.number]
        ours = _baseline(mine)
        cells = []
        for name in CONTENDERS[1:]:
            row = next(
                (r for r in mine if r["adjoint"] == label(name, regime.base)), None
            )
            if row is None:
                cells.append("n/a")
                continue
            memory = _fmt(_ratio(row, ours, "temp_bytes"), ".2f")
            cells.append(f"{memory} / {_fmt(_ratio(row, ours, 'grad_s'), '.2f')}")
        name = f"{regime.number}. {regime.title.split(':')[0]}"
        if ours is not mine[0]:
            name += ' (ours stopped; ratios to checkpoint_every="auto")'
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="regimes 1, 5, 7")
    parser.add_argument("--repeats", type=int, default=None, help="5; 3 with --quick")
    parser.add_argument(
        "--regimes", default=None, help="comma-separated numbers, e.g. 1,5"
    )
    parser.add_argument(
        "--out",
        default=str(pathlib.Path(__file__).parent / "results" / "chooser.json"),
    )
    options = parser.parse_args()
    jax.config.update("jax_enable_x64", True)  # regime 3 and the float64 references
    # A stop by the reconstruction check is a result, reported in its cell: not a
    # traceback from the callback that raises it.
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
    regimes = _regimes()
    if options.regimes:
        wanted = {int(n) for n in options.regimes.split(",")}
    else:
        wanted = {1, 5, 7} if options.quick else {r.number for r in regimes}
    regimes = [r for r in regimes if r.number in wanted]
    repeats = options.repeats or (3 if options.quick else 5)
    start = time.perf_counter()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.default_backend()}; jax {jax.__version__}, "
        f"diffrax {diffrax.__version__}; median of {repeats}, adjoints interleaved; "
        f"load average {_load(os.getloadavg())} at the start"
    )
    rows = []
    for regime in regimes:
        rows += measure_regime(regime, repeats, rows)
    print_summary(regimes, rows)
    print(
        f"\nTotal {time.perf_counter() - start:.0f} s; load average "
        f"{_load(os.getloadavg())} at the end."
    )
    write_rows(rows, options.out)


if __name__ == "__main__":
    main()
