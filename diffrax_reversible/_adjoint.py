import functools as ft
import types
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._diffrax_internals import (
    is_unsafe_sde,
    only_transpose_ys,
    save_y,
    SaveState,
)
from ._misc import is_none, tree_add
from ._solver import Reversible


_TIMES_NONDIFFERENTIABLE = (
    "`adjoint=ReversibleAdjoint()` does not support gradients with respect to `t0`, "
    "`t1`, `dt0`, `SaveAt(ts=...)` or the step size controller. Consider "
    "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for those."
)


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _is_save_state(x: Any) -> bool:
    return isinstance(x, SaveState)


def _check_supported(*, solver, terms, saveat, event, max_steps) -> None:
    if type(solver) is not Reversible:
        name = type(solver).__name__
        raise ValueError(
            f"`adjoint=ReversibleAdjoint()` needs an algebraically reversible solver, "
            f"but got `solver={name}(...)`. Wrap it as `solver=Reversible({name}())`."
        )
    if is_unsafe_sde(terms):
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` does not support `UnsafeBrownianPath`: the "
            "backward pass must re-evaluate the Brownian path, which "
            "`UnsafeBrownianPath` cannot reconstruct. Consider "
            "`diffrax.VirtualBrownianTree` instead."
        )
    if max_steps is None:
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` does not support `max_steps=None`: the "
            "times of the accepted steps are recorded in a buffer of length "
            "`max_steps`. Pass an integer `max_steps`."
        )
    if event is not None:
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` does not support `event=...` yet. Consider "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    if saveat.dense:
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` does not support `SaveAt(dense=True)` "
            "yet. Consider `SaveAt(ts=...)`, or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    for sub in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat):
        if sub.steps != 0:
            raise ValueError(
                "`adjoint=ReversibleAdjoint()` does not support `SaveAt(steps=...)` "
                "yet. Consider `SaveAt(ts=...)`, or "
                "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
            )
        if sub.fn is not save_y:
            raise ValueError(
                "`adjoint=ReversibleAdjoint()` does not support `SaveAt(fn=...)` yet. "
                "Save `y` and apply the function to `sol.ys` instead."
            )


def _closure_convert_vector_fields(terms, t0, y0, args):
    """A custom VJP differentiates only its explicit inputs. A vector field such as
    `lambda t, y, args: model(y)` closes over `model`; turning the closure into a pytree
    makes `model`'s arrays explicit inputs, so they get gradients."""

    def is_term_with_vector_field(x):
        return isinstance(x, (diffrax.ODETerm, diffrax.ControlTerm))

    def convert(term):
        if not is_term_with_vector_field(term):
            return term
        vector_field = term.vector_field
        if isinstance(vector_field, types.FunctionType) and vector_field.__closure__:
            vector_field = eqx.filter_closure_convert(vector_field, t0, y0, args)
            term = eqx.tree_at(lambda x: x.vector_field, term, vector_field)
        return term

    return jtu.tree_map(convert, terms, is_leaf=is_term_with_vector_field)


