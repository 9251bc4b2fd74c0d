import dataclasses
import functools as ft
import types
from collections.abc import Callable
from typing import Any, Literal

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._checkpoints import (
    check_overflow,
    CheckpointEvery,
    Checkpoints,
    first_pointer,
    init_checkpoints,
    record_checkpoint,
    stored_state_at,
)
from ._diffrax_internals import (
    constant_step_count,
    current_state,
    dense_output,
    event_record,
    EventRecord,
    first_step_inputs,
    is_unsafe_sde,
    num_accepted_steps,
    num_saved,
    num_ts_saved,
    outer_loop_with_record,
    run_loop,
    save_states,
    saved_ts,
    saved_ys,
    solution_outputs,
    solve_result,
    step_end_time,
    step_interval,
    step_output_index,
    t0_offset,
    ts_output_index,
    with_current_state,
    with_forward_values_only,
)
from ._misc import error_dtype, is_none, relative_error, tree_add
from ._native import (
    is_invertible,
    NATIVE_REVERSIBLE_SOLVERS,
    undo_step_by_inverse,
)
from ._reversible_solver import AbstractReversibleSolver
from ._solver import Reversible, UNSTABLE_COUPLING_MESSAGE


_CONTROLLER_NONDIFFERENTIABLE = (
    "`adjoint=ReversibleAdjoint()` does not support gradients with respect to the "
    "arrays of a step size controller other than `StepTo(ts=...)` (for example "
    "`ClipStepSizeController(step_ts=..., jump_ts=...)`, or `PIDController` "
    "tolerances). Consider `adjoint=diffrax.RecursiveCheckpointAdjoint()` for those."
)


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _check_supported(
    *, solver, terms, saveat, stepsize_controller, event, max_steps, checkpoint_every
) -> None:
    if type(solver) is not Reversible and not is_invertible(solver):
        name = type(solver).__name__
        raise ValueError(
            f"`adjoint=ReversibleAdjoint()` needs an algebraically reversible solver, "
            f"but got `solver={name}(...)`. Wrap it as `solver=Reversible({name}())`, "
            "use one of Diffrax's own reversible solvers ("
            + ", ".join(f"`{s.__name__}`" for s in NATIVE_REVERSIBLE_SOLVERS)
            + "), or write one as a subclass of "
            "`diffrax_reversible.AbstractReversibleSolver`."
        )
    if type(solver) is diffrax.ReversibleHeun and not _steps_are_contiguous(
        stepsize_controller
    ):
        raise ValueError(
            "`solver=diffrax.ReversibleHeun()` with `adjoint=ReversibleAdjoint()` does "
            "not support `ClipStepSizeController(jump_ts=...)`: after a jump it "
            "re-evaluates its vector field from the state, which cannot be undone. "
            "Consider `solver=Reversible(diffrax.Heun())`."
        )
    if isinstance(solver, AbstractReversibleSolver) and not _steps_are_contiguous(
        stepsize_controller
    ):
        raise ValueError(
            f"`solver={type(solver).__name__}()` with `adjoint=ReversibleAdjoint()` "
            "does not support `ClipStepSizeController(jump_ts=...)`: the backward "
            "pass differentiates `step` with `made_jump=False`. Consider "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    if checkpoint_every == "auto" and type(solver) is not Reversible:
        raise ValueError(
            '`ReversibleAdjoint(checkpoint_every="auto")` places its checkpoints from '
            "the coupling of `Reversible(...)`, but got "
            f"`solver={type(solver).__name__}(...)`. Pass an integer "
            "`checkpoint_every` instead."
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
    if _finds_event_root(event) and (
        saveat.dense
        or any(sub.steps for sub in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat))
    ):
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` does not support an `Event` with a "
            "`root_finder` together with `SaveAt(steps=...)` or `SaveAt(dense=True)`. "
            "Consider `SaveAt(ts=...)`, `Event(root_finder=None)`, or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


def _finds_event_root(event) -> bool:
    return event is not None and event.root_finder is not None


def _closure_convert(fn, t0, y0, args):
    """A custom VJP differentiates only its explicit inputs. A function such as
    `lambda t, y, args: model(y)` closes over `model`; turning the closure into a pytree
    makes `model`'s arrays explicit inputs, so they get gradients."""
    if _is_closure(fn):
        return eqx.filter_closure_convert(fn, t0, y0, args)
    return fn


def _is_term_with_vector_field(x):
    return isinstance(x, (diffrax.ODETerm, diffrax.ControlTerm))


def _shape_structs(tree):
    return jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def _states_seen_by_vector_fields(terms, solver, init_state, args):
    """The state each vector field of `terms` is called with, as shape structures.

    Not always the whole `y`: `SemiImplicitEuler`, for example, calls each of its two
    terms with its part of the state. Found by tracing one step, with every vector
    field wrapped to record its input (`None` for a vector field that is not called).
    """
    terms_leaves, treedef = jtu.tree_flatten(terms, is_leaf=_is_term_with_vector_field)
    seen = [None] * len(terms_leaves)

    def recording(i, fn):
        def vector_field(t, y, args):
            if seen[i] is None:
                seen[i] = _shape_structs(y)
            return fn(t, y, args)

        return vector_field

    recording_leaves = [
        eqx.tree_at(lambda x: x.vector_field, term, recording(i, term.vector_field))
        if _is_term_with_vector_field(term)
        else term
        for i, term in enumerate(terms_leaves)
    ]
    recording_terms = jtu.tree_unflatten(treedef, recording_leaves)
    t0, t1, y0, solver_state, made_jump = first_step_inputs(init_state)
    jax.eval_shape(
        lambda: solver.step(recording_terms, t0, t1, y0, args, solver_state, made_jump)
    )
    return jtu.tree_unflatten(treedef, seen)


def _is_closure(fn) -> bool:
    return isinstance(fn, types.FunctionType) and bool(fn.__closure__)


def _closure_convert_vector_fields(terms, solver, init_state, args):
    term_leaves = jtu.tree_leaves(terms, is_leaf=_is_term_with_vector_field)
    if not any(
        _is_term_with_vector_field(term) and _is_closure(term.vector_field)
        for term in term_leaves
    ):
        return terms  # Nothing to convert: skip tracing a step.
    seen = _states_seen_by_vector_fields(terms, solver, init_state, args)
    t0, _, y0, _, _ = first_step_inputs(init_state)

    def convert(term, y):
        if not _is_term_with_vector_field(term):
            return term
        y = y0 if y is None else y
        vector_field = _closure_convert(term.vector_field, t0, y, args)
        return eqx.tree_at(lambda x: x.vector_field, term, vector_field)

    # `seen` has a leaf (a state, or `None`) where `terms` has a term.
    return jtu.tree_map(
        convert,
        terms,
        seen,
        is_leaf=_is_term_with_vector_field,
    )


def _closure_convert_saveat_fns(saveat, t0, y0, args):
    # Diffrax wraps every user `fn` in a lambda over the direction of integration.
    def convert(sub):
        if not _is_subsaveat(sub):
            return sub
        return eqx.tree_at(lambda s: s.fn, sub, _closure_convert(sub.fn, t0, y0, args))

    return jtu.tree_map(convert, saveat, is_leaf=_is_subsaveat)


def _cond_fn_kwargs(
    terms, solver, t0, t1, dt0, saveat, stepsize_controller, max_steps
) -> dict[str, Any]:
    # What Diffrax passes to an event's `cond_fn` besides `t`, `y`, `args`.
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


class _PositionalCondFn(eqx.Module):
    # Diffrax passes `t`, `y`, `args` by keyword in its root find; a closure-converted
    # function takes them by position.
    cond_fn: Callable

    def __call__(self, t, y, args, **kwargs):
        return self.cond_fn(t, y, args, **kwargs)


def _closure_convert_event(event, example_args, cond_fn_kwargs):
    if event is None:
        return None

    def convert(cond_fn):
        if _is_closure(cond_fn):
            cond_fn = eqx.filter_closure_convert(
                cond_fn, *example_args, **cond_fn_kwargs
            )
            return _PositionalCondFn(cond_fn)
        return cond_fn

    cond_fn = jtu.tree_map(convert, event.cond_fn, is_leaf=callable)
    return eqx.tree_at(lambda e: e.cond_fn, event, cond_fn)


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


def _step_times_are_differentiable(controller) -> bool:
    # The step times of these are closed-form functions of `t0`, `t1`, `dt0`; an
    # adaptive controller's depend on its whole history of accepted and rejected steps.
    return type(controller) in (diffrax.ConstantStepSize, diffrax.StepTo)


def _refuse_gradients(tree, message):
    """Identity, which raises `ValueError(message)` when differentiated: while JAX
    traces the derivative, before anything runs (`eqxi.nondifferentiable` raises a
    `RuntimeError`)."""
    dynamic, static = eqx.partition(tree, eqx.is_array)

    @jax.custom_jvp
    def identity(dynamic):
        return dynamic

    @identity.defjvp
    def _(primals, tangents):
        raise ValueError(message)

    return eqx.combine(identity(dynamic), static)


def _split_step_ts(controller):
    """`StepTo.ts` as an input of its own, to be differentiated like `t0` and `t1`
    (every step time is one of them), and the controller without its gradient."""
    if type(controller) is not diffrax.StepTo:
        return controller, None
    step_ts = controller.ts
    return eqx.tree_at(lambda c: c.ts, controller, lax.stop_gradient(step_ts)), step_ts


class _StepRecord(eqx.Module):
    starts: Array | None
    ends: Array
    # With `ReversibleAdjoint(checkpoint_every=...)`.
    checkpoints: Checkpoints | None


def _record_buffers(record: _StepRecord):
    # The arrays written at one index per step (in place, inside the loop).
    checkpoints = record.checkpoints
    states = None if checkpoints is None else checkpoints.states
    return record.starts, record.ends, states


def _recording_while_loop(
    record_starts: bool,
    checkpoint_every: CheckpointEvery,
    max_checkpoints: int,
    records_out: list,
):
    """Diffrax's outer loop, additionally writing the interval of every accepted step
    (and any checkpoints) into buffers sized by `max_steps`."""

    def init_record(init_state, max_steps):
        tprev, _ = step_interval(init_state)
        empty = jnp.full(max_steps, jnp.inf, dtype=jnp.result_type(tprev))
        checkpoints = init_checkpoints(
            checkpoint_every, max_checkpoints, max_steps, init_state
        )
        return _StepRecord(
            starts=empty if record_starts else None,
            ends=empty,
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
        ends = record.ends.at[index].set(tnext)
        checkpoints = record.checkpoints
        if checkpoints is not None:
            checkpoints = record_checkpoint(checkpoints, checkpoint_every, state)
        return _StepRecord(starts=starts, ends=ends, checkpoints=checkpoints)

    return outer_loop_with_record(
        init_record, record_step, _record_buffers, records_out
    )


def _forward_loop(diff_inputs, *, self, init_state, outer_while_loop=None, **kwargs):
    # Not differentiated (the custom VJP supplies the gradient), so plain loops.
    y0, z0, args, terms, saveat, (t0, t1, dt0), event, _ = diff_inputs
    return run_loop(
        self,
        args=args,
        terms=terms,
        saveat=saveat,
        t0=t0,
        t1=t1,
        dt0=dt0,
        event=event,
        init_state=with_current_state(init_state, y0, z0),
        outer_while_loop=outer_while_loop,
        **kwargs,
    )


@eqx.filter_custom_vjp
def _loop_reversible(diff_inputs, **kwargs):
    final_state, aux_stats = _forward_loop(diff_inputs, **kwargs)
    return _batched_like(final_state, (diff_inputs, final_state)), aux_stats


def _times_perturbed(perturbed) -> bool:
    *_, times, _, step_ts = perturbed
    return any(jtu.tree_leaves((times, step_ts)))


class _Residuals(eqx.Module):
    record: _StepRecord
    num_steps: Array
    y_final: PyTree[Array]
    z_final: PyTree[Array]
    ts_saved: list[Array]
    save_index: list[Array]
    ys_shapes: list[PyTree[Any]]
    ts_shapes: list[Any]
    controller_num_steps: Array | None
    event: EventRecord
    event_time: Array | None


def _event_time(event, subs, states, like):
    """Where a terminating event stopped the solve, as saved at `t1` (outputs depend
    on it only through the output at `t1`)."""
    if not _finds_event_root(event):
        return None
    for sub, save_state in zip(subs, states):
        if sub.t1:
            return saved_ts(save_state)[num_saved(save_state) - 1]
    return jnp.zeros((), jnp.result_type(like))


@_loop_reversible.def_fwd
def _loop_reversible_fwd(
    perturbed, diff_inputs, *, self, stepsize_controller, **kwargs
):
    if _times_perturbed(perturbed) and not _step_times_are_differentiable(
        stepsize_controller
    ):
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` supports gradients with respect to `t0`, "
            "`t1` and `dt0` with `ConstantStepSize` and `StepTo` only (their step "
            "times are closed-form functions of `t0`, `t1` and `dt0`), but got "
            f"`stepsize_controller={type(stepsize_controller).__name__}(...)`. "
            "Gradients with respect to `SaveAt(ts=...)` work with every controller. "
            "For time gradients with adaptive steps, consider "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    records = []
    record_starts = not _steps_are_contiguous(stepsize_controller)
    final_state, aux_stats = _forward_loop(
        diff_inputs,
        self=self,
        stepsize_controller=stepsize_controller,
        outer_while_loop=_recording_while_loop(
            record_starts, self.checkpoint_every, self.max_checkpoints, records
        ),
        **kwargs,
    )
    [record] = records
    final_state = check_overflow(record.checkpoints, final_state)
    states = save_states(final_state)
    y_final, z_final = current_state(final_state)
    residuals = _Residuals(
        record=record,
        num_steps=num_accepted_steps(final_state),
        y_final=y_final,
        z_final=z_final,
        ts_saved=[num_ts_saved(s) for s in states],
        save_index=[num_saved(s) for s in states],
        ys_shapes=[_shape_structs(saved_ys(s)) for s in states],
        ts_shapes=[_shape_structs(saved_ts(s)) for s in states],
        controller_num_steps=constant_step_count(stepsize_controller, final_state),
        event=event_record(final_state),
        event_time=_event_time(
            diff_inputs[6],
            jtu.tree_leaves(diff_inputs[4].subs, is_leaf=_is_subsaveat),
            states,
            step_interval(final_state)[0],
        ),
    )
    final_state = _batched_like(final_state, (diff_inputs, final_state))
    return (final_state, aux_stats), residuals


def _batched_like(tree, like):
    """`tree`, unchanged in value, but batched under `jax.vmap` wherever any array of
    `like` is (the residuals derive from the inputs and the final state).

    JAX's custom-VJP rule gives an output that is the same for every batch element
    (the saved times, with step times that do not depend on the state) the cotangent
    summed over the batch, and runs the backward pass once per batch element: each
    would pull back the whole sum, and the time gradients would come out multiplied by
    the batch size.
    """
    firsts = [
        jnp.ravel(x)[0].astype(jnp.float32)
        for x in jtu.tree_leaves(like)
        if eqx.is_array(x) and x.size > 0
    ]
    if not firsts:
        return tree
    tag = jnp.stack(firsts).sum() > 0
    return jtu.tree_map(lambda x: jnp.where(tag, x, x) if eqx.is_array(x) else x, tree)


def _zeros_like_diff(tree):
    return jtu.tree_map(jnp.zeros_like, eqx.filter(tree, eqx.is_inexact_array))


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


def _pull_back_save(fn, t, y, args, cotangent):
    """The cotangents of `(t, y, args, fn)` for one output `fn(t, y, args)`."""
    _, pull_back = eqx.filter_vjp(lambda t, y, args, fn: fn(t, y, args), t, y, args, fn)
    return pull_back(cotangent)


class _SaveCotangents(eqx.Module):
    """Cotangents accumulated for the inputs that one `SubSaveAt`'s outputs depend on,
    besides the state: its `fn` and its `ts`."""

    fn: PyTree[Array]
    ts: Array | None


def _tie_share(tie, cotangent):
    """The share of `cotangent` that `jnp.minimum(a, b)` passes to `b`: JAX splits a
    tie in half."""
    return jnp.where(tie, 0.5 * cotangent, jnp.zeros_like(cotangent))


def _where_tree(pred, tree):
    return jtu.tree_map(lambda x: jnp.where(pred, x, jnp.zeros_like(x)), tree)


class _Outputs(eqx.Module):
    """The static description of what a `SubSaveAt` saves, and the cotangents of its
    `ys` (materialised with zeros where unused)."""

    sub: diffrax.SubSaveAt
    grad_ys: PyTree[Array]
    grad_ts: Array

    @property
    def t0_offset(self) -> int:
        return t0_offset(self.sub)

    @property
    def num_ts(self) -> int:
        return 0 if self.sub.ts is None else len(self.sub.ts)

    def take(self, index):
        return jtu.tree_map(lambda g: g[index], self.grad_ys)

    def ts_index(self, j, k):
        return ts_output_index(self.sub, j, k)

    def step_index(self, k, num_ts_saved):
        return step_output_index(self.sub, k, num_ts_saved)


def _pull_back_saved_ts(
    outputs: _Outputs,
    k,
    pointer,
    prev_end,
    interpolation,
    dense_info,
    step_times,
    args,
    fn_ts_bar: _SaveCotangents,
):
    """Pulls back the outputs at `ts[j]` for every `j < pointer` with `ts[j] >
    prev_end`: those are exactly the outputs saved during this step. Returns the new
    pointer, and cotangents for `(dense_info, step_times, args)` and `fn`, `ts`."""
    ts = outputs.sub.ts
    fn = outputs.sub.fn

    def cond(carry):
        pointer, *_ = carry
        return (pointer > 0) & (ts[jnp.maximum(pointer - 1, 0)] > prev_end)

    def body(carry):
        pointer, inputs_bar, fn_ts_bar = carry
        j = pointer - 1

        def save(dense_info, step_times, args, t, fn):
            y = interpolation(dense_info, *step_times).evaluate(t)
            return fn(t, y, args)

        _, pull_back = eqx.filter_vjp(save, dense_info, step_times, args, ts[j], fn)
        index = outputs.ts_index(j, k)
        info_bar, times_bar, args_bar, t_bar, fn_bar = pull_back(outputs.take(index))
        t_bar = t_bar + outputs.grad_ts[index]
        inputs_bar = tree_add(inputs_bar, (info_bar, times_bar, args_bar))
        fn_ts_bar = _SaveCotangents(
            fn=tree_add(fn_ts_bar.fn, fn_bar), ts=fn_ts_bar.ts.at[j].add(t_bar)
        )
        return j, inputs_bar, fn_ts_bar

    zeros = _zeros_like_diff((dense_info, step_times, args))
    pointer, inputs_bar, fn_ts_bar = lax.while_loop(
        cond, body, (pointer, zeros, fn_ts_bar)
    )
    return pointer, inputs_bar, fn_ts_bar


class _Interval(eqx.Module):
    """Where step `k` lies: its start and end, and the end of step `k - 1` (`-inf`
    for the first step)."""

    t0: Array
    t1: Array
    prev_end: Array


class _TimeCotangents(eqx.Module):
    """The cotangents of `t0`, `t1`, `dt0`, `StepTo.ts`, and of the end of the step
    being undone (pulled back to those once the step is done)."""

    t0: Array
    t1: Array
    dt0: Array
    end: Array
    step_ts: Array | None


class _BackwardCarry(eqx.Module):
    """The backward loop's state at the end of step `k`."""

    k: Array
    state: tuple[PyTree[Array], PyTree]
    state_bar: tuple[PyTree[Array], PyTree]
    args_bar: PyTree[Array]
    terms_bar: PyTree[Array]
    # Per `SubSaveAt`: how many of its `ts` remain to be pulled back, and the
    # cotangents of its `fn` and `ts`.
    pointers: tuple[Array, ...]
    save_bars: tuple[_SaveCotangents, ...]
    times: _TimeCotangents
    max_error: Array
    checkpoint_pointer: Array


class _Backward(eqx.Module):
    """What every part of the backward pass reads: the inputs of the solve, its
    record, and the cotangents of its outputs."""

    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    max_steps: int
    adjoint: "ReversibleAdjoint"
    residuals: _Residuals
    inputs: tuple
    outputs: list[_Outputs]
    grad_z_final: PyTree | None
    grad_dense_infos: PyTree | None
    grad_dense_ts: Array | None
    with_step_times: bool

    @property
    def record(self) -> _StepRecord:
        return self.residuals.record

    @property
    def with_ts(self) -> list[int]:
        return [i for i, out in enumerate(self.outputs) if out.num_ts]

    @property
    def with_steps(self) -> list[int]:
        return [i for i, out in enumerate(self.outputs) if out.sub.steps]

    def step_start(self, k):
        record = self.record
        if record.starts is not None:
            return record.starts[k]
        t0 = self.inputs[5][0]
        return jnp.where(k > 0, record.ends[k - 1], t0)

    def interval(self, k) -> _Interval:
        # Under `vmap` the loop runs on for the elements that are done (`k < 0`), and
        # discards what they compute. They redo step 0: a step within `[t0, t1]`, where
        # the terms (a Brownian path) can be evaluated.
        ends = self.record.ends
        return _Interval(
            t0=self.step_start(jnp.maximum(k, 0)),
            t1=ends[jnp.maximum(k, 0)],
            prev_end=jnp.where(k > 0, ends[k - 1], -jnp.inf),
        )

    def interpolation(self, dense_info, step_t0, step_t1):
        return self.solver.interpolation_cls(t0=step_t0, t1=step_t1, **dense_info)


def _output_cotangents(grad_final_state, saveat, residuals):
    """The cotangents of the solve's outputs: per `SubSaveAt` (zeros where nothing
    depends on an output), of the final solver state and of the dense output."""
    subs = jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)
    if grad_final_state is None:
        grad_ys = [None] * len(subs)
        grad_ts = [None] * len(subs)
        grad_z_final = None
        grad_dense_infos = None
        grad_dense_ts = None
    else:
        grad_ys = [saved_ys(s) for s in save_states(grad_final_state)]
        grad_ts = [saved_ts(s) for s in save_states(grad_final_state)]
        _, grad_z_final = current_state(grad_final_state)
        grad_z_final = grad_z_final if saveat.solver_state else None
        grad_dense_infos, grad_dense_ts = dense_output(grad_final_state)
        if not saveat.dense:
            grad_dense_infos, grad_dense_ts = None, None
    outputs = [
        _Outputs(
            sub=sub,
            grad_ys=_zeros_like_cotangent(g, shapes),
            grad_ts=_zeros_like_cotangent(g_ts, ts_shape),
        )
        for sub, g, g_ts, shapes, ts_shape in zip(
            subs, grad_ys, grad_ts, residuals.ys_shapes, residuals.ts_shapes
        )
    ]
    return outputs, grad_z_final, grad_dense_infos, grad_dense_ts


