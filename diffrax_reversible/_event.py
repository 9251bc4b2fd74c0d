"""Terminating events: the outputs saved at an event's time `t*`, found by a root
finder, are pulled back through the interpolation inside the last step, and `t*` itself
by the implicit function theorem on `cond_fn(t*, y(t*), ...) = 0`, as Diffrax's own
adjoints differentiate the root find."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._diffrax_internals import num_saved, saved_ts
from ._misc import finds_event_root, tree_add, where_tree, zeros_like_diff
from ._outputs import SubSaveAtPullBack
from ._pull_back import (
    AbstractOutputPullBack,
    Backward,
    BackwardCarry,
    Interval,
    StepCotangents,
)


def event_time(event, subs, save_states, like) -> Array | None:
    """Where a terminating event stopped the solve, as saved at `t1` (outputs depend
    on it only through the output at `t1`); `None` without a root finder."""
    if not finds_event_root(event):
        return None
    for sub, save_state in zip(subs, save_states):
        if sub.t1:
            return saved_ts(save_state)[num_saved(save_state) - 1]
    return jnp.zeros((), jnp.result_type(like))


def cond_fn_kwargs(
    terms, solver, t0, t1, dt0, saveat, stepsize_controller, max_steps
) -> dict[str, Any]:
    """What Diffrax passes to an event's `cond_fn` besides `t`, `y`, `args`."""
    return dict(
        terms=terms,
        solver=solver,
        t0=t0,
        t1=t1,
        dt0=dt0,
        saveat=saveat,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
    )


