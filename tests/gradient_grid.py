"""The gradient grid: `ReversibleAdjoint`'s gradients over every base solver × `SaveAt`
kind × step size controller, written to a file and compared with an earlier one.

A refactor of the backward pass must leave every number as it was (to round-off):

    python -m tests.gradient_grid --write before.json     # on the commit before
    python -m tests.gradient_grid --compare before.json   # on the commit after

`--compare` prints the largest relative difference per configuration and exits with
status 1 if any exceeds `--tol` (default 1e-14). Float64 throughout.

Besides the grid, a few configurations reach the rest of the backward pass: terminating
events (with and without a root finder), `checkpoint_every`, gradients with respect to
`t1` and `StepTo.ts`, and a saved solver state.
"""

import argparse
import itertools
import json
import sys
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import diffrax_reversible as dr  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402


BASES = ("Euler", "Heun", "Midpoint", "Ralston", "Bosh3", "Tsit5", "Dopri5", "Dopri8")
NATIVE = ("ReversibleHeun", "LeapfrogMidpoint")
SAVEATS = ("t1", "t0+ts", "steps", "steps=3+fn", "dense", "subs")
CONTROLLERS = ("constant", "step_to", "pid", "clip")
# Solvers without an error estimate take the non-adaptive controllers only.
WITHOUT_ERROR_ESTIMATE = ("Euler", *NATIVE)
NON_ADAPTIVE = ("constant", "step_to")
T0, T1 = 0.0, 2.0
TS = jnp.array([0.3, 0.9, 1.7])


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return args * self.mlp(y) - 0.3 * y + jnp.sin(t)


def _solver(name):
    if name in NATIVE:
        return getattr(diffrax, name)()
    return dr.Reversible(getattr(diffrax, name)())


def _controller(name):
    if name == "constant":
        return diffrax.ConstantStepSize(), 0.1
    if name == "step_to":
        return diffrax.StepTo(ts=T0 + (T1 - T0) * jnp.linspace(0, 1, 19) ** 1.3), None
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-7)
    if name == "pid":
        return pid, 0.1
    clip = diffrax.ClipStepSizeController(pid, step_ts=jnp.array([0.5, 1.1]))
    return clip, 0.1


def _saveat(name, ts):
    fn = lambda t, y, args: jnp.tanh(y) * t
    return {
        "t1": diffrax.SaveAt(t1=True),
        "t0+ts": diffrax.SaveAt(t0=True, ts=ts),
        "steps": diffrax.SaveAt(steps=True),
        "steps=3+fn": diffrax.SaveAt(steps=3, fn=fn, t1=True),
        "dense": diffrax.SaveAt(t1=True, dense=True),
        "subs": diffrax.SaveAt(
            subs=[diffrax.SubSaveAt(ts=ts, fn=fn), diffrax.SubSaveAt(steps=2, t1=True)]
        ),
    }[name]


def _loss(inputs, solver, controller, dt0, saveat_name):
    field, y0, args, ts = inputs
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        T0,
        T1,
        dt0,
        y0,
        args=args,
        saveat=_saveat(saveat_name, ts),
        stepsize_controller=controller,
        adjoint=dr.ReversibleAdjoint(),
        max_steps=256,
    )
    total = jnp.zeros(())
    for leaf in jax.tree.leaves((sol.ys, sol.ts)):
        total = total + jnp.sum(jnp.where(jnp.isfinite(leaf), leaf, 0.0) ** 2)
    if saveat_name == "dense":
        total = total + jnp.sum(sol.evaluate(jnp.array(1.23)) ** 2)
    return total


class _Extra(eqx.Module):
    """A configuration outside the grid: its own `SaveAt`, event, adjoint and times."""

    solver: str
    controller: str
    saveat: diffrax.SaveAt
    event: diffrax.Event | None = None
    checkpoint_every: int | None = None
    times_differentiated: bool = False


def _extras(ts):
    fn = lambda t, y, args: jnp.tanh(y) * t
    # Crosses zero near t = 1.5, at a time that depends on the state.
    crossing = diffrax.Event(
        lambda t, y, args, **kwargs: t - 1.5 + 0.1 * jnp.tanh(y[0])
    )
    crossing_newton = diffrax.Event(
        crossing.cond_fn, optx.Newton(rtol=1e-12, atol=1e-12)
    )
    everything = diffrax.SaveAt(
        subs=[
            diffrax.SubSaveAt(t0=True, ts=ts, fn=fn),
            diffrax.SubSaveAt(steps=3, t1=True),
        ],
        dense=True,
    )
    at_ts = diffrax.SaveAt(t0=True, ts=ts, t1=True)
    return {
        "Tsit5/event/constant": _Extra("Tsit5", "constant", everything, crossing),
        "Tsit5/event+newton/constant": _Extra(
            "Tsit5", "constant", at_ts, crossing_newton
        ),
        "Tsit5/event+newton/pid": _Extra("Tsit5", "pid", at_ts, crossing_newton),
        "ReversibleHeun/event+newton/step_to": _Extra(
            "ReversibleHeun", "step_to", at_ts, crossing_newton
        ),
        "Tsit5/checkpoint_every=3/pid": _Extra(
            "Tsit5", "pid", everything, checkpoint_every=3
        ),
        "LeapfrogMidpoint/checkpoint_every=3/constant": _Extra(
            "LeapfrogMidpoint", "constant", everything, checkpoint_every=3
        ),
        "Tsit5/t1/constant": _Extra(
            "Tsit5", "constant", everything, times_differentiated=True
        ),
        "Heun/t1+step_ts/step_to": _Extra(
            "Heun", "step_to", everything, times_differentiated=True
        ),
        "ReversibleHeun/t1/constant": _Extra(
            "ReversibleHeun", "constant", everything, times_differentiated=True
        ),
        "LeapfrogMidpoint/t1+step_ts/step_to": _Extra(
            "LeapfrogMidpoint", "step_to", at_ts, times_differentiated=True
        ),
        "Tsit5/t1+event/constant": _Extra(
            "Tsit5", "constant", at_ts, crossing_newton, times_differentiated=True
        ),
        "Tsit5/solver_state/pid": _Extra(
            "Tsit5", "pid", diffrax.SaveAt(t1=True, solver_state=True)
        ),
    }


