"""The backward step of a solver with a closed-form inverse: an
[`diffrax_reversible.AbstractReversibleSolver`][], or one of Diffrax's own reversible
solvers (whose inverses are here, so that [`diffrax_reversible.ReversibleAdjoint`][]
can use them without a wrapper)."""

from collections.abc import Callable

import diffrax
import equinox as eqx
from equinox.internal import ω
from jaxtyping import PyTree

from ._custom_types import Args, DenseInfo, RealScalarLike, Y
from ._reversible_solver import AbstractReversibleSolver


def _invert_reversible_heun(terms, t0, t1, y1, args, state1, t_before):
    del t_before
    # Forward: yhat1 = 2 y0 - yhat0 + f0 dt; y1 = y0 + (f0 + f1) dt / 2; f1 = f(yhat1).
    yhat1, vf1 = state1
    control = terms.contr(t0, t1)
    yhat0 = (2 * y1**ω - yhat1**ω - terms.prod(vf1, control) ** ω).ω
    vf0 = terms.vf(t0, yhat0, args)
    y0 = (y1**ω - 0.5 * terms.prod((vf0**ω + vf1**ω).ω, control) ** ω).ω
    return y0, (yhat0, vf0)


def _invert_leapfrog_midpoint(terms, t0, t1, y1, args, state1, t_before):
    # Forward: y1 = y_{-1} + f(t0, y0) (t1 - t_{-1}); the state after the step is
    # (t0, y0), and `t_before` = t_{-1} is where the previous step started.
    _, y0 = state1
    control = terms.contr(t_before, t1)
    ym1 = (y1**ω - terms.vf_prod(t0, y0, args, control) ** ω).ω
    return y0, (t_before, ym1)


def _invert_semi_implicit_euler(terms, t0, t1, y1, args, state1, t_before):
    del t_before, state1
    term_1, term_2 = terms
    y1_1, y1_2 = y1
    y0_2 = (y1_2**ω - term_2.vf_prod(t0, y1_1, args, term_2.contr(t0, t1)) ** ω).ω
    y0_1 = (y1_1**ω - term_1.vf_prod(t0, y0_2, args, term_1.contr(t0, t1)) ** ω).ω
    return (y0_1, y0_2), None


_INVERSES = {
    diffrax.ReversibleHeun: _invert_reversible_heun,
    diffrax.LeapfrogMidpoint: _invert_leapfrog_midpoint,
    diffrax.SemiImplicitEuler: _invert_semi_implicit_euler,
}
NATIVE_REVERSIBLE_SOLVERS = tuple(_INVERSES)


def is_invertible(solver: diffrax.AbstractSolver) -> bool:
    """Whether `solver`'s steps can be undone by `undo_step_by_inverse`."""
    return (
        isinstance(solver, AbstractReversibleSolver)
        or type(solver) in NATIVE_REVERSIBLE_SOLVERS
    )


def _backward_step(solver, terms, t0, t1, y1, args, state1, t_before):
    if isinstance(solver, AbstractReversibleSolver):
        return solver.backward_step(terms, t0, t1, y1, args, state1, t_before)
    return _INVERSES[type(solver)](terms, t0, t1, y1, args, state1, t_before)


def undo_step_by_inverse(
    solver: diffrax.AbstractSolver,
    terms: PyTree[diffrax.AbstractTerm],
    t0: RealScalarLike,
    t1: RealScalarLike,
    y1: Y,
    state1: PyTree,
    args: Args,
    y1_bar: Y,
    state1_bar: PyTree,
    dense: bool,
    time_cotangents: bool = False,
    *,
    t_before: RealScalarLike,
) -> tuple[tuple[Y, PyTree], DenseInfo | None, Callable[[DenseInfo | None], tuple]]:
    """As [`diffrax_reversible.Reversible.undo_step`][], for a solver of
    `is_invertible`: undo the step by its closed-form inverse, and linearise the
    solver's own `step` at the recovered start.

    `t_before` is where the previous step started (where this one starts, for the
    first step).
    """
    y0, state0 = _backward_step(solver, terms, t0, t1, y1, args, state1, t_before)
    times = (t0, t1) if time_cotangents else None

    def step(y0, state0, args, terms, times):
        ta, tb = (t0, t1) if times is None else times
        y1, _, dense_info, state1, _ = solver.step(
            terms, ta, tb, y0, args, state0, made_jump=False
        )
        return y1, state1, dense_info if dense else None

    (_, _, dense_info), pull_back_step = eqx.filter_vjp(
        step, y0, state0, args, terms, times
    )

    def pull_back(dense_info_bar):
        return pull_back_step((y1_bar, state1_bar, dense_info_bar))

    return (y0, state0), dense_info, pull_back
