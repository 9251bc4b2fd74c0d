"""What the paper's experiments share: the model, the training loop, the base solvers
Diffrax does not ship, and the table printing.

The setup is the paper's (McCallum & Foster, arXiv 2410.11648, section 5): float64; an
MLP vector field of one hidden layer of width 10 with tanh; `SaveAt(steps=True)`;
AdamW with learning rate 1e-2 and weight decay 1e-5 (optax); the best training loss is
kept; the runtime is that of the training loop after compilation.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import diffrax_reversible as dr  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


RESULTS = pathlib.Path(__file__).parent / "results"
PAPER_COUPLING = 0.999


# Diffrax ships Euler, Midpoint (2nd order) and Bosh3, but neither the classical RK4 nor
# Ralston's 3rd-order method, which the paper uses: both as Diffrax tableaus.
_RK4_TABLEAU = diffrax.ButcherTableau(
    c=np.array([0.5, 0.5, 1.0]),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    b_error=np.zeros(4),
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
)
_RALSTON3_TABLEAU = diffrax.ButcherTableau(
    c=np.array([0.5, 0.75]),
    b_sol=np.array([2 / 9, 1 / 3, 4 / 9]),
    b_error=np.zeros(3),
    a_lower=(np.array([0.5]), np.array([0.0, 0.75])),
)


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge--Kutta method (no error estimate)."""

    tableau = _RK4_TABLEAU
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


class Ralston3(diffrax.AbstractERK):
    """Ralston's 3rd-order method, the 3-stage one of least truncation error."""

    tableau = _RALSTON3_TABLEAU
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 3


BASES = {
    "Euler": diffrax.Euler,
    "Midpoint": diffrax.Midpoint,
    "Ralston3": Ralston3,
    "RK4": RK4,
}


class MLPField(eqx.Module):
    """The paper's vector field: one hidden layer of width 10, tanh; optionally fed
    the time as an extra input."""

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(self, state: int, *, time_dependent: bool, key):
        inputs = state + 1 if time_dependent else state
        self.mlp = eqx.nn.MLP(inputs, state, 10, 1, activation=jnp.tanh, key=key)
        self.time_dependent = time_dependent

    def __call__(self, t, y, args):
        if self.time_dependent:
            y = jnp.concatenate([jnp.atleast_1d(t).astype(y.dtype), y])
        return self.mlp(y)


def default_checkpoints(max_steps: int) -> int:
    """Diffrax's default number of checkpoints of `RecursiveCheckpointAdjoint`."""
    return math.floor(-1.5 + math.sqrt(2 * max_steps + 0.25)) + 1


# RCA with this few checkpoints costs ~100x the others per training step: it trains
# this share of the steps, and its runtime is scaled up from its cost per step (the
# number of steps of a constant-step solve does not change while training; a full run
# of it would take hours, as in the paper).
SHORT_CHECKPOINTS = 2
SHORT_FRACTION = 1 / 20


def configurations(base, checkpoints) -> list[dict]:
    """The configurations of one experiment for one base, as dicts with `config` (a
    label), `solver`, `adjoint` and `fraction` (of the training steps it runs):
    `Reversible` with its default (automatic) coupling and with the paper's fixed
    coupling, then the base under `RecursiveCheckpointAdjoint` for each number of
    checkpoints (see `SHORT_CHECKPOINTS`)."""
    base = BASES[base]() if isinstance(base, str) else base
    name = type(base).__name__
    rows = [
        dict(
            config=f"Reversible({name})",
            solver=dr.Reversible(base),
            adjoint=dr.ReversibleAdjoint(),
            fraction=1.0,
        ),
        dict(
            config=f"Reversible({name}, λ={PAPER_COUPLING})",
            solver=dr.Reversible(base, coupling_parameter=PAPER_COUPLING),
            adjoint=dr.ReversibleAdjoint(),
            fraction=1.0,
        ),
    ]
    for c in checkpoints:
        rows.append(
            dict(
                config=f"{name}+RecursiveCheckpoint(c={c})",
                solver=base,
                adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=c),
                fraction=SHORT_FRACTION if c <= SHORT_CHECKPOINTS else 1.0,
            )
        )
    return rows


