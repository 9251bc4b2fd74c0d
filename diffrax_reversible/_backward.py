"""The backward pass, as in the paper: walk the accepted steps in reverse; at each, pull
back the outputs saved at its end, undo the step and take its vector-Jacobian product,
pull back its times, and restart from a checkpoint where one was stored."""

import dataclasses
import functools as ft

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._checkpoints import first_pointer, stored_state_at
from ._diagnostics import reconstruction_error
from ._event import event_cotangent, pull_back_event
from ._misc import error_dtype, tree_add, zeros_like_diff
from ._native import undo_step_by_inverse
from ._outputs import saveat_cotangent
from ._pull_back import Backward, BackwardCarry, Interval, SolveInputs, StepCotangents
from ._solver import Reversible
from ._time_cotangents import (
    at_first_step_start,
    input_time_cotangents,
    pull_back_step_time,
    zero_time_cotangents,
)


def _initial_carry(bwd: Backward) -> BackwardCarry:
    inputs, residuals = bwd.inputs, bwd.residuals
    y_bar, z_bar, args_bar, terms_bar = zeros_like_diff(
        (inputs.y0, inputs.z0, inputs.args, inputs.terms)
    )
    return BackwardCarry(
        k=residuals.num_steps - 1,
        state=(residuals.y_final, residuals.z_final),
        state_bar=(y_bar, z_bar),
        args_bar=args_bar,
        terms_bar=terms_bar,
        outputs=tuple(out.init() for out in bwd.outputs),
        times=zero_time_cotangents(inputs.t0, inputs.step_ts),
        max_error=jnp.zeros((), error_dtype()),
        checkpoint_pointer=first_pointer(bwd.record.checkpoints),
    )