def _add_fn_bar(save_bar: _SaveCotangents, fn_bar) -> _SaveCotangents:
    return _SaveCotangents(fn=tree_add(save_bar.fn, fn_bar), ts=save_bar.ts)


def _pull_back_at_t1(bwd: _Backward, carry: _BackwardCarry):
    """The outputs at `t1`, unless the last step's save already was one. After a
    terminating event they are interpolated within the last step instead: returned
    per output, for `_pull_back_event`."""
    residuals, record, num_steps = bwd.residuals, bwd.record, bwd.residuals.num_steps
    _, _, args, _, _, (t0, t1, _), event, _ = bwd.inputs
    (y_bar, z_bar), args_bar = carry.state_bar, carry.args_bar
    save_bars = list(carry.save_bars)
    t1_bar, last_end_bar = carry.times.t1, carry.times.end
    if _finds_event_root(event):
        event_happened = jnp.any(jnp.stack(jtu.tree_leaves(residuals.event.mask)))
    else:
        event_happened = False
    event_cotangents = {}
    for i, out in enumerate(bwd.outputs):
        steps = out.sub.steps
        if not out.sub.t1 or steps == 1:
            continue
        saved = True if steps == 0 else num_steps % steps != 0
        index = residuals.save_index[i] - 1
        cotangent = _where_tree(saved, (out.take(index), out.grad_ts[index]))
        if _finds_event_root(event):
            event_cotangents[i] = _where_tree(event_happened, cotangent)
            cotangent = _where_tree(jnp.invert(event_happened), cotangent)
        cotangent, time_cotangent = cotangent
        # Saved at `min(end of the last step, t1)` (without steps: at `t0`): before
        # `t1` where an event without a root finder stopped the solve.
        last_end = record.ends[jnp.maximum(num_steps - 1, 0)]
        t_saved = jnp.where(num_steps > 0, jnp.minimum(last_end, t1), t0)
        t_bar, y_final_bar, args_bar_i, fn_bar = _pull_back_save(
            out.sub.fn, t_saved, residuals.y_final, args, cotangent
        )
        t_bar = t_bar + time_cotangent
        to_t1 = _tie_share((num_steps > 0) & (last_end == t1), t_bar)
        t1_bar = t1_bar + to_t1
        last_end_bar = last_end_bar + t_bar - to_t1
        y_bar = tree_add(y_bar, y_final_bar)
        args_bar = tree_add(args_bar, args_bar_i)
        save_bars[i] = _add_fn_bar(save_bars[i], fn_bar)
    carry = dataclasses.replace(
        carry,
        state_bar=(y_bar, z_bar),
        args_bar=args_bar,
        save_bars=tuple(save_bars),
        times=dataclasses.replace(carry.times, t1=t1_bar, end=last_end_bar),
    )
    return carry, event_cotangents


