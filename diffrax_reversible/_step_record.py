"""What the forward pass leaves for the backward pass: the times of the accepted steps
(and any checkpoints), recorded by Diffrax's own loop, and the residuals of the custom
VJP."""

from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._checkpoints import (
    CheckpointEvery,
    Checkpoints,
    init_checkpoints,
    record_checkpoint,
)
from ._diffrax_internals import (
    constant_step_count,
    current_state,
    event_record,
    EventRecord,
    is_sde,
    num_accepted_steps,
    num_saved,
    num_ts_saved,
    outer_loop_with_record,
    save_states,
    saved_ts,
    saved_ys,
    step_interval,
)
from ._event import event_time
from ._misc import shape_structs


class StepRecord(eqx.Module):
    """The interval of every accepted step, in buffers of length `max_steps`."""

    # Only where a step may start elsewhere than where the previous one ended.
    starts: Array | None
    # Only where the ends are not known in closed form (see `step_ends_are_known`).
    ends: Array | None
    # With `ReversibleAdjoint(checkpoint_every=...)`.
    checkpoints: Checkpoints | None


def _record_buffers(record: StepRecord):
    # The arrays written at one index per step (in place, inside the loop).
    checkpoints = record.checkpoints
    states = None if checkpoints is None else checkpoints.states
    return record.starts, record.ends, states


def recording_while_loop(
    record_starts: bool,
    record_ends: bool,
    checkpoint_every: CheckpointEvery,
    max_checkpoints: int,
    records_out: list,
):
    """Diffrax's outer loop, additionally writing the interval of every accepted step
    (and any checkpoints) into buffers sized by `max_steps`; the final `StepRecord` is
    appended to `records_out`."""

    def init_record(init_state, max_steps):
        tprev, _ = step_interval(init_state)
        empty = jnp.full(max_steps, jnp.inf, dtype=jnp.result_type(tprev))
        checkpoints = init_checkpoints(
            checkpoint_every, max_checkpoints, max_steps, init_state
        )
        return StepRecord(
            starts=empty if record_starts else None,
            ends=empty if record_ends else None,
            checkpoints=checkpoints,
        )

    def record_step(state, record):
        index = num_accepted_steps(state)
        tprev, tnext = step_interval(state)
        # Written on every attempt: a rejected step is overwritten by the next
        # attempt, which has the same index.
        starts = record.starts
        if starts is not None:
            starts = starts.at[index].set(tprev)
        ends = record.ends
        if ends is not None:
            ends = ends.at[index].set(tnext)
        checkpoints = record.checkpoints
        if checkpoints is not None:
            checkpoints = record_checkpoint(checkpoints, checkpoint_every, state)
        return StepRecord(starts=starts, ends=ends, checkpoints=checkpoints)

    return outer_loop_with_record(
        init_record, record_step, _record_buffers, records_out
    )


def steps_are_contiguous(controller: diffrax.AbstractStepSizeController) -> bool:
    """Whether every accepted step starts where the previous one ended. Then only the
    ends of the steps need recording."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        return controller.jump_ts is None and steps_are_contiguous(
            controller.controller
        )
    return isinstance(
        controller,
        (diffrax.ConstantStepSize, diffrax.StepTo, diffrax.PIDController),
    )


def step_ends_are_known(controller, event, terms) -> bool:
    """Whether the backward pass computes the end of every step itself
    (`known_step_end`), so that nothing is recorded per step: with `StepTo`, and with
    `ConstantStepSize` without an event (only an event stops a solve to an infinite
    `t1`, where Diffrax adds up `dt0` step after step; whether `t1` is finite is only
    known at run time); not for SDEs.

    Diffrax computes the end of step `k` of `ConstantStepSize` as `t0 + (t1 - t0) *
    (k + 1) / n`, which XLA contracts into a fused multiply-add or not, depending on
    how it fuses the program around it: the same formula in the backward pass may
    differ in the last bit (about a third of the steps in float32). On an ODE or a
    CDE, that moves the undone step by a round-off error. A Brownian path, though,
    is rough: an increment from a time one bit off differs by far more than
    round-off, so SDEs keep their recorded times."""
    if is_sde(terms):
        return False
    if type(controller) is diffrax.StepTo:
        return True
    return type(controller) is diffrax.ConstantStepSize and event is None


def step_times_are_differentiable(controller) -> bool:
    # The step times of these are closed-form functions of `t0`, `t1`, `dt0`; an
    # adaptive controller's depend on its whole history of accepted and rejected steps.
    return type(controller) in (diffrax.ConstantStepSize, diffrax.StepTo)


class Residuals(eqx.Module):
    """What the backward pass reads of the forward solve."""

    record: StepRecord
    num_steps: Array
    y_final: PyTree[Array]
    z_final: PyTree[Array]
    # Per `SubSaveAt`: how many of its `ts` were saved, how many outputs in all, and
    # the shapes of its outputs.
    ts_saved: list[Array]
    save_index: list[Array]
    ys_shapes: list[PyTree[Any]]
    ts_shapes: list[Any]
    controller_num_steps: Array | None
    event: EventRecord
    event_time: Array | None


def residuals_of(
    record: StepRecord, final_state, stepsize_controller, event, subs
) -> Residuals:
    """The residuals of a forward solve, from its record and Diffrax's final loop
    state."""
    states = save_states(final_state)
    y_final, z_final = current_state(final_state)
    return Residuals(
        record=record,
        num_steps=num_accepted_steps(final_state),
        y_final=y_final,
        z_final=z_final,
        ts_saved=[num_ts_saved(s) for s in states],
        save_index=[num_saved(s) for s in states],
        ys_shapes=[shape_structs(saved_ys(s)) for s in states],
        ts_shapes=[shape_structs(saved_ts(s)) for s in states],
        controller_num_steps=constant_step_count(stepsize_controller, final_state),
        event=event_record(final_state),
        event_time=event_time(event, subs, states, step_interval(final_state)[0]),
    )