def _steps_are_contiguous(controller: diffrax.AbstractStepSizeController) -> bool:
    """Whether every accepted step starts where the previous one ended. Then only the
    ends of the steps need recording."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        return controller.jump_ts is None and _steps_are_contiguous(
            controller.controller
        )
    return isinstance(
        controller,
        (diffrax.ConstantStepSize, diffrax.StepTo, diffrax.PIDController),
    )


class _StepRecord(eqx.Module):
    starts: Array | None
    ends: Array


def _recording_while_loop(record_starts: bool, records_out: list):
    """Diffrax's outer loop, additionally writing the interval of every accepted step
    into buffers of length `max_steps`. Diffrax's `loop` only returns the final state,
    so the record leaves through `records_out`."""

    def while_loop(cond_fun, body_fun, init_val, *, max_steps, buffers):
        empty = jnp.full(max_steps, jnp.inf, dtype=jnp.result_type(init_val.tprev))
        record = _StepRecord(starts=empty if record_starts else None, ends=empty)

        def record_and_step(carry):
            state, record = carry
            index = state.num_accepted_steps
            # Written on every attempt: a rejected step is overwritten by the next
            # attempt, which has the same index.
            starts = record.starts
            if starts is not None:
                starts = starts.at[index].set(state.tprev)
            ends = record.ends.at[index].set(state.tnext)
            return body_fun(state), _StepRecord(starts=starts, ends=ends)

        final_state, record = eqxi.while_loop(
            lambda carry: cond_fun(carry[0]),
            record_and_step,
            (init_val, record),
            max_steps=max_steps,
            buffers=lambda carry: (buffers(carry[0]), carry[1]),
            kind="lax",
        )
        records_out.append(record)
        return final_state

    return while_loop


def _with_states(init_state, y0, z0):
    return eqx.tree_at(lambda s: (s.y, s.solver_state), init_state, (y0, z0))


def _forward_loop(y0__z0__args__terms, *, self, init_state, outer_while_loop, **kwargs):
    # Not differentiated (the custom VJP supplies the gradient), so plain loops.
    y0, z0, args, terms = y0__z0__args__terms
    return self._loop(
        args=args,
        terms=terms,
        init_state=_with_states(init_state, y0, z0),
        inner_while_loop=ft.partial(eqxi.while_loop, kind="lax"),
        outer_while_loop=outer_while_loop,
        **kwargs,
    )


@eqx.filter_custom_vjp
def _loop_reversible(y0__z0__args__terms, **kwargs):
    outer_while_loop = ft.partial(eqxi.while_loop, kind="lax")
    return _forward_loop(
        y0__z0__args__terms, outer_while_loop=outer_while_loop, **kwargs
    )


@_loop_reversible.def_fwd
def _loop_reversible_fwd(
    perturbed, y0__z0__args__terms, *, stepsize_controller, **kwargs
):
    del perturbed
    records = []
    record_starts = not _steps_are_contiguous(stepsize_controller)
    final_state, aux_stats = _forward_loop(
        y0__z0__args__terms,
        stepsize_controller=stepsize_controller,
        outer_while_loop=_recording_while_loop(record_starts, records),
        **kwargs,
    )
    [record] = records
    ts_saved = [
        s.saveat_ts_index
        for s in jtu.tree_leaves(final_state.save_state, is_leaf=_is_save_state)
    ]
    residuals = (
        record,
        final_state.num_accepted_steps,
        final_state.y,
        final_state.solver_state,
        ts_saved,
    )
    return (final_state, aux_stats), residuals


class _SavedCotangents(eqx.Module):
    """The cotangents of one `SubSaveAt`'s outputs, split by where they were saved."""

    t0: PyTree[Array] | None
    ts: PyTree[Array] | None
    t1: PyTree[Array] | None


def _split_saved_cotangents(subsaveat, grad_ys, y0) -> _SavedCotangents:
    num_ts = 0 if subsaveat.ts is None else len(subsaveat.ts)
    offset = 1 if subsaveat.t0 else 0
    num_out = offset + num_ts + (1 if subsaveat.t1 else 0)

    def materialise(grad, y):
        if grad is None:
            return jnp.zeros((num_out,) + jnp.shape(y), jnp.result_type(y))
        return grad

    if grad_ys is None:
        grad_ys = jtu.tree_map(lambda y: materialise(None, y), y0)
    else:
        grad_ys = jtu.tree_map(materialise, grad_ys, y0, is_leaf=is_none)
    take = lambda i: jtu.tree_map(lambda g: g[i], grad_ys)
    return _SavedCotangents(
        t0=take(0) if subsaveat.t0 else None,
        ts=jtu.tree_map(lambda g: g[offset : offset + num_ts], grad_ys)
        if num_ts
        else None,
        t1=take(-1) if subsaveat.t1 else None,
    )


def _sum_present(trees, like):
    trees = [tree for tree in trees if tree is not None]
    if not trees:
        return jtu.tree_map(jnp.zeros_like, like)
    return tree_add(*trees)