class _EventCotangents(eqx.Module):
    """The outputs at a terminating event's time pulled back to the last step's
    `dense_info` and times (added inside that step) and to everything else."""

    info_bar: PyTree[Array]
    step_times_bar: tuple[Array, Array]
    args_bar: PyTree[Array]
    terms_bar: PyTree[Array]
    event_bar: PyTree[Array]
    times_bar: tuple[Array, Array, Array]
    fns_bar: dict[int, PyTree[Array]]


def _pull_back_event(bwd: _Backward, event_cotangents) -> _EventCotangents:
    """The outputs at the event time `t*`, `fn(t*, y(t*), args)` with `y` interpolated
    in the last step, pulled back to that step's `dense_info` and times, `args`,
    `terms`, the `fn`s and the event; `t*` itself by the implicit function theorem on
    `cond_fn(t*, y(t*), ...) = 0`."""
    _, _, args, terms, saveat, (t0, t1, dt0), event, _ = bwd.inputs
    residuals, solver = bwd.residuals, bwd.solver
    dense_info, step_times = residuals.event.dense_info, residuals.event.step_times
    fns = {i: bwd.outputs[i].sub.fn for i in event_cotangents}
    t_event = residuals.event_time

    def outputs_at(t, dense_info, step_times, args, fns):
        # Each output is `(fn(t*, y(t*), args), t*)`: the saved value and time.
        y = bwd.interpolation(dense_info, *step_times).evaluate(t)
        return {i: (fn(t, y, args), t) for i, fn in fns.items()}

    _, pull_back = eqx.filter_vjp(
        outputs_at, t_event, dense_info, step_times, args, fns
    )
    t_bar, info_bar, times_bar, args_bar, fns_bar = pull_back(event_cotangents)

    def root_function(t, dense_info, step_times, args, terms, event, times):
        # As Diffrax's: the triggered event's value, or for a boolean event the
        # distance to the end of the step.
        t0, t1, dt0 = times
        y = bwd.interpolation(dense_info, *step_times).evaluate(t)
        value = jnp.zeros((), jnp.result_type(t))
        masks = jtu.tree_leaves(residuals.event.mask)
        cond_fns = jtu.tree_leaves(event.cond_fn, is_leaf=callable)
        kwargs = _cond_fn_kwargs(
            terms, solver, t0, t1, dt0, saveat, bwd.stepsize_controller, bwd.max_steps
        )
        for mask, cond_fn in zip(masks, cond_fns):
            value_i = cond_fn(t, y, args, **kwargs)
            if jnp.issubdtype(jnp.result_type(value_i), jnp.bool_):
                value_i = step_times[1] - t
            value = value + jnp.where(mask, value_i, 0).astype(value.dtype)
        return value

    _, pull_back_root = eqx.filter_vjp(
        root_function,
        t_event,
        dense_info,
        step_times,
        args,
        terms,
        event,
        (t0, t1, dt0),
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
    return _EventCotangents(
        info_bar=tree_add(info_bar, info_root_bar),
        step_times_bar=tree_add(times_bar, times_root_bar),
        args_bar=tree_add(args_bar, args_root_bar),
        terms_bar=terms_bar,
        event_bar=event_bar,
        times_bar=kw_bar,
        fns_bar=fns_bar,
    )


def _add_event_cotangents(bwd: _Backward, carry: _BackwardCarry, event_bars):
    """Adds what `_pull_back_event` gives outside the last step into the carry."""
    save_bars = list(carry.save_bars)
    for i, fn_bar in event_bars.fns_bar.items():
        save_bars[i] = _add_fn_bar(save_bars[i], fn_bar)
    t0_bar_event, t1_bar_event, dt0_bar_event = event_bars.times_bar
    times = carry.times
    # Through the `t0`, `t1`, `dt0` that Diffrax passes to `cond_fn`.
    times = dataclasses.replace(
        times,
        t0=times.t0 + t0_bar_event,
        t1=times.t1 + t1_bar_event,
        dt0=times.dt0 if bwd.inputs[5][2] is None else times.dt0 + dt0_bar_event,
    )
    return dataclasses.replace(
        carry,
        args_bar=tree_add(carry.args_bar, event_bars.args_bar),
        terms_bar=tree_add(carry.terms_bar, event_bars.terms_bar),
        save_bars=tuple(save_bars),
        times=times,
    )


def _pull_back_step_saves(bwd: _Backward, carry: _BackwardCarry, step: _Interval):
    """The outputs of `SaveAt(steps=...)` saved at the end of step `k`; returns the
    carry and the cotangent of the time they were saved at."""
    k, (y1, _) = carry.k, carry.state
    args = bwd.inputs[2]
    y1_bar, z1_bar = carry.state_bar
    args_bar = carry.args_bar
    save_bars = list(carry.save_bars)
    saved_time_bar = jnp.zeros((), jnp.result_type(bwd.inputs[5][0]))
    for i in bwd.with_steps:
        out = bwd.outputs[i]
        saved = (k + 1) % out.sub.steps == 0
        num_ts_saved = carry.pointers[i] if out.num_ts else 0
        index = out.step_index(k, num_ts_saved)
        cotangent = _where_tree(saved, out.take(index))
        t_bar, y1_bar_i, args_bar_i, fn_bar = _pull_back_save(
            out.sub.fn, step.t1, y1, args, cotangent
        )
        t_bar = t_bar + jnp.where(saved, out.grad_ts[index], 0)
        y1_bar = tree_add(y1_bar, y1_bar_i)
        args_bar = tree_add(args_bar, args_bar_i)
        save_bars[i] = _add_fn_bar(save_bars[i], fn_bar)
        saved_time_bar = saved_time_bar + t_bar
    carry = dataclasses.replace(
        carry,
        state_bar=(y1_bar, z1_bar),
        args_bar=args_bar,
        save_bars=tuple(save_bars),
    )
    return carry, saved_time_bar


def _pull_back_within_step(bwd, carry, step, event_bars, dense_info):
    """The outputs interpolated within step `k` (`SaveAt(ts=...)`, dense output, the
    outputs at a terminating event in the last step), pulled back to the step's
    `dense_info`: returns that cotangent, and the cotangents of the step's times and
    `args`, the new pointers into the `ts` and `SaveAt` cotangents."""
    k, args = carry.k, bwd.inputs[2]
    step_times = (step.t0, step.t1)
    inputs_bar = _zeros_like_diff((dense_info, step_times, args))
    if bwd.grad_dense_infos is not None:
        info_bar = jtu.tree_map(
            lambda g, x: jnp.zeros_like(x) if g is None else g[k],
            bwd.grad_dense_infos,
            eqx.filter(dense_info, eqx.is_inexact_array),
            is_leaf=is_none,
        )
        inputs_bar = (tree_add(inputs_bar[0], info_bar), *inputs_bar[1:])
    if event_bars is not None:
        is_last = k == bwd.residuals.num_steps - 1
        info_bar, times_bar, args_bar_saved = inputs_bar
        inputs_bar = (
            tree_add(info_bar, _where_tree(is_last, event_bars.info_bar)),
            tree_add(times_bar, _where_tree(is_last, event_bars.step_times_bar)),
            args_bar_saved,
        )
    pointers = list(carry.pointers)
    save_bars = list(carry.save_bars)
    for i in bwd.with_ts:
        pointers[i], inputs_bar_i, save_bars[i] = _pull_back_saved_ts(
            bwd.outputs[i],
            k,
            carry.pointers[i],
            step.prev_end,
            bwd.interpolation,
            dense_info,
            step_times,
            args,
            carry.save_bars[i],
        )
        inputs_bar = tree_add(inputs_bar, inputs_bar_i)
    info_bar, step_times_bar, args_bar_saved = inputs_bar
    return info_bar, (step_times_bar, args_bar_saved, pointers, save_bars)


def _undo_step(bwd: _Backward, carry: _BackwardCarry, step: _Interval, event_bars):
    """Undoes step `k` and pulls the cotangents back through it; returns the carry
    (at the start of the step, with the step's time cotangents still to pull back)
    and the cotangents of the step's start and end times."""
    _, _, args, terms, _, _, _, _ = bwd.inputs
    solver, k = bwd.solver, carry.k
    if type(solver) is Reversible:
        undo_step = solver.undo_step
    else:
        t_before = bwd.step_start(jnp.maximum(k - 1, 0))
        undo_step = ft.partial(undo_step_by_inverse, solver, t_before=t_before)
    with_dense = (
        bool(bwd.with_ts) or bwd.grad_dense_infos is not None or event_bars is not None
    )
    (y1, z1), (y1_bar, z1_bar) = carry.state, carry.state_bar
    state0, dense_info, pull_back = undo_step(
        terms,
        step.t0,
        step.t1,
        y1,
        z1,
        args,
        y1_bar,
        z1_bar,
        with_dense,
        bwd.with_step_times,
    )
    pointers, save_bars = carry.pointers, carry.save_bars
    if with_dense:
        dense_info_bar, aux = _pull_back_within_step(
            bwd, carry, step, event_bars, dense_info
        )
    else:
        dense_info_bar, aux = None, None
    y0_bar, z0_bar, args_bar_k, terms_bar_k, times_bar_k = pull_back(dense_info_bar)
    t0_bar_k, t1_bar_k = (0, 0) if times_bar_k is None else times_bar_k
    args_bar = tree_add(carry.args_bar, args_bar_k)
    terms_bar = tree_add(carry.terms_bar, terms_bar_k)
    if aux is not None:
        (interp_t0_bar, interp_t1_bar), args_bar_saved, pointers, save_bars = aux
        args_bar = tree_add(args_bar, args_bar_saved)
        t0_bar_k = t0_bar_k + interp_t0_bar
        t1_bar_k = t1_bar_k + interp_t1_bar
    carry = dataclasses.replace(
        carry,
        state=state0,
        state_bar=(y0_bar, z0_bar),
        args_bar=args_bar,
        terms_bar=terms_bar,
        pointers=tuple(pointers),
        save_bars=tuple(save_bars),
    )
    return carry, (t0_bar_k, t1_bar_k)


def _pull_back_step_time(bwd, times: _TimeCotangents, k, step, times_bar_k, saved_bar):
    """Pulls the cotangent of the end of step `k` back to `t0`, `t1`, `dt0` and
    `StepTo.ts` (every step time is a function of those), and starts the cotangent of
    the end of step `k - 1`: the start of this one."""
    _, _, _, _, _, (t0, t1, dt0), _, step_ts = bwd.inputs
    t0_bar_k, t1_bar_k = times_bar_k
    t1_bar = times.t1
    end_bar = times.end + t1_bar_k
    if bwd.grad_dense_ts is not None:
        saved_bar = saved_bar + bwd.grad_dense_ts[k + 1]
    # Step saves and dense output record `min(end of step, t1)`.
    to_t1 = _tie_share(step.t1 == t1, saved_bar)
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
        t0,
        t1,
        dt0,
        step_ts,
    )
    t0_bar_e, t1_bar_e, dt0_bar_e, step_ts_bar_e = pull_back_end(end_bar)
    return _TimeCotangents(
        t0=times.t0 + t0_bar_e,
        t1=t1_bar + t1_bar_e,
        dt0=times.dt0 if dt0 is None else times.dt0 + dt0_bar_e,
        end=t0_bar_k,
        step_ts=None if step_ts is None else times.step_ts + step_ts_bar_e,
    )