def train_interleaved(
    configs: list[dict], loss: Callable, model, *, steps: int, chunk: int
) -> tuple[list[dict], list]:
    """Train one copy of `model` per configuration (see `configurations`) for its
    share of `steps` AdamW steps, the loss being `loss(model, solver, adjoint)`.
    Returns a row of measurements per configuration, and the trained models.

    The configurations take turns, `chunk` steps at a time: the machine is shared, and
    what disturbs one configuration then disturbs the others alike. Each training step
    is compiled and run once before the clock starts.
    """
    optim = optax.adamw(1e-2, weight_decay=1e-5)
    states = []
    for config in configs:

        @eqx.filter_jit
        def make_step(model, opt_state, solver=config["solver"], adj=config["adjoint"]):
            value, grads = eqx.filter_value_and_grad(loss)(model, solver, adj)
            updates, opt_state = optim.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
            )
            return value, eqx.apply_updates(model, updates), opt_state

        opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
        start = time.perf_counter()
        compiled = make_step.lower(model, opt_state).compile()
        compile_s = time.perf_counter() - start
        # A throwaway step, so that every configuration starts from the same model.
        jax.block_until_ready(compiled(model, opt_state))
        states.append(
            dict(
                config=config["config"],
                target=max(1, round(config["fraction"] * steps)),
                step=compiled,
                model=model,
                opt_state=opt_state,
                losses=[],
                runtime_s=0.0,
                compile_s=compile_s,
            )
        )
    while any(len(s["losses"]) < s["target"] for s in states):
        for state in states:
            count = min(chunk, state["target"] - len(state["losses"]))
            if count == 0:
                continue
            model, opt_state, losses = state["model"], state["opt_state"], []
            start = time.perf_counter()
            for _ in range(count):
                value, model, opt_state = state["step"](model, opt_state)
                losses.append(value)
            jax.block_until_ready(losses)
            state["runtime_s"] += time.perf_counter() - start
            state.update(model=model, opt_state=opt_state)
            state["losses"] += [float(x) for x in losses]
        print(
            f"  {len(states[0]['losses'])}/{steps} steps, "
            f"{sum(s['runtime_s'] for s in states):.0f} s, load {load()}",
            flush=True,
        )
    rows = []
    for s in states:
        trained = len(s["losses"])
        rows.append(
            dict(
                config=s["config"],
                steps=trained,
                # A configuration that trained a share of the steps is reported at
                # its measured cost per step.
                runtime_s=s["runtime_s"] * steps / trained,
                extrapolated=trained < steps,
                compile_s=s["compile_s"],
                best_loss=min(s["losses"]),
                final_loss=s["losses"][-1],
            )
        )
    return rows, [s["model"] for s in states]


def command_line(title: str, steps: tuple[int, int], *, bases: bool, argv):
    """The options of a training experiment: `--quick` or `--full` (`steps`, the
    training steps of each), or `--steps N`; with `bases`, `--bases`. Returns the
    options and the number of training steps."""
    parser = argparse.ArgumentParser(description=title)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"{steps[0]} steps")
    mode.add_argument("--full", action="store_true", help=f"{steps[1]} steps")
    if bases:
        parser.add_argument("--bases", nargs="+", default=list(BASES))
    parser.add_argument("--steps", type=int, help="override the training steps")
    options = parser.parse_args(argv)
    return options, options.steps or steps[1 if options.full else 0]


