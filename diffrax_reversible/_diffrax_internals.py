"""Everything this package relies on in Diffrax beyond its public API, in one file.

`pyproject.toml` pins `diffrax>=0.7.2,<0.8`: the names, fields and layouts below are
checked against that range, and a new Diffrax release is reviewed by reading this file
against it. No other module reads a field of Diffrax's loop `State` or `SaveState`, a
controller's state, or Diffrax's output layout.

- Private names: `is_sde`, `is_unsafe_sde`, `linear_rescale`, `SaveState`.
- The loop state, `diffrax._integrate.State`: read and rebuilt only through the
  accessors below.
- The outer loop's calling convention (`AbstractAdjoint._loop` and the
  `outer_while_loop` it calls): `run_loop`, `outer_loop_with_record`.
- `ConstantStepSize`'s controller state, Diffrax's constant-step time arithmetic and
  the loop's snapping of a step's end to `t1`: `constant_step_count`,
  `known_step_end`, `step_end_time`.
- The order of the outputs of one `SubSaveAt` (`t0`, then `ts` and `steps`
  interleaved, then `t1`): `t0_offset`, `ts_output_index`, `step_output_index`.
"""

import functools as ft
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._heuristics import is_sde as is_sde, is_unsafe_sde as is_unsafe_sde
from diffrax._integrate import SaveState as SaveState
from diffrax._misc import linear_rescale as linear_rescale
from jaxtyping import Array, PyTree

from ._misc import is_none


# The loop state.


def is_save_state(x: Any) -> bool:
    return isinstance(x, SaveState)


def save_states(state) -> list[SaveState]:
    """The `SaveState` of every `SubSaveAt`, in the order of `saveat.subs`' leaves."""
    # Filtered: `eqx.tree_at` wraps a `None` save state (`SaveAt(dense=True)` alone).
    leaves = jtu.tree_leaves(state.save_state, is_leaf=is_save_state)
    return [leaf for leaf in leaves if is_save_state(leaf)]


def saved_ts(save_state: SaveState) -> Array:
    """The buffer of saved times (`sol.ts` of one `SubSaveAt`)."""
    return save_state.ts


def saved_ys(save_state: SaveState) -> PyTree[Array]:
    """The buffer of saved states (`sol.ys` of one `SubSaveAt`)."""
    return save_state.ys


def num_saved(save_state: SaveState) -> Array:
    """How many outputs have been written into the buffers."""
    return save_state.save_index


def num_ts_saved(save_state: SaveState) -> Array:
    """How many of the `SubSaveAt(ts=...)` times have been saved."""
    return save_state.saveat_ts_index


def step_interval(state) -> tuple[Array, Array]:
    """The interval `(tprev, tnext)` of the step about to be attempted."""
    return state.tprev, state.tnext


def num_accepted_steps(state) -> Array:
    return state.num_accepted_steps


def current_state(state) -> tuple[PyTree[Array], PyTree]:
    """The state `y` and the solver state at the current time."""
    return state.y, state.solver_state


def with_current_state(state, y: PyTree, solver_state: PyTree):
    """`state` with `y` and the solver state replaced."""
    return eqx.tree_at(
        lambda s: (s.y, s.solver_state), state, (y, solver_state), is_leaf=is_none
    )


def first_step_inputs(state) -> tuple:
    """`(t0, t1, y0, solver_state, made_jump)` of the first step, as `solver.step`
    takes them."""
    return state.tprev, state.tnext, state.y, state.solver_state, state.made_jump


def solve_result(state) -> diffrax.RESULTS:
    return state.result


def dense_output(state) -> tuple[PyTree[Array] | None, Array | None]:
    """`(dense_infos, dense_ts)`: the interpolation data of every step, and the step
    times."""
    return state.dense_infos, state.dense_ts


class EventRecord(eqx.Module):
    """What the loop state keeps of a terminating event: which condition triggered,
    and the interpolation of the step in which it did."""

    mask: PyTree[Array] | None
    dense_info: PyTree[Array] | None
    step_times: tuple[Array, Array]


def event_record(state) -> EventRecord:
    return EventRecord(
        mask=state.event_mask,
        dense_info=state.event_dense_info,
        step_times=(state.event_tprev, state.event_tnext),
    )


def solution_outputs(state, saveat: diffrax.SaveAt) -> list[PyTree[Array]]:
    """The parts of the final loop state that the returned `Solution` exposes: the
    saved `ts` and `ys`, the dense output and the solver state when saved."""
    out = []
    for save_state in save_states(state):
        out += [save_state.ts, save_state.ys]
    if saveat.dense:
        out += [state.dense_infos, state.dense_ts]
    if saveat.solver_state:
        out.append(state.solver_state)
    return out


def with_forward_values_only(init_state, controller_fn):
    """`init_state` without gradients through the event's initial values, the step
    times or (through `controller_fn`) the controller state, and with placeholders for
    `y` and the solver state, which the custom VJP supplies as inputs."""
    init_state = eqx.tree_at(
        lambda s: (s.event_values, s.event_dense_info, s.event_tprev, s.event_tnext),
        init_state,
        replace_fn=lax.stop_gradient,
        is_leaf=is_none,
    )
    return eqx.tree_at(
        lambda s: (s.y, s.solver_state, s.controller_state, s.tprev, s.tnext),
        init_state,
        (
            object(),
            object(),
            controller_fn(init_state.controller_state),
            lax.stop_gradient(init_state.tprev),
            lax.stop_gradient(init_state.tnext),
        ),
        is_leaf=is_none,
    )