def _restart_from_checkpoint(bwd: _Backward, carry: _BackwardCarry):
    """With `checkpoint_every`: where a state was stored at the start of step `k`,
    continue from it instead of the reconstruction (drift is bounded by the steps
    between checkpoints), and measure the reconstruction's error there."""
    solver, checkpoints = bwd.solver, bwd.record.checkpoints
    due, stored, checkpoint_pointer = stored_state_at(
        checkpoints, bwd.adjoint.checkpoint_every, carry.k, carry.checkpoint_pointer
    )
    y0, z0 = carry.state
    error = relative_error(
        _reconstructed(solver, y0, z0),
        _reconstructed(solver, *stored),
        also_scale=bwd.residuals.y_final,
    )
    max_error = jnp.where(due, jnp.maximum(carry.max_error, error), carry.max_error)
    state = jtu.tree_map(lambda a, b: jnp.where(due, a, b), stored, (y0, z0))
    return dataclasses.replace(
        carry, state=state, max_error=max_error, checkpoint_pointer=checkpoint_pointer
    )


def _backward_step(bwd: _Backward, carry: _BackwardCarry, event_bars):
    """One step of the backward pass, as in the paper: pull back the outputs saved at
    the step's end, undo the step and take its vector-Jacobian product, pull back the
    step's times, restart from a checkpoint."""
    step = bwd.interval(carry.k)
    carry, saved_time_bar = _pull_back_step_saves(bwd, carry, step)
    carry, times_bar_k = _undo_step(bwd, carry, step, event_bars)
    if bwd.with_step_times:
        times = _pull_back_step_time(
            bwd, carry.times, carry.k, step, times_bar_k, saved_time_bar
        )
    else:
        times = carry.times
    carry = dataclasses.replace(carry, times=times)
    if bwd.record.checkpoints is not None:
        carry = _restart_from_checkpoint(bwd, carry)
    return dataclasses.replace(carry, k=carry.k - 1)