class EventPullBack(AbstractOutputPullBack):
    """The outputs at a terminating event's time, pulled back (once, before the
    backward loop) to the last step's `dense_info` and times (added inside that step)
    and to everything else (added at `t1`)."""

    index: int = eqx.field(static=True)
    info_bar: PyTree[Array]
    step_times_bar: tuple[Array, Array]
    args_bar: PyTree[Array]
    terms_bar: PyTree[Array]
    event_bar: PyTree[Array]
    # Through the `t0`, `t1`, `dt0` that Diffrax passes to `cond_fn`.
    times_bar: tuple[Array, Array, Array]
    # Per `SubSaveAt` pull-back (by index): the cotangent of its `fn`.
    fns_bar: dict[int, PyTree[Array]]

    @property
    def uses_dense_info(self) -> bool:
        return True

    def init(self) -> None:
        return None

    def at_t1(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        for i, fn_bar in self.fns_bar.items():
            carry = bwd.outputs[i].add_fn_bar(carry, fn_bar)
        t0_bar, t1_bar, dt0_bar = self.times_bar
        times = carry.times
        carry = carry.with_times(
            t0=times.t0 + t0_bar,
            t1=times.t1 + t1_bar,
            dt0=times.dt0 if bwd.inputs.dt0 is None else times.dt0 + dt0_bar,
        )
        return carry.add(args_bar=self.args_bar, terms_bar=self.terms_bar)

    def at_step_end(
        self, bwd: Backward, carry: BackwardCarry, step: Interval
    ) -> tuple[BackwardCarry, Array | None]:
        return carry, None

    def within_step(
        self, bwd: Backward, carry: BackwardCarry, step: Interval, dense_info
    ) -> tuple[BackwardCarry, StepCotangents]:
        is_last = carry.k == bwd.residuals.num_steps - 1
        return carry, StepCotangents(
            dense_info=where_tree(is_last, self.info_bar),
            times=where_tree(is_last, self.step_times_bar),
            args=None,
        )

    def at_t0(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        return carry


def _outputs_at_event(bwd: Backward) -> dict[int, Any]:
    """Per `SubSaveAt` that saves at `t1`: its function, and the cotangents of the
    output and time it saved at the event's time (zero where no event happened)."""
    saved = {}
    for out in bwd.outputs:
        if isinstance(out, SubSaveAtPullBack) and out.saves_at_t1:
            cotangent = out.cotangent_at_t1(bwd)
            saved[out.index] = (
                out.sub.fn,
                where_tree(bwd.stopped_at_event_root(), cotangent),
            )
    return saved


def pull_back_event(bwd: Backward) -> EventPullBack | None:
    """The pull-back of a terminating event found by a root finder: `None` when no
    output depends on the event's time."""
    if not finds_event_root(bwd.inputs.event):
        return None
    saved = _outputs_at_event(bwd)
    if not saved:
        return None
    inputs, residuals = bwd.inputs, bwd.residuals
    dense_info, step_times = residuals.event.dense_info, residuals.event.step_times
    fns = {i: fn for i, (fn, _) in saved.items()}
    t_event = residuals.event_time

    def outputs_at(t, dense_info, step_times, args, fns):
        # Each output is `(fn(t*, y(t*), args), t*)`: the saved value and time.
        y = bwd.interpolation(dense_info, *step_times).evaluate(t)
        return {i: (fn(t, y, args), t) for i, fn in fns.items()}

    _, pull_back = eqx.filter_vjp(
        outputs_at, t_event, dense_info, step_times, inputs.args, fns
    )
    t_bar, info_bar, times_bar, args_bar, fns_bar = pull_back(
        {i: cotangent for i, (_, cotangent) in saved.items()}
    )
    _, pull_back_root = eqx.filter_vjp(
        lambda *x: _root_function(bwd, *x),
        t_event,
        dense_info,
        step_times,
        inputs.args,
        inputs.terms,
        inputs.event,
        (inputs.t0, inputs.t1, inputs.dt0),
    )
    slope = pull_back_root(jnp.ones((), jnp.result_type(t_event)))[0]
    # The event time of a tangential crossing (zero slope) has no derivative: NaN,
    # unless nothing depends on it (no event, or a zero cotangent).
    tangential = slope == 0
    event_time_bar = jnp.where(
        tangential,
        jnp.where(t_bar == 0, 0.0, jnp.nan).astype(t_bar.dtype),
        -t_bar / jnp.where(tangential, 1, slope),
    )
    _, *root_bars = pull_back_root(event_time_bar)
    info_root_bar, times_root_bar, args_root_bar, terms_bar, event_bar, kw_bar = (
        root_bars
    )
    return EventPullBack(
        index=len(bwd.outputs),
        info_bar=tree_add(info_bar, info_root_bar),
        step_times_bar=tree_add(times_bar, times_root_bar),
        args_bar=tree_add(args_bar, args_root_bar),
        terms_bar=terms_bar,
        event_bar=event_bar,
        times_bar=kw_bar,
        fns_bar=fns_bar,
    )


def _root_function(bwd: Backward, t, dense_info, step_times, args, terms, event, times):
    """As Diffrax's: the triggered event's value at `t`, or for a boolean event the
    distance to the end of the step."""
    t0, t1, dt0 = times
    y = bwd.interpolation(dense_info, *step_times).evaluate(t)
    value = jnp.zeros((), jnp.result_type(t))
    masks = jtu.tree_leaves(bwd.residuals.event.mask)
    cond_fns = jtu.tree_leaves(event.cond_fn, is_leaf=callable)
    kwargs = cond_fn_kwargs(
        terms,
        bwd.solver,
        t0,
        t1,
        dt0,
        bwd.inputs.saveat,
        bwd.stepsize_controller,
        bwd.max_steps,
    )
    for mask, cond_fn in zip(masks, cond_fns):
        value_i = cond_fn(t, y, args, **kwargs)
        if jnp.issubdtype(jnp.result_type(value_i), jnp.bool_):
            value_i = step_times[1] - t
        value = value + jnp.where(mask, value_i, 0).astype(value.dtype)
    return value


def event_cotangent(bwd: Backward) -> PyTree[Array]:
    """The cotangent of the event (its `cond_fn`'s parameters)."""
    for out in bwd.outputs:
        if isinstance(out, EventPullBack):
            return out.event_bar
    return zeros_like_diff(bwd.inputs.event)