def _pull_back_saved_ts(
    ts, cotangents, pointer, prev_end, dense_info, interpolation, dense_info_bar
):
    """Adds to `dense_info_bar` the cotangents of `ts[j]` for every `j < pointer` with
    `ts[j] > prev_end`: those are exactly the outputs saved during this step."""

    def cond(carry):
        pointer, _ = carry
        return (pointer > 0) & (ts[jnp.maximum(pointer - 1, 0)] > prev_end)

    def body(carry):
        pointer, dense_info_bar = carry
        index = pointer - 1
        _, pull_back = eqx.filter_vjp(
            lambda info: interpolation(info).evaluate(ts[index]), dense_info
        )
        (grad,) = pull_back(jtu.tree_map(lambda c: c[index], cotangents))
        return index, tree_add(dense_info_bar, grad)

    return lax.while_loop(cond, body, (pointer, dense_info_bar))


@_loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y0__z0__args__terms,
    *,
    self,
    solver,
    saveat,
    t0,
    t1,
    **kwargs,
):
    del perturbed, self, kwargs
    record, num_steps, y_final, z_final, ts_saved = residuals
    grad_final_state, _ = grad_final_state__aux_stats
    y0, z0, args, terms = y0__z0__args__terms

    subs = jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)
    if grad_final_state is None:
        grad_ys = [None] * len(subs)
    else:
        grad_ys = [
            s.ys
            for s in jtu.tree_leaves(
                grad_final_state.save_state, is_leaf=_is_save_state
            )
        ]
    saved = [_split_saved_cotangents(s, g, y0) for s, g in zip(subs, grad_ys)]
    with_ts = [i for i, sub in enumerate(subs) if sub.ts is not None]

    diff = eqx.filter((y0, z0, args, terms), eqx.is_inexact_array)
    zeros = jtu.tree_map(jnp.zeros_like, diff)
    y_bar = _sum_present([c.t1 for c in saved], y0)
    z_bar = zeros[1]

    def step_start(k):
        if record.starts is not None:
            return record.starts[k]
        return jnp.where(k > 0, record.ends[k - 1], t0)

    def cond(carry):
        k, *_ = carry
        return k >= 0

    def body(carry):
        k, y1, z1, y1_bar, z1_bar, args_bar, terms_bar, pointers = carry
        step_t0 = step_start(k)
        step_t1 = record.ends[k]
        prev_end = jnp.where(k > 0, record.ends[k - 1], -jnp.inf)

        def saved_ts_cotangent(dense_info):
            interpolation = lambda info: solver.interpolation_cls(
                t0=step_t0, t1=step_t1, **info
            )
            dense_info_bar = jtu.tree_map(jnp.zeros_like, dense_info)
            new_pointers = []
            for i, pointer in zip(with_ts, pointers):
                pointer, dense_info_bar = _pull_back_saved_ts(
                    subs[i].ts,
                    saved[i].ts,
                    pointer,
                    prev_end,
                    dense_info,
                    interpolation,
                    dense_info_bar,
                )
                new_pointers.append(pointer)
            return dense_info_bar, tuple(new_pointers)

        (y0_k, z0_k), (y0_bar, z0_bar, args_bar_k, terms_bar_k), new_pointers = (
            solver.reverse_step(
                terms,
                step_t0,
                step_t1,
                y1,
                z1,
                args,
                y1_bar,
                z1_bar,
                saved_ts_cotangent if with_ts else None,
            )
        )
        return (
            k - 1,
            y0_k,
            z0_k,
            y0_bar,
            z0_bar,
            tree_add(args_bar, args_bar_k),
            tree_add(terms_bar, terms_bar_k),
            pointers if new_pointers is None else new_pointers,
        )

    init = (
        num_steps - 1,
        y_final,
        z_final,
        y_bar,
        z_bar,
        zeros[2],
        zeros[3],
        tuple(ts_saved[i] for i in with_ts),
    )
    _, _, _, y_bar, z_bar, args_bar, terms_bar, _ = lax.while_loop(cond, body, init)

    # Saved at `t0` directly; and when `t0 == t1` Diffrax makes no step and fills every
    # `SaveAt(ts=...)` output with `y0`.
    y_bar = tree_add(y_bar, _sum_present([c.t0 for c in saved], y0))
    no_steps = t0 == t1
    for i in with_ts:
        ts_bar = jtu.tree_map(
            lambda c: jnp.where(no_steps, c.sum(axis=0), 0), saved[i].ts
        )
        y_bar = tree_add(y_bar, ts_bar)
    return y_bar, z_bar, args_bar, terms_bar