def run_over_bases(
    title: str,
    name: str,
    *,
    fit: tuple,
    state: int,
    time_dependent: bool,
    checkpoints: tuple[int, ...],
    steps: tuple[int, int],
    paper: dict | None = None,
    paper_note: str,
    argv=None,
) -> None:
    """An experiment that trains the paper's MLP on the data `fit = (ts, ys)` for each
    base (see `command_line`). Prints a table per base, with `paper` (the paper's
    numbers by configuration) beside the rows it names, then `paper_note`; writes
    `results/` (see `run_name`)."""
    options, training_steps = command_line(title, steps, bases=True, argv=argv)
    print(f"{title}: {machine()}; {training_steps} training steps")
    ts, ys = fit

    def loss(model, solver, adjoint):
        return mse_at_steps(model, solver, adjoint, ts=ts, ys=ys)

    results = {}
    for base in options.bases:
        print(f"\n{base}, load {load()}")
        model = MLPField(state, time_dependent=time_dependent, key=jr.key(0))
        configs = configurations(base, checkpoints)
        results[base], _ = train_interleaved(
            configs,
            loss,
            model,
            steps=training_steps,
            chunk=max(1, training_steps // 10),
        )
    print(f"\nload average at the end: {load()}")
    for base, rows in results.items():
        print(f"\n### {base}\n")
        print_training_table(rows, paper)
    print(f"\n{paper_note}")
    write_json(
        run_name(name, options),
        dict(machine=machine(), steps=training_steps, results=results),
    )


def solve_at_steps(model, solver, adjoint, *, ts, y0, controller=None, max_steps=None):
    """The model's solution at every step (`SaveAt(steps=True)`) from `ts[0]` to
    `ts[-1]`, with initial step `ts[1] - ts[0]` and, by default, `max_steps` the number
    of steps of that size."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(model),
        solver,
        ts[0],
        ts[-1],
        ts[1] - ts[0],
        y0,
        saveat=diffrax.SaveAt(steps=True),
        adjoint=adjoint,
        max_steps=max_steps or len(ts) - 1,
        stepsize_controller=controller or diffrax.ConstantStepSize(),
    )
    return sol.ts, sol.ys


def mse_at_steps(model, solver, adjoint, *, ts, ys):
    """The paper's loss on a constant step grid: the mean squared error between the
    solution at every step and the data there."""
    _, pred = solve_at_steps(model, solver, adjoint, ts=ts, y0=ys[0])
    return jnp.mean((pred - ys[1:]) ** 2)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, backend "
        f"{jax.default_backend()}; jax {jax.__version__}, diffrax "
        f"{diffrax.__version__}, diffrax-reversible {dr.__version__}"
    )


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def print_training_table(rows: list[dict], paper: dict | None = None) -> None:
    """Runtime of the training loop; each row's over that of `Reversible` with the
    default coupling and with the paper's (the ratio the paper reports); best loss;
    and the paper's runtime and ratio where it gives them."""
    default, fixed = rows[0], rows[1]
    paper = paper or {}
    print(
        "| configuration | runtime (s) | / Reversible | / Reversible(λ=0.999) "
        "| compile (s) | best loss | paper: runtime | paper: / Reversible(λ=0.999) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["runtime_s"] / default["runtime_s"]
        ratio_fixed = row["runtime_s"] / fixed["runtime_s"]
        published = paper.get(row["config"], ("", ""))
        runtime = f"{row['runtime_s']:.2f}"
        loss = f"{row['best_loss']:.3e}"
        if row["extrapolated"]:
            runtime += f" ({row['steps']} steps, scaled)"
            loss += f" (after {row['steps']})"
        print(
            f"| {row['config']} | {runtime} | {ratio:.2f}x | {ratio_fixed:.2f}x "
            f"| {row['compile_s']:.1f} "
            f"| {loss} | {published[0]} | {published[1]} |"
        )


def run_name(name: str, options) -> str:
    """The results file of a run: `--quick`, `--full`, or `--steps N` apart."""
    if getattr(options, "steps", None):
        return f"{name}_{options.steps}_steps"
    return f"{name}_{'full' if options.full else 'quick'}"


def write_json(name: str, payload) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nWrote {out}")


def solve_exactly(vector_field, y0, ts, args=None):
    """A reference solution on the grid `ts`: Tsit5 at tolerances far below the
    models' errors."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Tsit5(),
        ts[0],
        ts[-1],
        (ts[1] - ts[0]) / 4,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=200_000,
    )
    return sol.ys