def _pull_back_at_t0(bwd: _Backward, carry: _BackwardCarry):
    """The outputs at `t0`; and when `t0 == t1` Diffrax makes no step and saves the
    output at `t0` in place of every `SaveAt(ts=...)` output."""
    y0, _, args, _, _, (t0, t1, _), _, _ = bwd.inputs
    y_bar, z_bar = carry.state_bar
    args_bar = carry.args_bar
    save_bars = list(carry.save_bars)
    t0_bar = carry.times.t0
    no_steps = t0 == t1
    for i, out in enumerate(bwd.outputs):
        cotangent = None
        if out.sub.t0:
            cotangent = out.take(0)
            t0_bar = t0_bar + out.grad_ts[0]
        if out.num_ts:
            start = out.t0_offset
            ts_cotangent = jtu.tree_map(
                lambda g: jnp.where(no_steps, g[start : start + out.num_ts].sum(0), 0),
                out.grad_ys,
            )
            cotangent = (
                ts_cotangent if cotangent is None else tree_add(cotangent, ts_cotangent)
            )
            ts_time_cotangent = out.grad_ts[start : start + out.num_ts].sum()
            t0_bar = t0_bar + jnp.where(no_steps, ts_time_cotangent, 0)
        if cotangent is None:
            continue
        t_bar, y0_bar_i, args_bar_i, fn_bar = _pull_back_save(
            out.sub.fn, t0, y0, args, cotangent
        )
        y_bar = tree_add(y_bar, y0_bar_i)
        args_bar = tree_add(args_bar, args_bar_i)
        save_bars[i] = _add_fn_bar(save_bars[i], fn_bar)
        t0_bar = t0_bar + t_bar
    return dataclasses.replace(
        carry,
        state_bar=(y_bar, z_bar),
        args_bar=args_bar,
        save_bars=tuple(save_bars),
        times=dataclasses.replace(carry.times, t0=t0_bar),
    )


