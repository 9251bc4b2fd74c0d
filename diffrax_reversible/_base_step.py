"""The base solvers `Reversible` accepts, and one explicit Runge--Kutta step with its
stages unrolled."""

import diffrax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import ω
from jaxtyping import PyTree

from ._custom_types import Args, DenseInfo, RealScalarLike, Y
from ._diffrax_internals import is_sde, is_unsafe_sde
from ._native import is_invertible


def _linear_combination(base: Y, coeffs, ks: list[Y]) -> Y:
    # Tableau coefficients as Python floats: weakly typed, so they keep the state's
    # dtype; and zeros skipped at trace time, not multiplied at run time.
    out = base
    for coeff, k in zip(coeffs, ks):
        coeff = float(coeff)
        if coeff != 0.0:
            out = (out**ω + coeff * k**ω).ω
    return out


def has_explicit_tableau(solver: diffrax.AbstractSolver) -> bool:
    # `type`, not `isinstance`: wrapped solvers pass `isinstance` checks for the solver
    # they wrap, without having its tableau.
    return issubclass(type(solver), diffrax.AbstractERK) and isinstance(
        solver.tableau, diffrax.ButcherTableau
    )


def unrolled_erk_step(
    tableau: diffrax.ButcherTableau,
    terms: PyTree[diffrax.AbstractTerm],
    t0: RealScalarLike,
    t1: RealScalarLike,
    y0: Y,
    args: Args,
    control: PyTree,
) -> tuple[Y, Y, DenseInfo]:
    """One step of an explicit Runge--Kutta method, with its stages unrolled, driven
    by `control = terms.contr(t0, t1)`.

    Diffrax runs the stages in a loop, which is what it needs for implicit and
    first-same-as-last methods. Each reversible step is two fresh base steps, and the
    backward pass differentiates them one at a time: unrolled, XLA fuses the stages,
    adds no loop overhead, and drops stages whose results are unused (such as the
    first-same-as-last stage of `Φ_{-h}`). The arithmetic, error estimate and dense
    information are those of Diffrax's own step.
    """
    dt = t1 - t0
    ks = [terms.vf_prod(t0, y0, args, control)]
    for c_i, a_i in zip(tableau.c, tableau.a_lower):
        y_i = _linear_combination(y0, a_i, ks)
        ks.append(terms.vf_prod(t0 + float(c_i) * dt, y_i, args, control))
    y1 = _linear_combination(y0, tableau.b_sol, ks)
    y_error = _linear_combination(jtu.tree_map(jnp.zeros_like, y0), tableau.b_error, ks)
    k = jtu.tree_map(lambda *stages: jnp.stack(stages), *ks)
    return y1, y_error, dict(y0=y0, y1=y1, k=k)


# Explicit one-step solvers other than explicit Runge--Kutta methods. Anything not
# known to be explicit is refused: an implicit step that is not an
# `AbstractImplicitSolver` (such as the Crank--Nicolson of Diffrax's heat-equation
# example) would be accepted and then not be undone.
_EXPLICIT_NON_RK_SOLVERS = (
    diffrax.Euler,
    diffrax.EulerHeun,
    diffrax.ItoMilstein,
    diffrax.StratonovichMilstein,
)


def check_base_solver(solver: diffrax.AbstractSolver) -> None:
    name = type(solver).__name__
    if is_invertible(solver):
        raise ValueError(
            f"`Reversible({name}())` is not needed: `{name}` is algebraically "
            "reversible already, and works directly with "
            f"`adjoint=ReversibleAdjoint()`: `diffeqsolve(..., solver={name}(), "
            "adjoint=diffrax_reversible.ReversibleAdjoint())`."
        )
    if isinstance(solver, diffrax.AbstractWrappedSolver):
        raise ValueError(
            f"`Reversible({name}(...))` is not possible: wrap a plain one-step "
            "explicit solver, e.g. `Reversible(diffrax.Tsit5())`."
        )
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        raise ValueError(
            f"`Reversible({name}())` is not possible: `{name}` is an implicit solver, "
            "and `Reversible` needs an explicit one, whose step is cheap to evaluate "
            "backwards in time. Consider `Reversible(diffrax.Tsit5())`."
        )
    if isinstance(solver, diffrax.AbstractFosterLangevinSRK):
        raise ValueError(
            f"`Reversible({name}())` is not supported: the underdamped Langevin "
            "solvers take their own term structure and Lévy area, which the coupled "
            "scheme does not step backwards. For an underdamped Langevin SDE, write "
            "it as `MultiTerm(ODETerm(drift), ControlTerm(diffusion, "
            "VirtualBrownianTree(...)))` and use `Reversible(diffrax.Heun())`."
        )
    if isinstance(solver, diffrax.AbstractSRK):
        raise ValueError(
            f"`Reversible({name}())` is not supported: Diffrax<=0.7.2 computes steps "
            "of stochastic Runge--Kutta solvers with Lévy area wrongly when they are "
            "taken backwards in time (diffrax issue #598). Consider "
            "`Reversible(diffrax.Heun())` or `Reversible(diffrax.Midpoint())`."
        )
    if not (has_explicit_tableau(solver) or type(solver) in _EXPLICIT_NON_RK_SOLVERS):
        raise ValueError(
            f"`Reversible({name}(...))` is not supported: `Reversible` needs a "
            "one-step explicit solver whose step is a function of its start point "
            f"alone, and `{name}` is not known to be one (an implicit or multistep "
            "solver cannot be undone this way). Supported: explicit Runge--Kutta "
            "solvers (`Euler`, `Heun`, `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`, "
            "`Dopri5`, `Dopri8`, or any `AbstractERK` with a `ButcherTableau`), "
            "`EulerHeun`, `ItoMilstein` and `StratonovichMilstein`."
        )


def check_sde_base(solver: diffrax.AbstractSolver, terms) -> None:
    if is_unsafe_sde(terms):
        raise ValueError(
            f"`Reversible({type(solver).__name__}())` does not support "
            "`UnsafeBrownianPath`: the coupled scheme steps backwards in time over "
            "every step, and `UnsafeBrownianPath` cannot be evaluated backwards (it "
            "gives NaN). Consider `diffrax.VirtualBrownianTree` instead."
        )
    if is_sde(terms) and isinstance(solver, diffrax.AbstractItoSolver):
        name = type(solver).__name__
        raise ValueError(
            f"`Reversible({name}())` does not solve SDEs: the reversible scheme "
            "evaluates the diffusion at both ends of a step, so an Itô base solver "
            "converges to neither the Itô nor the Stratonovich solution. Use a "
            "Stratonovich base: `Reversible(diffrax.Heun())`, `Midpoint()`, "
            "`Ralston()` or `EulerHeun()`."
        )
