"""The base solvers `Reversible` accepts, and one explicit Runge--Kutta step with its
stages unrolled."""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox.internal import ω
from jaxtyping import Array, ArrayLike, PyTree

from ._custom_types import Args, DenseInfo, RealScalarLike, Y
from ._diffrax_internals import is_sde, is_unsafe_sde
from ._misc import tree_add
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


def _tableau_arrays(
    tableau: diffrax.ButcherTableau, num_stages: int, dtype, time_dtype
):
    a = np.zeros((num_stages, num_stages))
    for i, a_i in enumerate(tableau.a_lower[: num_stages - 1]):
        a[i + 1, : len(a_i)] = a_i
    c = np.array([0.0] + [float(c_i) for c_i in tableau.c])[:num_stages]
    return jnp.asarray(a, dtype), jnp.asarray(c, time_dtype)


def _weighted_sum(weights: Array, stacked: PyTree) -> PyTree:
    return jtu.tree_map(
        lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked
    )


def _num_stages_for_solution(tableau: diffrax.ButcherTableau) -> int:
    # Later stages only feed the error estimate and the dense output.
    return max(i + 1 for i, b in enumerate(tableau.b_sol) if float(b) != 0)


def looped_erk_step(
    tableau: diffrax.ButcherTableau,
    stage: Callable[[ArrayLike, Y, PyTree], Y],
    y0: Y,
    inputs: PyTree,
    solution_only: bool = False,
) -> tuple[tuple[Y, Y | None, DenseInfo | None], tuple[PyTree, PyTree]]:
    """One explicit Runge--Kutta step with its stages run in a loop, one at a time.

    `stage(c, y, inputs)` is the increment `k` of the stage at time `t0 + c (t1 - t0)`
    from its input `y`. For large states: each stage's increment is materialised in
    the loop, where unrolled stages let XLA fuse every earlier stage into each later
    one (and into the activations of the vector field), recomputing them many times;
    and one stage's temporaries are alive at a time. With `solution_only`, the stages
    that only feed the error estimate and the dense output are skipped, and those are
    `None`.

    **Returns:**

    `((y1, y_error, dense_info), (ys, ks))`, the stage inputs and increments stacked.
    """
    num_stages = len(tableau.c) + 1
    if solution_only:
        num_stages = _num_stages_for_solution(tableau)
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    a, c = _tableau_arrays(tableau, num_stages, dtype, jnp.result_type(float))

    def body(i, stacked):
        ys, ks = stacked
        # Rows of `a` are zero from the diagonal on, so unset stages do not count.
        y_i = tree_add(y0, _weighted_sum(a[i], ks))
        k_i = stage(c[i], y_i, inputs)
        set_i = lambda xs, x: xs.at[i].set(x)
        return jtu.tree_map(set_i, ys, y_i), jtu.tree_map(set_i, ks, k_i)

    k0 = eqx.filter_eval_shape(stage, 0.0, y0, inputs)
    zeros = lambda x: jnp.zeros((num_stages,) + x.shape, x.dtype)
    # Made after `y0`: else XLA creates these buffers early, alive across everything
    # scheduled before the loop.
    init = after((jtu.tree_map(zeros, y0), jtu.tree_map(zeros, k0)), y0)
    ys, ks = lax.fori_loop(0, num_stages, body, init)
    b_sol = jnp.asarray(np.asarray(tableau.b_sol, float)[:num_stages], dtype)
    y1 = tree_add(y0, _weighted_sum(b_sol, ks))
    if solution_only:
        return (y1, None, None), (ys, ks)
    y_error = _weighted_sum(jnp.asarray(np.asarray(tableau.b_error, float), dtype), ks)
    return (y1, y_error, dict(y0=y0, y1=y1, k=ks)), (ys, ks)


