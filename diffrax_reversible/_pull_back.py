"""What every part of the backward pass shares: the inputs of the solve, the context
the parts read (`Backward`), the carry they update (`BackwardCarry`), and the interface
of the output pull-backs (`AbstractOutputPullBack`).

The backward pass visits the points of the solve in reverse: `t1`, then for each step
(last first) its end, its inside (outputs interpolated from its `dense_info`), and
finally `t0`. Each kind of output (a `SubSaveAt`, the dense output, the saved solver
state, a terminating event) is one module with one hook per point, which pulls the
cotangents of the outputs it saved there back into the carry.
"""

import abc
import dataclasses
from typing import Any, TYPE_CHECKING

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._diffrax_internals import known_step_end
from ._misc import finds_event_root, tree_add
from ._time_cotangents import TimeCotangents


if TYPE_CHECKING:
    from ._adjoint import ReversibleAdjoint
    from ._step_record import Residuals, StepRecord


class SolveInputs(eqx.Module):
    """The inputs of the solve that get gradients: the custom VJP's first argument,
    and (as cotangents) what its backward rule returns."""

    y0: PyTree[Array]
    # The initial solver state, where the reversible solver's second state lives.
    z0: PyTree
    args: PyTree
    terms: PyTree[diffrax.AbstractTerm]
    saveat: diffrax.SaveAt
    t0: Any
    t1: Any
    dt0: Any
    event: diffrax.Event | None
    # `StepTo.ts`, split off the controller to be differentiated like the times.
    step_ts: Array | None


class Interval(eqx.Module):
    """Where step `k` lies: its start and end, and the end of step `k - 1` (`-inf`
    for the first step)."""

    t0: Array
    t1: Array
    prev_end: Array


class StepCotangents(eqx.Module):
    """The cotangents of what the outputs inside one step depend on: the step's
    `dense_info`, its start and end times, and `args`. `None`: no cotangent."""

    dense_info: PyTree[Array] | None
    times: tuple[Array, Array] | None
    args: PyTree[Array] | None

    def __add__(self, other: "StepCotangents") -> "StepCotangents":
        def add(a, b):
            if b is None:
                return a
            return b if a is None else tree_add(a, b)

        return StepCotangents(
            dense_info=add(self.dense_info, other.dense_info),
            times=add(self.times, other.times),
            args=add(self.args, other.args),
        )


class BackwardCarry(eqx.Module):
    """The backward loop's state at the end of step `k`."""

    k: Array
    # `(y, solver_state)` and their cotangents.
    state: tuple[PyTree[Array], PyTree]
    state_bar: tuple[PyTree[Array], PyTree]
    args_bar: PyTree[Array]
    terms_bar: PyTree[Array]
    # One entry per output pull-back (`None` for those that carry nothing).
    outputs: tuple[PyTree, ...]
    times: TimeCotangents
    max_error: Array
    checkpoint_pointer: Array

    def add(self, *, y_bar=None, args_bar=None, terms_bar=None) -> "BackwardCarry":
        """Adds cotangents of the current `y`, of `args` and of `terms`."""
        y_bar_all, z_bar = self.state_bar
        if y_bar is not None:
            y_bar_all = tree_add(y_bar_all, y_bar)
        if args_bar is not None:
            args_bar = tree_add(self.args_bar, args_bar)
        if terms_bar is not None:
            terms_bar = tree_add(self.terms_bar, terms_bar)
        return dataclasses.replace(
            self,
            state_bar=(y_bar_all, z_bar),
            args_bar=self.args_bar if args_bar is None else args_bar,
            terms_bar=self.terms_bar if terms_bar is None else terms_bar,
        )

    def with_output(self, index: int, value: PyTree) -> "BackwardCarry":
        outputs = list(self.outputs)
        outputs[index] = value
        return dataclasses.replace(self, outputs=tuple(outputs))

    def with_times(self, **times) -> "BackwardCarry":
        return dataclasses.replace(self, times=dataclasses.replace(self.times, **times))