def _pull_back_at_t1(bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
    for out in bwd.outputs:
        carry = out.at_t1(bwd, carry)
    return carry


def _pull_back_step_end(bwd: Backward, carry: BackwardCarry, step: Interval):
    """The outputs saved at the end of step `k`; returns the carry and the cotangent
    of the time they were saved at."""
    saved_time_bar = jnp.zeros((), jnp.result_type(bwd.inputs.t0))
    for out in bwd.outputs:
        carry, time_bar = out.at_step_end(bwd, carry, step)
        if time_bar is not None:
            saved_time_bar = saved_time_bar + time_bar
    return carry, saved_time_bar


def _pull_back_within_step(bwd: Backward, carry: BackwardCarry, step, dense_info):
    """The outputs interpolated within step `k`, pulled back to the step's
    `dense_info`, times and `args`."""
    step_times = (step.t0, step.t1)
    total = StepCotangents(*zeros_like_diff((dense_info, step_times, bwd.inputs.args)))
    for out in bwd.outputs:
        carry, step_bar = out.within_step(bwd, carry, step, dense_info)
        total = total + step_bar
    return carry, total


def _undo_step(bwd: Backward, carry: BackwardCarry, step: Interval):
    """Undoes step `k` and pulls the cotangents back through it; returns the carry
    (at the start of the step, with the step's time cotangents still to pull back)
    and the cotangents of the step's start and end times."""
    inputs, solver = bwd.inputs, bwd.solver
    if type(solver) is Reversible:
        undo_step = solver.undo_step
    else:
        t_before = bwd.step_start(jnp.maximum(carry.k - 1, 0))
        undo_step = ft.partial(undo_step_by_inverse, solver, t_before=t_before)
    (y1, z1), (y1_bar, z1_bar) = carry.state, carry.state_bar
    state0, dense_info, pull_back = undo_step(
        inputs.terms,
        step.t0,
        step.t1,
        y1,
        z1,
        inputs.args,
        y1_bar,
        z1_bar,
        bwd.uses_dense_info,
        bwd.with_step_times,
    )
    if bwd.uses_dense_info:
        carry, within = _pull_back_within_step(bwd, carry, step, dense_info)
    else:
        within = None
    y0_bar, z0_bar, args_bar_k, terms_bar_k, times_bar_k = pull_back(
        None if within is None else within.dense_info
    )
    t0_bar_k, t1_bar_k = (0, 0) if times_bar_k is None else times_bar_k
    args_bar = tree_add(carry.args_bar, args_bar_k)
    if within is not None:
        args_bar = tree_add(args_bar, within.args)
        interp_t0_bar, interp_t1_bar = within.times
        t0_bar_k = t0_bar_k + interp_t0_bar
        t1_bar_k = t1_bar_k + interp_t1_bar
    carry = dataclasses.replace(
        carry,
        state=state0,
        state_bar=(y0_bar, z0_bar),
        args_bar=args_bar,
        terms_bar=tree_add(carry.terms_bar, terms_bar_k),
    )
    return carry, (t0_bar_k, t1_bar_k)


def _restart_from_checkpoint(bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
    """With `checkpoint_every`: where a state was stored at the start of step `k`,
    continue from it instead of the reconstruction (drift is bounded by the steps
    between checkpoints), and measure the reconstruction's error there."""
    due, stored, checkpoint_pointer = stored_state_at(
        bwd.record.checkpoints,
        bwd.adjoint.checkpoint_every,
        carry.k,
        carry.checkpoint_pointer,
    )
    error = reconstruction_error(bwd.solver, carry.state, stored, bwd.residuals.y_final)
    max_error = jnp.where(due, jnp.maximum(carry.max_error, error), carry.max_error)
    state = jtu.tree_map(lambda a, b: jnp.where(due, a, b), stored, carry.state)
    return dataclasses.replace(
        carry, state=state, max_error=max_error, checkpoint_pointer=checkpoint_pointer
    )


def _backward_step(bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
    """One step of the backward pass, as in the paper: pull back the outputs saved at
    the step's end, undo the step and take its vector-Jacobian product, pull back the
    step's times, restart from a checkpoint."""
    step = bwd.interval(carry.k)
    carry, saved_time_bar = _pull_back_step_end(bwd, carry, step)
    carry, times_bar_k = _undo_step(bwd, carry, step)
    if bwd.with_step_times:
        times = pull_back_step_time(
            bwd, carry.times, carry.k, step, times_bar_k, saved_time_bar
        )
        carry = dataclasses.replace(carry, times=times)
    if bwd.record.checkpoints is not None:
        carry = _restart_from_checkpoint(bwd, carry)
    return dataclasses.replace(carry, k=carry.k - 1)


def _pull_back_at_t0(bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
    carry = dataclasses.replace(carry, times=at_first_step_start(carry.times))
    for out in bwd.outputs:
        carry = out.at_t0(bwd, carry)
    return carry


def _input_cotangents(bwd: Backward, carry: BackwardCarry) -> SolveInputs:
    inputs = bwd.inputs
    t0_bar, t1_bar, dt0_bar = input_time_cotangents(
        carry.times, inputs.t0, inputs.t1, inputs.dt0
    )
    y_bar, z_bar = carry.state_bar
    return SolveInputs(
        y0=y_bar,
        z0=z_bar,
        args=carry.args_bar,
        terms=carry.terms_bar,
        saveat=saveat_cotangent(inputs.saveat, bwd.outputs, carry),
        t0=t0_bar,
        t1=t1_bar,
        dt0=dt0_bar,
        event=event_cotangent(bwd),
        step_ts=carry.times.step_ts,
    )


def run_backward(bwd: Backward) -> tuple[SolveInputs, jnp.ndarray]:
    """The backward pass: the cotangents of the solve's inputs, and the largest
    relative error of the reconstruction where the true state is known."""
    event = pull_back_event(bwd)
    if event is not None:
        bwd = dataclasses.replace(bwd, outputs=(*bwd.outputs, event))
    carry = _pull_back_at_t1(bwd, _initial_carry(bwd))
    carry = lax.while_loop(
        lambda carry: carry.k >= 0, ft.partial(_backward_step, bwd), carry
    )
    # The start is known exactly: the reconstruction's last word on its own accuracy.
    inputs = bwd.inputs
    error = reconstruction_error(
        bwd.solver, carry.state, (inputs.y0, inputs.z0), bwd.residuals.y_final
    )
    max_error = jnp.maximum(carry.max_error, error)
    carry = _pull_back_at_t0(bwd, carry)
    return _input_cotangents(bwd, carry), max_error
