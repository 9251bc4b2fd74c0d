"""The public interface for algebraically reversible solvers: a solver whose step can be
undone in closed form, so that [`diffrax_reversible.ReversibleAdjoint`][] can rebuild
each state from the next one instead of storing it."""

import abc
from typing import TypeVar

import diffrax
from jaxtyping import PyTree

from ._custom_types import Args, RealScalarLike, Y


_SolverState = TypeVar("_SolverState")


class AbstractReversibleSolver(diffrax.AbstractSolver[_SolverState]):
    """Abstract base class for algebraically reversible solvers: the state at the start
    of a step can be recovered in closed form from the state at its end, by
    [`diffrax_reversible.AbstractReversibleSolver.backward_step`][].

    Subclass it, implement Diffrax's `init`, `step`, `func` (and `order`, …) as for any
    [`diffrax.AbstractSolver`][], and `backward_step`; then `diffeqsolve(...,
    solver=MySolver(), adjoint=diffrax_reversible.ReversibleAdjoint())` gives
    exact gradients in memory independent of the number of steps. The backward
    pass calls `backward_step` to rebuild the state at the start of each step, and
    differentiates `step` from there (with `made_jump=False`: jumps,
    `ClipStepSizeController(jump_ts=...)`, are refused): `backward_step` itself is
    never differentiated, and should invert `step` to floating-point round-off.

    !!! Example

        Velocity Verlet for `q' = p`, `p' = f(q)`, with
        `terms = (ODETerm(lambda t, p, args: p), ODETerm(lambda t, q, args: f(q)))` and
        `y = (q, p)`:

        ```python
        class VelocityVerlet(diffrax_reversible.AbstractReversibleSolver):
            term_structure = (diffrax.AbstractTerm, diffrax.AbstractTerm)
            interpolation_cls = diffrax.LocalLinearInterpolation

            def init(self, terms, t0, t1, y0, args):
                return None

            def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
                (q_term, p_term), (q0, p0) = terms, y0
                tm = t0 + (t1 - t0) / 2
                p_half = p0 + p_term.vf_prod(t0, q0, args, p_term.contr(t0, tm))
                q1 = q0 + q_term.vf_prod(tm, p_half, args, q_term.contr(t0, t1))
                p1 = p_half + p_term.vf_prod(t1, q1, args, p_term.contr(tm, t1))
                dense_info = dict(y0=y0, y1=(q1, p1))
                return (q1, p1), None, dense_info, None, diffrax.RESULTS.successful

            def backward_step(self, terms, t0, t1, y1, args, solver_state, t_before):
                (q_term, p_term), (q1, p1) = terms, y1
                tm = t0 + (t1 - t0) / 2
                p_half = p1 - p_term.vf_prod(t1, q1, args, p_term.contr(tm, t1))
                q0 = q1 - q_term.vf_prod(tm, p_half, args, q_term.contr(t0, t1))
                p0 = p_half - p_term.vf_prod(t0, q0, args, p_term.contr(t0, tm))
                return (q0, p0), None

            def func(self, terms, t0, y0, args):
                (q_term, p_term), (q0, p0) = terms, y0
                return q_term.vf(t0, p0, args), p_term.vf(t0, q0, args)
        ```

    [`diffrax_reversible.Reversible`][] (which makes any explicit solver reversible)
    and Diffrax's own `ReversibleHeun`, `LeapfrogMidpoint` and `SemiImplicitEuler` are
    supported by [`diffrax_reversible.ReversibleAdjoint`][] too.
    """

    @abc.abstractmethod
    def backward_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        t_before: RealScalarLike,
    ) -> tuple[Y, _SolverState]:
        """Undoes one step of `step`.

        **Arguments:**

        - `terms`, `args`: as passed to `step`.
        - `t0`, `t1`: the interval of the step to undo.
        - `y1`, `solver_state`: the solution and the solver state at `t1`, as returned
            by `step` over `[t0, t1]`.
        - `t_before`: where the step before this one started (`t0` for the first step),
            for multistep solvers whose state holds an earlier time; most solvers
            ignore it.

        **Returns:**

        The pair `(y0, solver_state0)` that `step` was called with, up to
        floating-point round-off.
        """