def _initial_carry(bwd: _Backward) -> _BackwardCarry:
    y0, z0, args, terms, _, (t0, _, _), _, step_ts = bwd.inputs
    residuals = bwd.residuals
    zero_time = jnp.zeros((), jnp.result_type(t0))
    y_bar, z_bar, args_bar, terms_bar = _zeros_like_diff((y0, z0, args, terms))
    if bwd.grad_z_final is not None:
        z_bar = tree_add(z_bar, eqx.filter(bwd.grad_z_final, eqx.is_inexact_array))
    return _BackwardCarry(
        k=residuals.num_steps - 1,
        state=(residuals.y_final, residuals.z_final),
        state_bar=(y_bar, z_bar),
        args_bar=args_bar,
        terms_bar=terms_bar,
        pointers=tuple(
            residuals.ts_saved[i] if out.num_ts else jnp.zeros((), jnp.int32)
            for i, out in enumerate(bwd.outputs)
        ),
        save_bars=tuple(
            _SaveCotangents(
                fn=_zeros_like_diff(out.sub.fn),
                ts=None if out.sub.ts is None else jnp.zeros_like(out.sub.ts),
            )
            for out in bwd.outputs
        ),
        times=_TimeCotangents(
            t0=zero_time,
            t1=zero_time,
            dt0=zero_time,
            end=zero_time,
            step_ts=None if step_ts is None else jnp.zeros_like(step_ts),
        ),
        max_error=jnp.zeros((), error_dtype()),
        checkpoint_pointer=first_pointer(bwd.record.checkpoints),
    )


def _input_cotangents(bwd: _Backward, carry: _BackwardCarry, event_bar):
    """The cotangents of the custom VJP's inputs, from the final carry."""
    _, _, _, _, saveat, (t0, t1, dt0), _, _ = bwd.inputs
    times = carry.times
    times_bar = (
        times.t0,
        times.t1,
        None if dt0 is None else times.dt0.astype(dt0.dtype),
    )
    times_bar = jtu.tree_map(
        lambda bar, t: bar if eqx.is_inexact_array(t) else None,
        times_bar,
        (t0, t1, dt0),
        is_leaf=is_none,
    )
    y_bar, z_bar = carry.state_bar
    return (
        y_bar,
        z_bar,
        carry.args_bar,
        carry.terms_bar,
        _saveat_cotangent(saveat, carry.save_bars),
        times_bar,
        event_bar,
        times.step_ts,
    )


