"""`ReversibleAdjoint`: Diffrax's own loop forward, recording the accepted steps, inside
a custom VJP whose backward rule (`_backward.py`) reconstructs the solve backwards."""

import functools as ft
from collections.abc import Callable
from typing import Any, Literal

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from ._backward import run_backward
from ._checkpoints import check_overflow, CheckpointEvery
from ._checks import (
    check_supported,
    check_time_gradients,
    CONTROLLER_NONDIFFERENTIABLE,
    refuse_gradients,
)
from ._closures import (
    closure_convert_event,
    closure_convert_saveat_fns,
    closure_convert_vector_fields,
)
from ._coupling import UNSTABLE_COUPLING_MESSAGE
from ._diagnostics import report_reconstruction_error
from ._diffrax_internals import (
    current_state,
    run_loop,
    solution_outputs,
    solve_result,
    with_current_state,
    with_forward_values_only,
)
from ._event import cond_fn_kwargs
from ._misc import is_none
from ._outputs import is_subsaveat, output_pull_backs
from ._pull_back import Backward, SolveInputs
from ._solver import Reversible
from ._step_record import (
    recording_while_loop,
    Residuals,
    residuals_of,
    step_ends_are_known,
    steps_are_contiguous,
)


def _split_step_ts(controller):
    """`StepTo.ts` as an input of its own, to be differentiated like `t0` and `t1`
    (every step time is one of them), and the controller without its gradient."""
    if type(controller) is not diffrax.StepTo:
        return controller, None
    step_ts = controller.ts
    return eqx.tree_at(lambda c: c.ts, controller, lax.stop_gradient(step_ts)), step_ts


def _forward_loop(
    inputs: SolveInputs, *, self, init_state, outer_while_loop=None, **kwargs
):
    # Not differentiated (the custom VJP supplies the gradient), so plain loops.
    return run_loop(
        self,
        args=inputs.args,
        terms=inputs.terms,
        saveat=inputs.saveat,
        t0=inputs.t0,
        t1=inputs.t1,
        dt0=inputs.dt0,
        event=inputs.event,
        init_state=with_current_state(init_state, inputs.y0, inputs.z0),
        outer_while_loop=outer_while_loop,
        **kwargs,
    )


@eqx.filter_custom_vjp
def _loop_reversible(inputs: SolveInputs, **kwargs):
    final_state, aux_stats = _forward_loop(inputs, **kwargs)
    return _batched_like(final_state, (inputs, final_state)), aux_stats


def _times_perturbed(perturbed: SolveInputs) -> bool:
    return any(
        jtu.tree_leaves((perturbed.t0, perturbed.t1, perturbed.dt0, perturbed.step_ts))
    )


@_loop_reversible.def_fwd
def _loop_reversible_fwd(
    perturbed: SolveInputs, inputs: SolveInputs, *, self, stepsize_controller, **kwargs
):
    if _times_perturbed(perturbed):
        check_time_gradients(stepsize_controller)
    records = []
    record_starts = not steps_are_contiguous(stepsize_controller)
    record_ends = not step_ends_are_known(
        stepsize_controller, inputs.event, inputs.terms
    )
    final_state, aux_stats = _forward_loop(
        inputs,
        self=self,
        stepsize_controller=stepsize_controller,
        outer_while_loop=recording_while_loop(
            record_starts,
            record_ends,
            self.checkpoint_every,
            self.max_checkpoints,
            records,
        ),
        **kwargs,
    )
    [record] = records
    final_state = check_overflow(record.checkpoints, final_state)
    residuals = residuals_of(
        record,
        final_state,
        stepsize_controller,
        inputs.event,
        jtu.tree_leaves(inputs.saveat.subs, is_leaf=is_subsaveat),
    )
    final_state = _batched_like(final_state, (inputs, final_state))
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
        if _is_numeric_array(x) and x.size > 0
    ]
    if not firsts:
        return tree
    tag = jnp.stack(firsts).sum() > 0
    return jtu.tree_map(
        lambda x: jnp.where(tag, x, x) if _is_numeric_array(x) else x, tree
    )


def _is_numeric_array(x) -> bool:
    # Not a typed PRNG key (`jax.random.key`, as a `VirtualBrownianTree` holds).
    if not eqx.is_array(x):
        return False
    return not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@_loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals: Residuals,
    grad_final_state__aux_stats,
    perturbed: SolveInputs,
    inputs: SolveInputs,
    *,
    self,
    solver,
    stepsize_controller,
    max_steps,
    **kwargs,
):
    del kwargs
    grad_final_state, _ = grad_final_state__aux_stats
    bwd = Backward(
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        adjoint=self,
        residuals=residuals,
        inputs=inputs,
        outputs=output_pull_backs(grad_final_state, inputs.saveat, residuals),
        with_step_times=_times_perturbed(perturbed),
    )
    grads, max_error = run_backward(bwd)
    return report_reconstruction_error(
        self, max_error, grads, inputs.y0, (residuals.y_final, residuals.z_final)
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
    the accepted steps (except where the backward pass can compute them: `StepTo`, and
    `ConstantStepSize` without an event, on ODEs and CDEs). The backward pass walks
    the steps in reverse, recovers each state from the next one with the solver's
    closed-form inverse, and takes the vector-Jacobian product of that one step.

    The gradients are those of the discrete solve, exactly as
    [`diffrax.RecursiveCheckpointAdjoint`][] computes them (up to floating-point
    round-off), at a memory cost that does not grow with the number of steps apart from
    one scalar (two across jumps) per step of `max_steps` for the recorded step times,
    where they are recorded.
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
        check_supported(
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
        terms = closure_convert_vector_fields(terms, solver, init_state, args)
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
        saveat = closure_convert_saveat_fns(saveat, t0, y0, args)
        event = closure_convert_event(
            event,
            (t0, y0, args),
            cond_fn_kwargs(
                terms, solver, t0, t1, dt0, saveat, stepsize_controller, max_steps
            ),
        )
        stepsize_controller, step_ts = _split_step_ts(stepsize_controller)
        inputs = SolveInputs(
            y0=y0,
            z0=z0,
            args=args,
            terms=terms,
            saveat=saveat,
            t0=t0,
            t1=t1,
            dt0=dt0,
            event=event,
            step_ts=step_ts,
        )
        final_state, aux_stats = _loop_reversible(
            inputs,
            self=self,
            solver=solver,
            stepsize_controller=refuse_gradients(
                stepsize_controller, CONTROLLER_NONDIFFERENTIABLE
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