class Backward(eqx.Module):
    """What every part of the backward pass reads: the inputs of the solve, its
    record, and the pull-backs of its outputs."""

    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    max_steps: int
    adjoint: "ReversibleAdjoint"
    residuals: "Residuals"
    inputs: SolveInputs
    outputs: tuple["AbstractOutputPullBack", ...]
    with_step_times: bool = eqx.field(static=True)

    @property
    def record(self) -> "StepRecord":
        return self.residuals.record

    @property
    def uses_dense_info(self) -> bool:
        return any(out.uses_dense_info for out in self.outputs)

    def stopped_at_event_root(self) -> Array | bool:
        """Whether a root finder placed the end of the solve at an event's time, where
        the outputs at `t1` were then saved."""
        if not finds_event_root(self.inputs.event):
            return False
        return jnp.any(jnp.stack(jtu.tree_leaves(self.residuals.event.mask)))

    def step_end(self, k):
        """The end of accepted step `k` (`k >= 0`), as the forward solve took it."""
        if self.record.ends is not None:
            return self.record.ends[k]
        inputs, residuals = self.inputs, self.residuals
        return known_step_end(
            self.stepsize_controller,
            k,
            inputs.t0,
            inputs.t1,
            inputs.dt0,
            inputs.step_ts,
            residuals.controller_num_steps,
        )

    def step_start(self, k):
        record = self.record
        if record.starts is not None:
            return record.starts[k]
        previous_end = self.step_end(jnp.maximum(k - 1, 0))
        return jnp.where(k > 0, previous_end, self.inputs.t0)

    def interval(self, k) -> Interval:
        # Under `vmap` the loop runs on for the elements that are done (`k < 0`), and
        # discards what they compute. They redo step 0: a step within `[t0, t1]`, where
        # the terms (a Brownian path) can be evaluated.
        k = jnp.maximum(k, 0)
        previous_end = self.step_end(jnp.maximum(k - 1, 0))
        return Interval(
            t0=self.step_start(k),
            t1=self.step_end(k),
            prev_end=jnp.where(k > 0, previous_end, -jnp.inf),
        )

    def interpolation(self, dense_info, step_t0, step_t1):
        return self.solver.interpolation_cls(t0=step_t0, t1=step_t1, **dense_info)


class AbstractOutputPullBack(eqx.Module):
    """One kind of output of the solve, with the cotangents of what it saved, and its
    pull-back at each point of the backward pass. `index` is its place in `Backward`'s
    `outputs` and in `BackwardCarry`'s `outputs`."""

    index: eqx.AbstractVar[int]

    @property
    @abc.abstractmethod
    def uses_dense_info(self) -> bool:
        """Whether it saved anything inside a step (from the step's `dense_info`)."""

    @abc.abstractmethod
    def init(self) -> PyTree:
        """Its entry of `BackwardCarry.outputs` before the backward pass."""

    @abc.abstractmethod
    def at_t1(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        """Pulls back the outputs at the end of the solve (before any step is
        undone)."""

    @abc.abstractmethod
    def at_step_end(
        self, bwd: Backward, carry: BackwardCarry, step: Interval
    ) -> tuple[BackwardCarry, Array | None]:
        """Pulls back the outputs saved at the end of step `carry.k`; returns the
        carry and the cotangent of the time they were saved at (`None`: none)."""

    @abc.abstractmethod
    def within_step(
        self, bwd: Backward, carry: BackwardCarry, step: Interval, dense_info
    ) -> tuple[BackwardCarry, StepCotangents]:
        """Pulls back the outputs interpolated inside step `carry.k`, to the step's
        `dense_info`, times and `args`."""

    @abc.abstractmethod
    def at_t0(self, bwd: Backward, carry: BackwardCarry) -> BackwardCarry:
        """Pulls back the outputs at the start of the solve (every step undone)."""


NO_STEP_COTANGENTS = StepCotangents(dense_info=None, times=None, args=None)


def pull_back_save(fn, t, y, args, cotangent):
    """The cotangents of `(t, y, args, fn)` for one output `fn(t, y, args)`."""
    _, pull_back = eqx.filter_vjp(lambda t, y, args, fn: fn(t, y, args), t, y, args, fn)
    return pull_back(cotangent)
