"""The pull-backs of the solve's outputs, built per `SubSaveAt` as Diffrax's loop
builds its `save_*` closures: what one `SubSaveAt` saved (at `t0`, at `ts`, at the end
of every `steps`-th step, at `t1`, through its `fn`), the dense output, and the saved
solver state."""

import dataclasses

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._diffrax_internals import (
    current_state,
    dense_output,
    save_states,
    saved_ts,
    saved_ys,
    step_output_index,
    t0_offset,
    ts_output_index,
)
from ._misc import finds_event_root, is_none, tree_add, where_tree, zeros_like_diff
from ._pull_back import (
    AbstractOutputPullBack,
    Backward,
    BackwardCarry,
    Interval,
    NO_STEP_COTANGENTS,
    pull_back_save,
    StepCotangents,
)
from ._time_cotangents import tie_share


def is_subsaveat(x) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


class SubSaveAtCotangents(eqx.Module):
    """A `SubSaveAt`'s entry of the backward carry: how many of its `ts` remain to be
    pulled back, and the cotangents of its `fn` and `ts`."""

    pointer: Array
    fn: PyTree[Array]
    ts: Array | None


class SubSaveAtPullBack(AbstractOutputPullBack):
    """The outputs of one `SubSaveAt`: `fn(t, y(t), args)` and `t`, at `t0`, at each of
    `ts` (interpolated inside the step that contains it), at the end of every
    `steps`-th step, and at `t1`."""

    index: int = eqx.field(static=True)
    sub: diffrax.SubSaveAt
    grad_ys: PyTree[Array]
    grad_ts: Array
    # How many of its `ts` were saved, and how many outputs in all.
    num_ts_saved: Array
    num_saved: Array

    @property
    def num_ts(self) -> int:
        return 0 if self.sub.ts is None else len(self.sub.ts)

    @property
    def uses_dense_info(self) -> bool:
        return self.num_ts > 0

    @property
    def saves_at_t1(self) -> bool:
        # With `steps=1` the save at the end of the last step is the one at `t1`.
        return self.sub.t1 and self.sub.steps != 1

    def _take(self, index):
        return jtu.tree_map(lambda g: g[index], self.grad_ys)

    def add_fn_bar(self, carry: BackwardCarry, fn_bar) -> BackwardCarry:
        """Adds a cotangent of its `fn`."""
        own = carry.outputs[self.index]
        own = dataclasses.replace(own, fn=tree_add(own.fn, fn_bar))
        return carry.with_output(self.index, own)

    def init(self) -> SubSaveAtCotangents:
        return SubSaveAtCotangents(
            pointer=self.num_ts_saved if self.num_ts else jnp.zeros((), jnp.int32),
            fn=zeros_like_diff(self.sub.fn),
            ts=None if self.sub.ts is None else jnp.zeros_like(self.sub.ts),
        )

    def cotangent_at_t1(self, bwd: Backward):
        """The cotangents of the output and time saved at `t1` (zero where the solve
        ended on a step save, which is then that output)."""
        steps = self.sub.steps
        saved = True if steps == 0 else bwd.residuals.num_steps % steps != 0
        index = self.num_saved - 1
        return where_tree(saved, (self._take(index), self.grad_ts[index]))

    def at_t1(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        if not self.saves_at_t1:
            return carry
        inputs, num_steps = bwd.inputs, bwd.residuals.num_steps
        cotangent = self.cotangent_at_t1(bwd)
        if finds_event_root(inputs.event):
            # Saved at the event's time instead: the event's pull-back takes it.
            cotangent = where_tree(jnp.invert(bwd.stopped_at_event_root()), cotangent)
        cotangent, time_cotangent = cotangent
        # Saved at `min(end of the last step, t1)` (without steps: at `t0`): before
        # `t1` where an event without a root finder stopped the solve.
        last_end = bwd.step_end(jnp.maximum(num_steps - 1, 0))
        t_saved = jnp.where(num_steps > 0, jnp.minimum(last_end, inputs.t1), inputs.t0)
        t_bar, y_bar, args_bar, fn_bar = pull_back_save(
            self.sub.fn, t_saved, bwd.residuals.y_final, inputs.args, cotangent
        )
        t_bar = t_bar + time_cotangent
        to_t1 = tie_share((num_steps > 0) & (last_end == inputs.t1), t_bar)
        carry = carry.add(y_bar=y_bar, args_bar=args_bar)
        carry = self.add_fn_bar(carry, fn_bar)
        return carry.with_times(
            t1=carry.times.t1 + to_t1, end=carry.times.end + t_bar - to_t1
        )

    def at_step_end(
        self, bwd: Backward, carry: BackwardCarry, step: Interval
    ) -> tuple[BackwardCarry, Array | None]:
        steps = self.sub.steps
        if not steps:
            return carry, None
        k, (y1, _) = carry.k, carry.state
        saved = (k + 1) % steps == 0
        # The `ts` saved up to this step's end come before it.
        num_ts_saved = carry.outputs[self.index].pointer if self.num_ts else 0
        index = step_output_index(self.sub, k, num_ts_saved)
        cotangent = where_tree(saved, self._take(index))
        t_bar, y1_bar, args_bar, fn_bar = pull_back_save(
            self.sub.fn, step.t1, y1, bwd.inputs.args, cotangent
        )
        t_bar = t_bar + jnp.where(saved, self.grad_ts[index], 0)
        carry = carry.add(y_bar=y1_bar, args_bar=args_bar)
        return self.add_fn_bar(carry, fn_bar), t_bar

    def within_step(
        self, bwd: Backward, carry: BackwardCarry, step: Interval, dense_info
    ) -> tuple[BackwardCarry, StepCotangents]:
        """Pulls back the outputs at `ts[j]` for every `j < pointer` with `ts[j]`
        after the end of the previous step: exactly those saved during this step."""
        if not self.num_ts:
            return carry, NO_STEP_COTANGENTS
        ts, fn, k, args = self.sub.ts, self.sub.fn, carry.k, bwd.inputs.args
        step_times = (step.t0, step.t1)

        def save(dense_info, step_times, args, t, fn):
            y = bwd.interpolation(dense_info, *step_times).evaluate(t)
            return fn(t, y, args)

        def cond(loop_carry):
            own, _ = loop_carry
            pointer = own.pointer
            return (pointer > 0) & (ts[jnp.maximum(pointer - 1, 0)] > step.prev_end)

        def body(loop_carry):
            own, inputs_bar = loop_carry
            j = own.pointer - 1
            _, pull_back = eqx.filter_vjp(save, dense_info, step_times, args, ts[j], fn)
            index = ts_output_index(self.sub, j, k)
            info_bar, times_bar, args_bar, t_bar, fn_bar = pull_back(self._take(index))
            t_bar = t_bar + self.grad_ts[index]
            inputs_bar = tree_add(inputs_bar, (info_bar, times_bar, args_bar))
            own = SubSaveAtCotangents(
                pointer=j, fn=tree_add(own.fn, fn_bar), ts=own.ts.at[j].add(t_bar)
            )
            return own, inputs_bar

        zeros = zeros_like_diff((dense_info, step_times, args))
        own, (info_bar, times_bar, args_bar) = lax.while_loop(
            cond, body, (carry.outputs[self.index], zeros)
        )
        carry = carry.with_output(self.index, own)
        return carry, StepCotangents(
            dense_info=info_bar, times=times_bar, args=args_bar
        )

    def at_t0(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        """The output at `t0`; and when `t0 == t1` Diffrax makes no step and saves
        the output at `t0` in place of every output at `ts`."""
        inputs = bwd.inputs
        cotangent = None
        t0_bar = carry.times.t0
        if self.sub.t0:
            cotangent = self._take(0)
            t0_bar = t0_bar + self.grad_ts[0]
        if self.num_ts:
            no_steps = inputs.t0 == inputs.t1
            start, stop = t0_offset(self.sub), t0_offset(self.sub) + self.num_ts
            ts_cotangent = jtu.tree_map(
                lambda g: jnp.where(no_steps, g[start:stop].sum(0), 0), self.grad_ys
            )
            cotangent = (
                ts_cotangent if cotangent is None else tree_add(cotangent, ts_cotangent)
            )
            t0_bar = t0_bar + jnp.where(no_steps, self.grad_ts[start:stop].sum(), 0)
        if cotangent is None:
            return carry
        t_bar, y0_bar, args_bar, fn_bar = pull_back_save(
            self.sub.fn, inputs.t0, inputs.y0, inputs.args, cotangent
        )
        carry = carry.add(y_bar=y0_bar, args_bar=args_bar)
        carry = self.add_fn_bar(carry, fn_bar)
        return carry.with_times(t0=t0_bar + t_bar)


class DenseOutputPullBack(AbstractOutputPullBack):
    """`SaveAt(dense=True)`: every step's `dense_info`, and the step times. (`None`
    cotangents: nothing depends on them.)"""

    index: int = eqx.field(static=True)
    grad_infos: PyTree[Array] | None
    grad_ts: Array | None

    @property
    def uses_dense_info(self) -> bool:
        return self.grad_infos is not None

    def init(self) -> None:
        return None

    def at_t1(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        return carry

    def at_step_end(
        self, bwd: Backward, carry: BackwardCarry, step: Interval
    ) -> tuple[BackwardCarry, Array | None]:
        if self.grad_ts is None:
            return carry, None
        # The dense output records `min(end of step, t1)`.
        return carry, self.grad_ts[carry.k + 1]

    def within_step(
        self, bwd: Backward, carry: BackwardCarry, step: Interval, dense_info
    ) -> tuple[BackwardCarry, StepCotangents]:
        if self.grad_infos is None:
            return carry, NO_STEP_COTANGENTS
        info_bar = jtu.tree_map(
            lambda g, x: jnp.zeros_like(x) if g is None else g[carry.k],
            self.grad_infos,
            eqx.filter(dense_info, eqx.is_inexact_array),
            is_leaf=is_none,
        )
        return carry, StepCotangents(dense_info=info_bar, times=None, args=None)

    def at_t0(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        if self.grad_ts is None:
            return carry
        return carry.with_times(t0=carry.times.t0 + self.grad_ts[0])


class SolverStatePullBack(AbstractOutputPullBack):
    """`SaveAt(solver_state=True)`: the final solver state, whose reversible part is
    the final `z`."""

    index: int = eqx.field(static=True)
    grad_z_final: PyTree[Array]

    @property
    def uses_dense_info(self) -> bool:
        return False

    def init(self) -> None:
        return None

    def at_t1(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        y_bar, z_bar = carry.state_bar
        z_bar = tree_add(z_bar, eqx.filter(self.grad_z_final, eqx.is_inexact_array))
        return dataclasses.replace(carry, state_bar=(y_bar, z_bar))

    def at_step_end(
        self, bwd: Backward, carry: BackwardCarry, step: Interval
    ) -> tuple[BackwardCarry, Array | None]:
        return carry, None

    def within_step(
        self, bwd: Backward, carry: BackwardCarry, step: Interval, dense_info
    ) -> tuple[BackwardCarry, StepCotangents]:
        return carry, NO_STEP_COTANGENTS

    def at_t0(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        return carry


def _zeros_like_cotangent(grad, shapes):
    # `None` marks an output that nothing depends on.
    if grad is None:
        return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jtu.tree_map(
        lambda g, s: jnp.zeros(s.shape, s.dtype) if g is None else g,
        grad,
        shapes,
        is_leaf=is_none,
    )


def output_pull_backs(
    grad_final_state, saveat: diffrax.SaveAt, residuals
) -> tuple[AbstractOutputPullBack, ...]:
    """One pull-back per `SubSaveAt`, then the dense output and the solver state
    where saved, with the cotangents of what they saved (zeros where nothing depends
    on an output)."""
    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    if grad_final_state is None:
        grad_ys = grad_ts = [None] * len(subs)
    else:
        grad_ys = [saved_ys(s) for s in save_states(grad_final_state)]
        grad_ts = [saved_ts(s) for s in save_states(grad_final_state)]
    outputs: list[AbstractOutputPullBack] = [
        SubSaveAtPullBack(
            index=i,
            sub=sub,
            grad_ys=_zeros_like_cotangent(grad_ys[i], residuals.ys_shapes[i]),
            grad_ts=_zeros_like_cotangent(grad_ts[i], residuals.ts_shapes[i]),
            num_ts_saved=residuals.ts_saved[i],
            num_saved=residuals.save_index[i],
        )
        for i, sub in enumerate(subs)
    ]
    if grad_final_state is None:
        return tuple(outputs)
    if saveat.dense:
        grad_infos, grad_dense_ts = dense_output(grad_final_state)
        outputs.append(DenseOutputPullBack(len(outputs), grad_infos, grad_dense_ts))
    if saveat.solver_state:
        _, grad_z_final = current_state(grad_final_state)
        outputs.append(SolverStatePullBack(len(outputs), grad_z_final))
    return tuple(outputs)


def saveat_cotangent(saveat: diffrax.SaveAt, outputs, carry: BackwardCarry):
    """The cotangent of `saveat`: of each `SubSaveAt`'s `fn` and `ts`."""
    leaves, treedef = jtu.tree_flatten(saveat.subs, is_leaf=is_subsaveat)
    subs_bar = [
        eqx.tree_at(
            lambda s: (s.ts, s.fn),
            eqx.filter(sub, eqx.is_inexact_array),
            (carry.outputs[out.index].ts, carry.outputs[out.index].fn),
            is_leaf=is_none,
        )
        for sub, out in zip(leaves, outputs)
    ]
    saveat_bar = eqx.filter(saveat, eqx.is_inexact_array)
    return eqx.tree_at(
        lambda s: s.subs,
        saveat_bar,
        jtu.tree_unflatten(treedef, subs_bar),
        is_leaf=is_none,
    )