@_loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals: _Residuals,
    grad_final_state__aux_stats,
    perturbed,
    diff_inputs,
    *,
    self,
    solver,
    stepsize_controller,
    max_steps,
    **kwargs,
):
    del kwargs
    grad_final_state, _ = grad_final_state__aux_stats
    y0, z0, _, _, saveat, _, event, _ = diff_inputs
    outputs, grad_z_final, grad_dense_infos, grad_dense_ts = _output_cotangents(
        grad_final_state, saveat, residuals
    )
    bwd = _Backward(
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        adjoint=self,
        residuals=residuals,
        inputs=diff_inputs,
        outputs=outputs,
        grad_z_final=grad_z_final,
        grad_dense_infos=grad_dense_infos,
        grad_dense_ts=grad_dense_ts,
        with_step_times=_times_perturbed(perturbed),
    )
    carry, event_cotangents = _pull_back_at_t1(bwd, _initial_carry(bwd))
    if event_cotangents:
        event_bars = _pull_back_event(bwd, event_cotangents)
        carry = _add_event_cotangents(bwd, carry, event_bars)
        event_bar = event_bars.event_bar
    else:
        event_bars = None
        event_bar = _zeros_like_diff(event)
    carry = lax.while_loop(
        lambda carry: carry.k >= 0,
        lambda carry: _backward_step(bwd, carry, event_bars),
        carry,
    )
    # The start is known exactly: the reconstruction's last word on its own accuracy.
    max_error = jnp.maximum(
        carry.max_error,
        relative_error(
            _reconstructed(solver, *carry.state),
            _reconstructed(solver, y0, z0),
            also_scale=residuals.y_final,
        ),
    )
    # The start of the first step is `t0`.
    times = carry.times
    t0_bar = times.t0 + times.end
    if grad_dense_ts is not None:
        t0_bar = t0_bar + grad_dense_ts[0]
    carry = dataclasses.replace(carry, times=dataclasses.replace(times, t0=t0_bar))
    carry = _pull_back_at_t0(bwd, carry)
    grads = _input_cotangents(bwd, carry, event_bar)
    return _report_reconstruction_error(
        self, max_error, grads, y0, (residuals.y_final, residuals.z_final)
    )


def _reconstructed(solver, y, solver_state):
    """The part of the state that the backward pass reconstructs: `(y, z)` for
    `Reversible`, whose solver state also carries diagnostics."""
    if type(solver) is Reversible:
        return y, solver_state.z
    return y, solver_state


def default_reconstruction_tol(dtype) -> float:
    """`ReversibleAdjoint`'s default `reconstruction_tol` for states of `dtype`: at most
    three quarters of the digits lost (float64: 1.2e-4; float32: 1.9e-2). The gradients
    are typically an order of magnitude more accurate than the reconstruction."""
    return float(jnp.finfo(dtype).eps) ** 0.25


def _least_precise_dtype(tree):
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not leaves:
        return error_dtype()
    return max((leaf.dtype for leaf in leaves), key=lambda d: jnp.finfo(d).eps)


# `eqx.error_if` takes static messages: one per order of magnitude of the error.
_ERROR_EXPONENTS = tuple(range(-12, 31))


def _reconstruction_messages(tol) -> list[str]:
    def message(exponent):
        if exponent == _ERROR_EXPONENTS[-1]:
            measured = f"at least 1e{exponent} (or not finite)"
        else:
            measured = f"about 1e{exponent}"
        return (
            "`ReversibleAdjoint`: the backward pass reconstructed the forward solve with "
            f"a relative error of {measured}, above `reconstruction_tol={tol:.3g}`, so "
            "the gradients are not to be trusted. Undoing a solve amplifies round-off "
            "by the decay of the dynamics (and by the coupling, `λ^{-N}` over `N` "
            "steps). Consider `ReversibleAdjoint(checkpoint_every=...)` (e.g. 100, or "
            '`"auto"`), float64 instead of float32, or smaller steps on stiff or '
            "strongly decaying problems; `reconstruction_tol=None` turns the check off."
        )

    return [message(exponent) for exponent in _ERROR_EXPONENTS]


def _all_finite(tree) -> Array:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _report_reconstruction_error(adjoint, error, grads, y_like, final_state):
    if adjoint.reconstruction_callback is not None:
        jax.debug.callback(adjoint.reconstruction_callback, error)
    tol = adjoint.reconstruction_tol
    check = True
    if tol == "auto":
        tol = default_reconstruction_tol(_least_precise_dtype(y_like))
        # A forward solve that went NaN (as Diffrax's adjoints, NaN gradients follow)
        # is not a failure of the reconstruction.
        check = _all_finite(final_state)
    if tol is not None:
        exponent = jnp.round(jnp.log10(jnp.where(jnp.isfinite(error), error, jnp.inf)))
        index = jnp.clip(exponent, _ERROR_EXPONENTS[0], _ERROR_EXPONENTS[-1])
        index = jnp.nan_to_num(index, nan=_ERROR_EXPONENTS[-1]).astype(jnp.int32)
        # `<=` rather than `>`: NaN (a reconstruction that blew up) fails too.
        grads = eqx.branched_error_if(
            grads,
            jnp.invert(error <= tol) & check,
            index - _ERROR_EXPONENTS[0],
            _reconstruction_messages(tol),
        )
    return grads


def _saveat_cotangent(saveat, save_bars):
    leaves, treedef = jtu.tree_flatten(saveat.subs, is_leaf=_is_subsaveat)
    subs_bar = [
        eqx.tree_at(
            lambda s: (s.ts, s.fn),
            eqx.filter(sub, eqx.is_inexact_array),
            (bar.ts, bar.fn),
            is_leaf=is_none,
        )
        for sub, bar in zip(leaves, save_bars)
    ]
    saveat_bar = eqx.filter(saveat, eqx.is_inexact_array)
    return eqx.tree_at(
        lambda s: s.subs,
        saveat_bar,
        jtu.tree_unflatten(treedef, subs_bar),
        is_leaf=is_none,
    )


def _raise_if_unstable(final_state):
    # `Reversible` reports an unstable coupled scheme as one of Diffrax's results, which
    # carries Diffrax's message; with `throw=True`, say what it means here instead.
    unstable = solve_result(final_state) == diffrax.RESULTS.nonlinear_divergence
    return eqx.error_if(final_state, unstable, UNSTABLE_COUPLING_MESSAGE)


def _only_outputs_differentiable(final_state, saveat):
    """Diffrax's convention for adjoints: gradients flow through what the solution
    exposes (`ys`; the dense output and the final solver state when saved), and
    anything else raises."""

    def outputs(state):
        return solution_outputs(state, saveat)

    values = outputs(final_state)
    final_state = eqxi.nondifferentiable_backward(final_state, symbolic=False)
    return eqx.tree_at(outputs, final_state, values, is_leaf=is_none)


def _is_positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