# The outer loop.


def run_loop(adjoint: diffrax.AbstractAdjoint, *, outer_while_loop=None, **kwargs):
    """Diffrax's own solve loop with plain `lax` loops (the custom VJP supplies the
    gradient), and `outer_while_loop` (from `outer_loop_with_record`), if given, as its
    outer loop."""
    plain_loop = ft.partial(eqxi.while_loop, kind="lax")
    return adjoint._loop(
        inner_while_loop=plain_loop,
        outer_while_loop=plain_loop if outer_while_loop is None else outer_while_loop,
        **kwargs,
    )


def outer_loop_with_record(init_record, record_step, record_buffers, records_out):
    """An outer loop for `run_loop` that also carries a record of the solve:
    `init_record(init_state, max_steps)` creates it, `record_step(state, record)`
    updates it before every attempted step, `record_buffers(record)` names the arrays
    it writes into in place. Diffrax's loop returns only the final state, so the final
    record is appended to `records_out`."""

    def while_loop(cond_fun, body_fun, init_val, *, max_steps, buffers):
        def record_and_step(carry):
            state, record = carry
            return body_fun(state), record_step(state, record)

        final_state, record = eqxi.while_loop(
            lambda carry: cond_fun(carry[0]),
            record_and_step,
            (init_val, init_record(init_val, max_steps)),
            max_steps=max_steps,
            buffers=lambda carry: (buffers(carry[0]), record_buffers(carry[1])),
            kind="lax",
        )
        records_out.append(record)
        return final_state

    return while_loop


# Step size controllers.


def constant_step_count(controller, state) -> Array | None:
    """For `ConstantStepSize`, the number of steps Diffrax divides `[t0, t1]` into
    (`-1` for an infinite `t1`), from the final loop state; `None` otherwise."""
    if type(controller) is not diffrax.ConstantStepSize:
        return None
    _, num_steps, _, _ = state.controller_state
    return num_steps


def _t1_clip_floor(t1):
    # Diffrax's loop ends a step that would end within 100 ULPs of `t1` at `t1`.
    floor = t1
    for _ in range(100):
        floor = eqxi.prevbefore(floor)
    return floor


def _step_end_formula(controller, k, t0, t1, dt0, step_ts, num_steps):
    """Diffrax's ends of the first step and of a later step `k`, before the loop snaps
    the latter to `t1`: `ConstantStepSize` (`num_steps` from `constant_step_count`) and
    `StepTo` (`step_ts`, its `ts`)."""
    if type(controller) is diffrax.ConstantStepSize:
        dtype = jnp.result_type(t0)
        fraction = (k + 1).astype(dtype) / num_steps.astype(dtype)
        # Diffrax marks an infinite `t1` with `num_steps == -1`, and adds `dt0`.
        later = jnp.where(
            num_steps >= 0,
            t0 + (t1 - t0) * fraction,
            t0 + (k + 1).astype(dtype) * dt0,
        )
        first = t0 + dt0
    elif type(controller) is diffrax.StepTo:
        later = step_ts[k + 1]
        first = later
    else:
        raise NotImplementedError(type(controller))
    return jnp.minimum(first, t1), later


def known_step_end(controller, k, t0, t1, dt0, step_ts, num_steps):
    """The end of accepted step `k` as Diffrax's loop computes it, for the controllers
    of `_step_end_formula`. Not differentiated.

    With `StepTo`, bitwise. With `ConstantStepSize`, the same formula, which XLA may
    evaluate with or without a fused multiply-add: a bit or two apart. For an
    infinite `t1`, Diffrax adds `dt0` to the previous end at every step; then this is
    `t0 + (k + 1) dt0`, which may differ from that sum by round-off."""
    first, later = _step_end_formula(controller, k, t0, t1, dt0, step_ts, num_steps)
    # Also the last step's end, which Diffrax's controller sets to `t1` itself.
    later = jnp.where(later > _t1_clip_floor(t1), t1, later)
    return lax.stop_gradient(jnp.where(k == 0, first, later))


def step_end_time(controller, k, recorded_end, t0, t1, dt0, step_ts, num_steps):
    """The end of accepted step `k` as Diffrax computes it, as a differentiable function
    of `t0`, `t1`, `dt0` and `StepTo.ts` (`step_ts`), for the controllers of
    `_step_end_formula`; `recorded_end` is its value."""
    first, later = _step_end_formula(controller, k, t0, t1, dt0, step_ts, num_steps)
    # Diffrax snaps the end of the last step to `t1` exactly.
    later = jnp.where(recorded_end == t1, t1, later)
    return jnp.where(k == 0, first, later)


# The output layout of one `SubSaveAt`.


def t0_offset(sub: diffrax.SubSaveAt) -> int:
    """The index of the first output after the one at `t0`."""
    return 1 if sub.t0 else 0


def ts_output_index(sub: diffrax.SubSaveAt, j, k):
    """The output index of `ts[j]`, saved during step `k`: steps and `ts` share one
    index, so it follows the outputs of the `k // steps` step saves before it."""
    steps = sub.steps
    return t0_offset(sub) + j + (k // steps if steps else 0)


def step_output_index(sub: diffrax.SubSaveAt, k, num_ts_saved):
    """The output index of the save at the end of step `k` (when
    `(k + 1) % sub.steps == 0`), after `num_ts_saved` of the `ts`."""
    return t0_offset(sub) + num_ts_saved + (k + 1) // sub.steps - 1