def _extra_loss(inputs_times, extra: _Extra, controller, dt0):
    (field, y0, args, _), (t1, step_ts) = inputs_times
    if step_ts is not None:
        controller = diffrax.StepTo(ts=step_ts.at[-1].set(t1))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        _solver(extra.solver),
        T0,
        t1,
        dt0,
        y0,
        args=args,
        saveat=extra.saveat,
        stepsize_controller=controller,
        event=extra.event,
        adjoint=dr.ReversibleAdjoint(checkpoint_every=extra.checkpoint_every),
        max_steps=256,
    )
    outputs = (sol.ys, sol.ts)
    if extra.saveat.solver_state:
        outputs = (outputs, sol.solver_state)
    total = jnp.zeros(())
    for leaf in jax.tree.leaves(eqx.filter(outputs, eqx.is_inexact_array)):
        total = total + jnp.sum(jnp.where(jnp.isfinite(leaf), leaf, 0.0) ** 2)
    if extra.saveat.dense:
        total = total + jnp.sum(sol.evaluate(jnp.array(1.23)) ** 2)
    return total


def configurations():
    for solver, saveat, controller in itertools.product(
        BASES + NATIVE, SAVEATS, CONTROLLERS
    ):
        if solver in WITHOUT_ERROR_ESTIMATE and controller not in NON_ADAPTIVE:
            continue
        yield f"{solver}/{saveat}/{controller}", solver, saveat, controller


def compute() -> dict[str, list[float]]:
    key_mlp, key_y0 = jr.split(jr.key(5678))
    field = Field(eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=key_mlp))
    inputs = (field, jr.normal(key_y0, (3,)), jnp.array(0.7), TS)
    results = {}
    for name, solver, saveat, controller_name in configurations():
        controller, dt0 = _controller(controller_name)
        grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))
        results[name] = _evaluate(
            name, grad, inputs, _solver(solver), controller, dt0, saveat
        )
    for name, extra in _extras(TS).items():
        controller, dt0 = _controller(extra.controller)
        if extra.times_differentiated:
            step_ts = controller.ts if extra.controller == "step_to" else None
            times = (jnp.array(T1), step_ts)
        else:
            times = (T1, None)
        grad = eqx.filter_jit(eqx.filter_value_and_grad(_extra_loss))
        results[name] = _evaluate(name, grad, (inputs, times), extra, controller, dt0)
    return results


def _evaluate(name, grad, *args) -> list[float] | str:
    """The loss and its gradient, flattened; or, where the solve raises, the name of
    the error (which must then be the same before and after)."""
    try:
        value, grads = grad(*args)
        result = _flatten(value, grads)
    except Exception as e:
        result = type(e).__name__
    jax.clear_caches()
    print(f"{name}: {'ok' if isinstance(result, list) else result}", file=sys.stderr)
    return result


def _flatten(value, grads) -> list[float]:
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    return [float(value)] + [float(x) for leaf in leaves for x in np.ravel(leaf)]


def compare(ours, before) -> list[tuple[str, float]]:
    rows = []
    for name, reference in before.items():
        if name not in ours:
            rows.append((name, np.inf))
            continue
        if isinstance(reference, str) or isinstance(ours[name], str):
            rows.append((name, 0.0 if ours[name] == reference else np.inf))
            continue
        a, b = np.asarray(ours[name]), np.asarray(reference)
        if a.shape != b.shape:
            rows.append((name, np.inf))
            continue
        scale = max(float(np.max(np.abs(b))), 1e-300)
        rows.append((name, float(np.max(np.abs(a - b))) / scale))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", help="write the grid to this file")
    group.add_argument("--compare", help="compare the grid with this file")
    parser.add_argument("--tol", type=float, default=1e-14)
    options = parser.parse_args(argv)
    start = time.perf_counter()
    ours = compute()
    print(f"{len(ours)} configurations in {time.perf_counter() - start:.0f} s")
    if options.write:
        with open(options.write, "w") as f:
            json.dump(ours, f)
        return 0
    with open(options.compare) as f:
        before = json.load(f)
    rows = compare(ours, before)
    worst = max((error for _, error in rows), default=0.0)
    for name, error in sorted(rows, key=lambda row: -row[1])[:10]:
        print(f"  {name}: {error:.2g}")
    print(f"largest relative difference {worst:.2g} (tolerance {options.tol:g})")
    return 0 if worst <= options.tol else 1


if __name__ == "__main__":
    sys.exit(main())