class ReversibleAdjoint(diffrax.AbstractAdjoint):
    """Backpropagates through [`diffrax.diffeqsolve`][] by reconstructing the forward
    solve backwards in time, using an algebraically reversible solver:
    [`diffrax_reversible.Reversible`][] around any explicit solver, or one of
    Diffrax's own `ReversibleHeun`, `LeapfrogMidpoint` and `SemiImplicitEuler`.

    The forward pass is Diffrax's own loop, which additionally records the times of
    the accepted steps. The backward pass walks the steps in reverse, recovers each
    state from the next one with the solver's closed-form inverse, and takes the
    vector-Jacobian product of that one step.

    The gradients are those of the discrete solve, exactly as
    [`diffrax.RecursiveCheckpointAdjoint`][] computes them (up to floating-point
    round-off), at a memory cost that does not grow with the number of steps apart from
    one scalar (two across jumps) per step of `max_steps` for the recorded step times.
    Backpropagation costs `O(n)` time in the number of steps `n`.

    Gradients flow to `y0`, `args`, the `terms` (for example the parameters of an
    `eqx.nn.MLP` vector field), the parameters of `SaveAt(fn=...)` and of an event's
    `cond_fn`, and the `SaveAt(ts=...)` times; through `sol.ys`, `sol.ts`, the dense
    output (`sol.evaluate`, `sol.derivative`) and a saved `sol.solver_state`. Every
    `SaveAt` option works, with every step size controller. Terminating events work,
    with gradients through the event time (implicit function theorem on the root
    find, as Diffrax does). `jax.jit`, `jax.vmap` (batch elements may take different
    numbers of steps), `jax.jacrev` and `jax.hessian` (forward over this reverse pass)
    work; pytree states, float32 and float64.

    Gradients with respect to `t0`, `t1` and `dt0` need step times that are known
    functions of them: `ConstantStepSize` or `StepTo`. With an adaptive controller
    they raise a `ValueError` (the `SaveAt(ts=...)` gradients still work).

    Also a `ValueError`: a solver that is not algebraically reversible,
    `max_steps=None`, `UnsafeBrownianPath`, `ReversibleHeun` with
    `ClipStepSizeController(jump_ts=...)`, and an event with a `root_finder` together
    with `SaveAt(steps=...)` or `SaveAt(dense=True)`, `checkpoint_every="auto"` with a
    solver other than `Reversible`. Differentiating with respect to
    the step size controller (e.g. `StepTo(ts=...)`) raises an error too.

    A vector field, `SaveAt(fn=...)` or event `cond_fn` that closes over values being
    differentiated (for example `ODETerm(lambda t, y, args: model(y))`) is supported
    for `ODETerm`, `ControlTerm`, `fn` and `cond_fn`: the closure is converted into a
    pytree first. Other custom terms should hold such values as fields, or receive
    them through `args`.

    !!! info

        Reverse-mode only: `jax.jvp` and `jax.jacfwd` through it raise JAX's
        `TypeError`. For forward mode, use [`diffrax.ForwardMode`][] with the same
        solver.

    !!! tip "Trusting the gradients"

        Undoing a solve amplifies round-off: by `λ^{-N}` over `N` steps, and by the
        dynamics where modes decay at different rates (stiff problems) or contract and
        expand in turn. The backward pass ends at the known initial state, so it
        measures its own reconstruction error for free, and by default raises an error
        (like Diffrax's `throw=True`) when it is above a dtype-aware tolerance: see
        `reconstruction_tol`. `checkpoint_every=k` bounds the drift to `k` steps;
        `checkpoint_every="auto"` places checkpoints where they are needed. With
        `throw=True`, an unstable coupled scheme in the forward pass (see
        [`diffrax_reversible.Reversible`][]) raises an error that says so.
    """

    checkpoint_every: CheckpointEvery = eqx.field(default=None, static=True)
    max_checkpoints: int = eqx.field(default=100, static=True)
    reconstruction_tol: float | None | Literal["auto"] = eqx.field(
        default="auto", static=True
    )
    reconstruction_callback: Callable[[Array], Any] | None = eqx.field(
        default=None, static=True
    )

    def __check_init__(self):
        every = self.checkpoint_every
        if every not in (None, "auto") and not _is_positive_int(every):
            raise ValueError(
                "`ReversibleAdjoint(checkpoint_every=...)` must be a positive integer, "
                f'`"auto"` or `None`, got {every!r}.'
            )
        if not _is_positive_int(self.max_checkpoints):
            raise ValueError(
                "`ReversibleAdjoint(max_checkpoints=...)` must be a positive integer, "
                f"got {self.max_checkpoints!r}."
            )
        tol = self.reconstruction_tol
        if isinstance(tol, str):
            valid = tol == "auto"
        else:
            valid = tol is None or tol > 0
        if not valid:
            raise ValueError(
                "`ReversibleAdjoint(reconstruction_tol=...)` must be positive, "
                f'`"auto"` or `None`, got {tol!r}.'
            )

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
        _check_supported(
            solver=solver,
            terms=terms,
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            event=event,
            max_steps=max_steps,
            checkpoint_every=self.checkpoint_every,
        )
        y0, z0 = current_state(init_state)
        # Before `init_state` loses its solver state to the backward pass's own.
        terms = _closure_convert_vector_fields(terms, solver, init_state, args)
        if passed_controller_state:
            controller_fn = ft.partial(
                eqxi.nondifferentiable,
                name="When using `adjoint=ReversibleAdjoint()`, `controller_state`",
            )
        else:
            controller_fn = lax.stop_gradient
        # The forward values only: gradients with respect to times and through the
        # event's initial values come from the custom VJP's inputs.
        init_state = with_forward_values_only(init_state, controller_fn)
        saveat = _closure_convert_saveat_fns(saveat, t0, y0, args)
        event = _closure_convert_event(
            event,
            (t0, y0, args),
            _cond_fn_kwargs(
                terms, solver, t0, t1, dt0, saveat, stepsize_controller, max_steps
            ),
        )
        stepsize_controller, step_ts = _split_step_ts(stepsize_controller)
        final_state, aux_stats = _loop_reversible(
            (y0, z0, args, terms, saveat, (t0, t1, dt0), event, step_ts),
            self=self,
            solver=solver,
            stepsize_controller=_refuse_gradients(
                stepsize_controller, _CONTROLLER_NONDIFFERENTIABLE
            ),
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
        )
        if throw and type(solver) is Reversible:
            final_state = _raise_if_unstable(final_state)
        return _only_outputs_differentiable(final_state, saveat), aux_stats


ReversibleAdjoint.__init__.__doc__ = """**Arguments:**

- `checkpoint_every`: if an integer `k`, the forward pass also stores the state `(y, z)`
    at the start of every `k`-th accepted step, and the backward pass restarts its
    reconstruction from those: the reconstruction's drift is bounded by `k` steps, at a
    memory cost of `max_steps // k + 1` states. If `"auto"` (with
    [`diffrax_reversible.Reversible`][] only), a state is stored wherever the round-off
    amplification accumulated since the last one (estimated per step from the coupling
    and the local decay of the dynamics, `1/λ · e^{|a h|}`) would cost half the digits
    of the state's dtype: memory for `max_checkpoints` states, of which as many are
    used as the dynamics destroy information. `None` (the default) stores none: memory
    independent of the number of steps.
- `max_checkpoints`: the size of the buffer for `checkpoint_every="auto"`. When more
    checkpoints are needed the solve raises an error naming it. Defaults to 100.
- `reconstruction_tol`: the backward pass raises an error (an `EquinoxRuntimeError`, as
    Diffrax's `throw=True`) when the relative error of the reconstructed states exceeds
    it (or is not finite), with the measured order of magnitude and the fixes. The error
    is measured where the true state is known: the initial state, and every checkpoint.
    `"auto"` (the default): `eps^{1/4}` for the state's dtype (float64: 1.2e-4,
    float32: 1.9e-2); not checked when the forward solve itself went non-finite (the
    gradients are then NaN, as with Diffrax's adjoints). A number: that tolerance.
    `None`: no check.
- `reconstruction_callback`: if a function, it is called (through
    `jax.debug.callback`) with that relative error, a scalar array, once per backward
    pass (once per batch element under `jax.vmap`).
"""