def erk_step_with_stage_pull_backs(
    tableau: diffrax.ButcherTableau,
    stage: Callable[[ArrayLike, Y, PyTree], Y],
    y0: Y,
    inputs: PyTree,
    solution_only: bool = False,
) -> tuple[
    tuple[Y, Y | None, DenseInfo | None],
    Callable[[Y, DenseInfo | None], tuple[Y, PyTree]],
]:
    """`looped_erk_step`, and its pull-back, one stage at a time.

    Only the stage inputs are kept; the pull-back evaluates each stage again under its
    own VJP, last stage first, in a loop, so that one stage's activations are alive at
    a time instead of all of them: one more vector field evaluation per stage, for
    memory `stages × state + one stage's activations`.

    **Returns:**

    `((y1, y_error, dense_info), pull_back)`, the first as `looped_erk_step`'s, and
    `pull_back(y1_bar, dense_info_bar)` (`dense_info_bar` may be `None`) giving
    `(y0_bar, inputs_bar)`. The error estimate is not differentiated.
    """
    outputs, (ys, _) = looped_erk_step(tableau, stage, y0, inputs, solution_only)

    def pull_back(y1_bar, dense_info_bar):
        dtype = jnp.result_type(*jtu.tree_leaves(y0))
        b_sol = np.asarray(tableau.b_sol, float)
        if dense_info_bar is None:
            num_stages = _num_stages_for_solution(tableau)
            y0_bar = y1_bar
            b_sol = jnp.asarray(b_sol[:num_stages], dtype)
            k_bars = jtu.tree_map(lambda y: _outer(b_sol, y), y1_bar)
        else:
            num_stages = len(tableau.c) + 1
            y1_bar = tree_add(y1_bar, dense_info_bar["y1"])
            y0_bar = tree_add(y1_bar, dense_info_bar["y0"])
            b_sol = jnp.asarray(b_sol, dtype)
            k_bars = jtu.tree_map(
                lambda y, k: _outer(b_sol, y) + k, y1_bar, dense_info_bar["k"]
            )
        a, c = _tableau_arrays(tableau, num_stages, dtype, jnp.result_type(float))

        def stage_vjp(i, y_i, k_i_bar):
            _, pull_back_stage = eqx.filter_vjp(
                lambda y, inputs: stage(c[i], y, inputs), y_i, inputs
            )
            return pull_back_stage(k_i_bar)

        def body(n, carry):
            # One stage's VJP per iteration: its activations are the loop's
            # temporaries, alive for one stage only.
            k_bars, y0_bar, inputs_bar = carry
            i = num_stages - 1 - n
            y_i = jtu.tree_map(lambda y: y[i], ys)
            k_i_bar = jtu.tree_map(lambda k: k[i], k_bars)
            y_i_bar, stage_inputs_bar = stage_vjp(i, y_i, k_i_bar)
            k_bars = jtu.tree_map(lambda k, y: k + _outer(a[i], y), k_bars, y_i_bar)
            return (
                k_bars,
                tree_add(y0_bar, y_i_bar),
                tree_add(inputs_bar, stage_inputs_bar),
            )

        inputs_bar = jtu.tree_map(
            jnp.zeros_like,
            eqx.filter_eval_shape(lambda y, k: stage_vjp(0, y, k)[1], y0, y0),
        )
        init = (k_bars, y0_bar, inputs_bar)
        _, y0_bar, inputs_bar = lax.fori_loop(0, num_stages, body, init)
        return y0_bar, inputs_bar

    return outputs, pull_back


def after(x: PyTree, dependency: PyTree) -> PyTree:
    """`x`, bitwise, made to depend on `dependency` in a way XLA keeps: what is
    computed from it then waits for `dependency`. Used to start a loop of stage
    pull-backs only once the forward evaluations before it are done with, whose
    temporaries XLA would otherwise keep alive across the loop.
    (`lax.optimization_barrier` does not reach XLA's CPU scheduler.)"""
    leaf = jtu.tree_leaves(dependency)[0]
    # `+0.0`, or NaN where `dependency` is not finite; XLA does not fold `0 * x`. Its
    # subtraction leaves every `x` unchanged, `-0.0` included.
    zero = jnp.abs(0 * jnp.ravel(leaf)[0])
    return jtu.tree_map(lambda a: a - zero.astype(a.dtype), x)


def _outer(weights: Array, y: Array) -> Array:
    """`weights[i] * y` stacked along a new first axis."""
    return jnp.reshape(weights, weights.shape + (1,) * y.ndim) * y[None]


def stage_activation_bytes(
    stage: Callable[[float, Y, PyTree], Y], y0: Y, inputs: PyTree
) -> int:
    """Bytes that one stage's VJP keeps alive beyond its inputs: the activations of
    the vector field (at trace-time shapes, so per element under `vmap`)."""
    residuals = eqx.filter_eval_shape(
        lambda y, inputs: eqx.filter_vjp(lambda y, i: stage(0.0, y, i), y, inputs)[1],
        y0,
        inputs,
    )
    return max(0, tree_nbytes(residuals) - tree_nbytes((y0, inputs)))


def tree_nbytes(tree: PyTree) -> int:
    # Arrays, and the `jax.ShapeDtypeStruct`s of `eqx.filter_eval_shape`; typed PRNG
    # keys (in a Brownian path) are not activations.
    leaves = [
        x
        for x in jtu.tree_leaves(tree)
        if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jax.dtypes.extended)
    ]
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


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
    if not (
        has_explicit_tableau(solver)
        or type(solver) in _EXPLICIT_NON_RK_SOLVERS
        or isinstance(solver, diffrax.AbstractSRK)
    ):
        raise ValueError(
            f"`Reversible({name}(...))` is not supported: `Reversible` needs a "
            "one-step explicit solver whose step is a function of its start point "
            f"alone, and `{name}` is not known to be one (an implicit or multistep "
            "solver cannot be undone this way). Supported: explicit Runge--Kutta "
            "solvers (`Euler`, `Heun`, `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`, "
            "`Dopri5`, `Dopri8`, or any `AbstractERK` with a `ButcherTableau`), "
            "`EulerHeun`, `ItoMilstein`, `StratonovichMilstein`, and the stochastic "
            "Runge--Kutta solvers (`AbstractSRK`: `ShARK`, `SRA1`, `SEA`, `SPaRK`, "
            "`GeneralShARK`, `SlowRK`)."
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
