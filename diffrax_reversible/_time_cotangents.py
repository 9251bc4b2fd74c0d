"""Gradients with respect to the times of the solve: with `ConstantStepSize` and
`StepTo` every step time is a closed-form function of `t0`, `t1`, `dt0` and `StepTo.ts`,
so the cotangent of each step's end is pulled back to those as the backward pass
passes it."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._diffrax_internals import step_end_time


class TimeCotangents(eqx.Module):
    """The cotangents of `t0`, `t1`, `dt0`, `StepTo.ts`, and of the end of the step
    being undone (pulled back to those once the step is done)."""

    t0: Array
    t1: Array
    dt0: Array
    end: Array
    step_ts: Array | None


def zero_time_cotangents(t0, step_ts) -> TimeCotangents:
    zero = jnp.zeros((), jnp.result_type(t0))
    return TimeCotangents(
        t0=zero,
        t1=zero,
        dt0=zero,
        end=zero,
        step_ts=None if step_ts is None else jnp.zeros_like(step_ts),
    )


def tie_share(tie, cotangent):
    """The share of `cotangent` that `jnp.minimum(a, b)` passes to `b`: JAX splits a
    tie in half."""
    return jnp.where(tie, 0.5 * cotangent, jnp.zeros_like(cotangent))


def pull_back_step_time(
    bwd, times: TimeCotangents, k, step, times_bar_k, saved_bar
) -> TimeCotangents:
    """Pulls the cotangent of the end of step `k` back to `t0`, `t1`, `dt0` and
    `StepTo.ts`, and starts the cotangent of the end of step `k - 1`: the start of
    this one.

    **Arguments:**

    - `bwd`: the backward pass's `Backward`.
    - `times`: the time cotangents so far.
    - `k`, `step`: the step's index and its `Interval`.
    - `times_bar_k`: the cotangents of the step's start and end from its VJP.
    - `saved_bar`: the cotangent of the time the outputs at the step's end were saved
        at, `min(end, t1)`.
    """
    inputs = bwd.inputs
    t0_bar_k, t1_bar_k = times_bar_k
    t1_bar = times.t1
    end_bar = times.end + t1_bar_k
    to_t1 = tie_share(step.t1 == inputs.t1, saved_bar)
    t1_bar = t1_bar + to_t1
    end_bar = end_bar + saved_bar - to_t1
    _, pull_back_end = jax.vjp(
        lambda t0, t1, dt0, step_ts: step_end_time(
            bwd.stepsize_controller,
            k,
            step.t1,
            t0,
            t1,
            dt0,
            step_ts,
            bwd.residuals.controller_num_steps,
        ),
        inputs.t0,
        inputs.t1,
        inputs.dt0,
        inputs.step_ts,
    )
    t0_bar_e, t1_bar_e, dt0_bar_e, step_ts_bar_e = pull_back_end(end_bar)
    return TimeCotangents(
        t0=times.t0 + t0_bar_e,
        t1=t1_bar + t1_bar_e,
        dt0=times.dt0 if inputs.dt0 is None else times.dt0 + dt0_bar_e,
        end=t0_bar_k,
        step_ts=None if inputs.step_ts is None else times.step_ts + step_ts_bar_e,
    )


def at_first_step_start(times: TimeCotangents) -> TimeCotangents:
    """Once every step is undone: the start of the first step is `t0`."""
    return eqx.tree_at(lambda t: t.t0, times, times.t0 + times.end)


def input_time_cotangents(times: TimeCotangents, t0, t1, dt0):
    """The cotangents of `(t0, t1, dt0)` as inputs of the custom VJP: `None` for those
    that are not inexact arrays."""
    bars = (times.t0, times.t1, None if dt0 is None else times.dt0.astype(dt0.dtype))
    return tuple(
        bar if eqx.is_inexact_array(t) else None for bar, t in zip(bars, (t0, t1, dt0))
    )