class ReversibleAdjoint(diffrax.AbstractAdjoint):
    """Backpropagates through [`diffrax.diffeqsolve`][] by reconstructing the forward
    solve backwards in time, using an algebraically reversible solver
    ([`diffrax_reversible.Reversible`][]).

    The forward pass is Diffrax's own loop, which additionally records the times of
    the accepted steps. The backward pass walks the steps in reverse, recovers each
    state from the next one with the solver's closed-form inverse, and takes the
    vector-Jacobian product of that one step.

    The gradients are those of the discrete solve, exactly as
    [`diffrax.RecursiveCheckpointAdjoint`][] computes them (up to floating-point
    round-off), at a memory cost that does not grow with the number of steps apart from
    one scalar (two across jumps) per step of `max_steps` for the recorded step times.
    Backpropagation costs `O(n)` time in the number of steps `n`.

    Gradients are computed with respect to `y0`, `args` and the `terms` (for example the
    parameters of an `eqx.nn.MLP` vector field). Differentiating with respect to `t0`,
    `t1`, `dt0` or `SaveAt(ts=...)` raises an error.

    Supported: `SaveAt` with any combination of `t0`, `t1` and `ts` (including several
    `SubSaveAt`s), every step size controller, `jax.jit` and `jax.vmap` (batch elements
    may take different numbers of steps), pytree states, float32 and float64. The
    following raise a `ValueError`: a solver that is not
    [`diffrax_reversible.Reversible`][], `max_steps=None`, `UnsafeBrownianPath`, events,
    `SaveAt(steps=...)`, `SaveAt(fn=...)` and `SaveAt(dense=True)`.

    A vector field that closes over values being differentiated (for example
    `ODETerm(lambda t, y, args: model(y))`) is supported for `ODETerm` and
    `ControlTerm`: the closure is converted into a pytree first. Other custom terms
    should hold such values as fields, or receive them through `args`.

    !!! info

        Reverse-mode only: use [`diffrax.ForwardMode`][] for `jax.jvp`.
    """

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ):
        del throw
        _check_supported(
            solver=solver, terms=terms, saveat=saveat, event=event, max_steps=max_steps
        )
        y0 = init_state.y
        z0 = init_state.solver_state
        if passed_controller_state:
            controller_fn = ft.partial(
                eqxi.nondifferentiable,
                name="When using `adjoint=ReversibleAdjoint()`, `controller_state`",
            )
        else:
            controller_fn = lax.stop_gradient
        times = ft.partial(eqxi.nondifferentiable, msg=_TIMES_NONDIFFERENTIABLE)
        init_state = eqx.tree_at(
            lambda s: (s.y, s.solver_state, s.controller_state, s.tprev, s.tnext),
            init_state,
            (
                object(),
                object(),
                controller_fn(init_state.controller_state),
                times(init_state.tprev),
                times(init_state.tnext),
            ),
            is_leaf=is_none,
        )
        terms = _closure_convert_vector_fields(terms, t0, y0, args)
        final_state, aux_stats = _loop_reversible(
            (y0, z0, args, terms),
            self=self,
            solver=solver,
            stepsize_controller=times(stepsize_controller),
            event=event,
            saveat=times(saveat),
            t0=times(t0),
            t1=times(t1),
            dt0=times(dt0),
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
        )
        return only_transpose_ys(final_state), aux_stats


ReversibleAdjoint.__init__.__doc__ = """**Arguments:** None"""
