"""The combinations `ReversibleAdjoint` refuses, each with a `ValueError` at trace time
that says what to use instead."""

import diffrax
import equinox as eqx
import jax
import jax.tree_util as jtu

from ._diffrax_internals import is_unsafe_sde
from ._misc import finds_event_root
from ._native import is_invertible, NATIVE_REVERSIBLE_SOLVERS
from ._outputs import is_subsaveat
from ._reversible_solver import AbstractReversibleSolver
from ._solver import Reversible
from ._step_record import step_times_are_differentiable, steps_are_contiguous


CONTROLLER_NONDIFFERENTIABLE = (
    "`adjoint=ReversibleAdjoint()` does not support gradients with respect to the "
    "arrays of a step size controller other than `StepTo(ts=...)` (for example "
    "`ClipStepSizeController(step_ts=..., jump_ts=...)`, or `PIDController` "
    "tolerances). Consider `adjoint=diffrax.RecursiveCheckpointAdjoint()` for those."
)


def check_supported(
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
    if type(solver) is diffrax.ReversibleHeun and not steps_are_contiguous(
        stepsize_controller
    ):
        raise ValueError(
            "`solver=diffrax.ReversibleHeun()` with `adjoint=ReversibleAdjoint()` does "
            "not support `ClipStepSizeController(jump_ts=...)`: after a jump it "
            "re-evaluates its vector field from the state, which cannot be undone. "
            "Consider `solver=Reversible(diffrax.Heun())`."
        )
    if isinstance(solver, AbstractReversibleSolver) and not steps_are_contiguous(
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
    if finds_event_root(event) and (
        saveat.dense
        or any(sub.steps for sub in jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat))
    ):
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` does not support an `Event` with a "
            "`root_finder` together with `SaveAt(steps=...)` or `SaveAt(dense=True)`. "
            "Consider `SaveAt(ts=...)`, `Event(root_finder=None)`, or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


def refuse_gradients(tree, message):
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


def check_time_gradients(stepsize_controller) -> None:
    """Raised while differentiating with respect to `t0`, `t1` or `dt0`."""
    if not step_times_are_differentiable(stepsize_controller):
        raise ValueError(
            "`adjoint=ReversibleAdjoint()` supports gradients with respect to `t0`, "
            "`t1` and `dt0` with `ConstantStepSize` and `StepTo` only (their step "
            "times are closed-form functions of `t0`, `t1` and `dt0`), but got "
            f"`stepsize_controller={type(stepsize_controller).__name__}(...)`. "
            "Gradients with respect to `SaveAt(ts=...)` work with every controller. "
            "For time gradients with adaptive steps, consider "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
