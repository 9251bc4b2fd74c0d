from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import ω
from jaxtyping import ArrayLike, PyTree

from ._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from ._diffrax_internals import is_sde, linear_rescale
from ._misc import is_none, tree_add


_SolverState: TypeAlias = Y

# Solvers whose step is not a function of its start point alone: they carry a state of
# their own between steps, so the reversible scheme cannot call them as `Φ_h`.
_STATEFUL_SOLVERS = (diffrax.ReversibleHeun, diffrax.LeapfrogMidpoint)


def _first_failure(*results: diffrax.RESULTS) -> diffrax.RESULTS:
    out = diffrax.RESULTS.successful
    for result in results:
        out = diffrax.RESULTS.where(out == diffrax.RESULTS.successful, result, out)
    return out


def _linear_combination(base: Y, coeffs, ks: list[Y]) -> Y:
    # Tableau coefficients as Python floats: weakly typed, so they keep the state's
    # dtype; and zeros skipped at trace time, not multiplied at run time.
    out = base
    for coeff, k in zip(coeffs, ks):
        coeff = float(coeff)
        if coeff != 0.0:
            out = (out**ω + coeff * k**ω).ω
    return out


def _has_explicit_tableau(solver: diffrax.AbstractSolver) -> bool:
    # `type`, not `isinstance`: wrapped solvers pass `isinstance` checks for the solver
    # they wrap, without having its tableau.
    return issubclass(type(solver), diffrax.AbstractERK) and isinstance(
        solver.tableau, diffrax.ButcherTableau
    )


def _unrolled_erk_step(
    tableau: diffrax.ButcherTableau,
    terms: PyTree[diffrax.AbstractTerm],
    t0: RealScalarLike,
    t1: RealScalarLike,
    y0: Y,
    args: Args,
) -> tuple[Y, Y, DenseInfo]:
    """One step of an explicit Runge--Kutta method, with its stages unrolled.

    Diffrax runs the stages in a loop, which is what it needs for implicit and
    first-same-as-last methods. Each reversible step is two fresh base steps, and the
    backward pass differentiates them one at a time: unrolled, XLA fuses the stages,
    adds no loop overhead, and drops stages whose results are unused (such as the
    first-same-as-last stage of `Φ_{-h}`). The arithmetic, error estimate and dense
    information are those of Diffrax's own step.
    """
    control = terms.contr(t0, t1)
    dt = t1 - t0
    ks = [terms.vf_prod(t0, y0, args, control)]
    for c_i, a_i in zip(tableau.c, tableau.a_lower):
        y_i = _linear_combination(y0, a_i, ks)
        ks.append(terms.vf_prod(t0 + float(c_i) * dt, y_i, args, control))
    y1 = _linear_combination(y0, tableau.b_sol, ks)
    y_error = _linear_combination(jtu.tree_map(jnp.zeros_like, y0), tableau.b_error, ks)
    k = jtu.tree_map(lambda *stages: jnp.stack(stages), *ks)
    return y1, y_error, dict(y0=y0, y1=y1, k=k)


def _check_base_solver(solver: diffrax.AbstractSolver) -> None:
    name = type(solver).__name__
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        raise ValueError(
            f"`Reversible({name}())` is not possible: `{name}` is an implicit solver, "
            "and `Reversible` needs an explicit one, whose step is cheap to evaluate "
            "backwards in time. Consider `Reversible(diffrax.Tsit5())`."
        )
    if type(solver) is Reversible or isinstance(solver, _STATEFUL_SOLVERS):
        raise ValueError(
            f"`Reversible({name}(...))` is not possible: `{name}` carries state "
            "between steps, so a single step is not a function of its start point. "
            "Wrap a one-step explicit solver instead, e.g. "
            "`Reversible(diffrax.Tsit5())`."
        )
    if isinstance(solver, diffrax.AbstractSRK):
        raise ValueError(
            f"`Reversible({name}())` is not supported: Diffrax<=0.7.2 computes steps "
            "of stochastic Runge--Kutta solvers with Lévy area wrongly when they are "
            "taken backwards in time (diffrax issue #598). Consider "
            "`Reversible(diffrax.Heun())` or `Reversible(diffrax.Midpoint())`."
        )


def _check_sde_base(solver: diffrax.AbstractSolver, terms) -> None:
    if is_sde(terms) and isinstance(solver, diffrax.AbstractItoSolver):
        name = type(solver).__name__
        raise ValueError(
            f"`Reversible({name}())` does not solve SDEs: the reversible scheme "
            "evaluates the diffusion at both ends of a step, so an Itô base solver "
            "converges to neither the Itô nor the Stratonovich solution. Use a "
            "Stratonovich base: `Reversible(diffrax.Heun())`, `Midpoint()`, "
            "`Ralston()` or `EulerHeun()`."
        )


class _ReversibleInterpolation(diffrax.AbstractLocalInterpolation):
    # Within a step, `y - z` moves linearly from `y0 - z0` to `y1 - Φ_h(t0, z0)`, on top
    # of the base solver's own interpolation of `z0 -> Φ_h(t0, z0)`. This matches both
    # ends of the step exactly and keeps the base interpolant's order.
    t0: RealScalarLike
    t1: RealScalarLike
    base: diffrax.AbstractLocalInterpolation
    y0_offset: Y
    y1_offset: Y

    def evaluate(
        self, t0: RealScalarLike, t1: RealScalarLike | None = None, left: bool = True
    ) -> Y:
        if t1 is not None:
            y0 = self.evaluate(t0, left=left)
            y1 = self.evaluate(t1, left=left)
            return (y1**ω - y0**ω).ω
        # Diffrax's rescaling: 0, with zero gradients, on the empty steps that finished
        # elements of a `vmap` take (a masked NaN would still reach the gradient).
        theta = linear_rescale(self.t0, t0, self.t1)
        base = self.base.evaluate(t0, left=left)
        offset = (self.y0_offset**ω + theta * (self.y1_offset**ω - self.y0_offset**ω)).ω
        return (base**ω + offset**ω).ω


def _dense_info(
    base_dense_info: DenseInfo, y0: Y, z0: Y, y1: Y, z_step: Y
) -> DenseInfo:
    """What `_ReversibleInterpolation` is built from: the base step `z0 -> z_step` and
    the offsets `y - z` at either end of the step."""
    return dict(
        base=base_dense_info,
        y0_offset=(y0**ω - z0**ω).ω,
        y1_offset=(y1**ω - z_step**ω).ω,
    )


class _ReversibleInterpolationFactory(eqx.Module):
    # A module rather than `functools.partial`, so that it hashes by value: Diffrax
    # keeps `interpolation_cls` as a static field of `DenseInterpolation`.
    base_interpolation_cls: Callable[..., diffrax.AbstractLocalInterpolation] = (
        eqx.field(static=True)
    )

    def __call__(
        self,
        *,
        t0: RealScalarLike,
        t1: RealScalarLike,
        base: DenseInfo,
        y0_offset: Y,
        y1_offset: Y,
    ) -> _ReversibleInterpolation:
        return _ReversibleInterpolation(
            t0=t0,
            t1=t1,
            base=self.base_interpolation_cls(t0=t0, t1=t1, **base),
            y0_offset=y0_offset,
            y1_offset=y1_offset,
        )


class Reversible(diffrax.AbstractWrappedSolver[_SolverState]):
    """Makes any explicit one-step solver algebraically reversible.

    With `Φ_h(t, x)` one step of the wrapped solver from `t` to `t + h`, the solver
    evolves two coupled states `(y, z)`, starting from `y0 = z0`:

    ```
    y1 = λ (y0 - z0) + Φ_h(t0, z0)
    z1 = y1 + z0 - Φ_{-h}(t1, y1)
    ```

    This step can be undone in closed form,

    ```
    z0 = z1 - y1 + Φ_{-h}(t1, y1)
    y0 = (y1 - Φ_h(t0, z0)) / λ + z0
    ```

    which is what lets [`diffrax_reversible.ReversibleAdjoint`][] backpropagate through
    a solve in constant memory, reconstructing the forward states on the way back.

    The solution output is `y`; `z` is kept as the solver state. The order (and, for
    SDEs, the strong order) of the wrapped solver is retained. The error estimate for
    adaptive step sizing is that of the wrapped solver's step `Φ_h(t0, z0)`, so
    `Reversible(solver)` can use an adaptive step size controller exactly when `solver`
    can. Dense output (`SaveAt(ts=...)`) uses the wrapped solver's interpolant of the
    `z`-step, shifted linearly by `y - z`.

    Each step makes two steps of the wrapped solver. First-same-as-last solvers (e.g.
    [`diffrax.Tsit5`][]) re-evaluate their first stage in every step, because each step
    of the wrapped solver must depend only on its start point. The stages of explicit
    Runge--Kutta solvers are unrolled (see `scan_kind`), with the same arithmetic as
    Diffrax's own step.

    !!! info

        `Reversible(solver)` is an ordinary Diffrax solver: it works with every
        Diffrax adjoint that `solver` works with, and with forward-mode autodiff. Only
        [`diffrax_reversible.ReversibleAdjoint`][] makes use of its reversibility.

    ??? cite "Reference"

        ```bibtex
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural ODEs},
            author={McCallum, Sam and Foster, James},
            journal={arXiv:2410.11648},
            year={2024}
        }
        ```
    """

    solver: diffrax.AbstractSolver
    coupling_parameter: float = 0.999
    scan_kind: None | Literal["lax", "checkpointed", "bounded"] = None

    def __check_init__(self):
        _check_base_solver(self.solver)
        coupling = self.coupling_parameter
        if isinstance(coupling, jax.core.Tracer):
            return  # Only known at run time.
        if not 0 < float(coupling) <= 1:
            raise ValueError(
                f"`Reversible(..., coupling_parameter={coupling})` is not valid: the "
                "coupling parameter must lie in (0, 1]. The default is 0.999."
            )

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return _ReversibleInterpolationFactory(self.solver.interpolation_cls)

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms: PyTree[diffrax.AbstractTerm]) -> int | None:
        return self.solver.order(terms)

    def strong_order(
        self, terms: PyTree[diffrax.AbstractTerm]
    ) -> RealScalarLike | None:
        return self.solver.strong_order(terms)

    def error_order(self, terms: PyTree[diffrax.AbstractTerm]) -> RealScalarLike | None:
        # The error estimate is the wrapped solver's, made on one of its own steps.
        return self.solver.error_order(terms)

    def init(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        del t0, t1, args
        _check_sde_base(self.solver, terms)
        return y0

    def step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y | None, DenseInfo, _SolverState, diffrax.RESULTS]:
        del made_jump  # Every base step starts afresh anyway.
        _check_sde_base(self.solver, terms)
        z0 = solver_state
        coupling = self._coupling(y0)
        z_step, y_error, base_dense_info, result1 = self.base_step(
            terms, t0, t1, z0, args
        )
        y1 = (coupling * (y0**ω - z0**ω) + z_step**ω).ω
        y1_back, _, _, result2 = self.base_step(terms, t1, t0, y1, args)
        z1 = (y1**ω + z0**ω - y1_back**ω).ω
        dense_info = _dense_info(base_dense_info, y0, z0, y1, z_step)
        return y1, y_error, dense_info, z1, _first_failure(result1, result2)

    def inverse_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        z1: Y,
        args: Args,
    ) -> tuple[Y, Y]:
        """Undoes one step: recovers the state at `t0` from the state at `t1`.

        **Arguments:**

        - `terms`, `args`: as passed to `step`.
        - `t0`, `t1`: the interval of the step to undo.
        - `y1`, `z1`: the solution and the solver state at `t1`, as returned by `step`.

        **Returns:**

        The pair `(y0, z0)` that `step` was called with, up to floating-point round-off.
        """
        coupling = self._coupling(y1)
        y1_back, _, _, _ = self.base_step(terms, t1, t0, y1, args)
        z0 = (z1**ω - y1**ω + y1_back**ω).ω
        z_step, _, _, _ = self.base_step(terms, t0, t1, z0, args)
        y0 = ((y1**ω - z_step**ω) / coupling + z0**ω).ω
        return y0, z0

    def reverse_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        z1: Y,
        args: Args,
        y1_bar: Y,
        z1_bar: Y,
        dense_info_cotangent: Callable[[DenseInfo], tuple[DenseInfo, Any]] | None,
        time_cotangents: bool = False,
    ) -> tuple[tuple[Y, Y], tuple[Y, Y, Args, PyTree, Any], Any]:
        """Undoes one step and pulls cotangents back through it, in one pass.

        The two base steps that the inverse evaluates, `Φ_{-h}(t1, y1)` and
        `Φ_h(t0, z0)`, are the same ones the step's vector-Jacobian product needs: each
        is evaluated once, under `eqx.filter_vjp`, and serves both. The first is pulled
        back before the second is linearised, so that only one base step's residuals
        are alive at a time.

        **Arguments:**

        - `terms`, `t0`, `t1`, `args`: as passed to `step`.
        - `y1`, `z1`: the solution and the solver state at `t1`, as returned by `step`.
        - `y1_bar`, `z1_bar`: the cotangents of `y1` and `z1`.
        - `dense_info_cotangent`: maps the step's `dense_info` to its cotangent and any
            auxiliary output; or `None` if nothing was saved from the dense output.
        - `time_cotangents`: whether to pull back to `t0` and `t1` too. (Brownian paths
            refuse to be differentiated with respect to time.)

        **Returns:**

        `((y0, z0), (y0_bar, z0_bar, args_bar, terms_bar, times_bar), aux)`: the state
        at `t0`, the cotangents of `step`'s inputs (`None` for their non-differentiable
        parts; `times_bar` is `(t0_bar, t1_bar)`, or `None` without
        `time_cotangents`), and the auxiliary output of `dense_info_cotangent` (`None`
        without one).
        """
        coupling = self._coupling(y1)
        dense = dense_info_cotangent is not None

        times = (t0, t1) if time_cotangents else None

        def backward_base_step(y, args, terms, times):
            ta, tb = (t0, t1) if times is None else times
            y_back, _, _, _ = self.base_step(terms, tb, ta, y, args)
            return y_back

        def forward_base_step(z, args, terms, times):
            ta, tb = (t0, t1) if times is None else times
            z_step, _, base_dense_info, _ = self.base_step(terms, ta, tb, z, args)
            return z_step, base_dense_info if dense else None

        # Reverse of: A = Φ_h(z0); y1 = λ(y0 - z0) + A; B = Φ_{-h}(y1);
        # z1 = y1 + z0 - B; and, in `dense_info`, the offsets y0 - z0 and y1 - A.
        y1_back, pull_back_backward = eqx.filter_vjp(
            backward_base_step, y1, args, terms, times
        )
        y1_bar_via_back, args_bar, terms_bar, times_bar = pull_back_backward(
            (-(z1_bar**ω)).ω
        )
        y1_bar = (y1_bar**ω + z1_bar**ω + y1_bar_via_back**ω).ω
        z0 = (z1**ω - y1**ω + y1_back**ω).ω

        (z_step, base_dense_info), pull_back_forward = eqx.filter_vjp(
            forward_base_step, z0, args, terms, times
        )
        y0 = ((y1**ω - z_step**ω) / coupling + z0**ω).ω
        if dense:
            dense_info = _dense_info(base_dense_info, y0, z0, y1, z_step)
            dense_info_bar, aux = dense_info_cotangent(dense_info)
            offset0_bar = dense_info_bar["y0_offset"]
            offset1_bar = dense_info_bar["y1_offset"]
            y1_bar = (y1_bar**ω + offset1_bar**ω).ω
            z_step_bar = (y1_bar**ω - offset1_bar**ω).ω
            y0_bar = (coupling * y1_bar**ω + offset0_bar**ω).ω
            z0_bar = (z1_bar**ω - coupling * y1_bar**ω - offset0_bar**ω).ω
            base_dense_info_bar = dense_info_bar["base"]
        else:
            aux = None
            z_step_bar = y1_bar
            y0_bar = (coupling * y1_bar**ω).ω
            z0_bar = (z1_bar**ω - coupling * y1_bar**ω).ω
            base_dense_info_bar = None
        z0_bar_via_step, args_bar_step, terms_bar_step, times_bar_step = (
            pull_back_forward((z_step_bar, base_dense_info_bar))
        )
        z0_bar = (z0_bar**ω + z0_bar_via_step**ω).ω
        args_bar = tree_add(args_bar, args_bar_step)
        terms_bar = tree_add(terms_bar, terms_bar_step)
        times_bar = tree_add(times_bar, times_bar_step)
        return (y0, z0), (y0_bar, z0_bar, args_bar, terms_bar, times_bar), aux

    def base_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        x0: Y,
        args: Args,
    ) -> tuple[Y, Y | None, DenseInfo, diffrax.RESULTS]:
        """One step `Φ` of the wrapped solver from `t0` to `t1` (either way in time),
        as a pure function of its start point `x0`.

        **Returns:**

        A 4-tuple of the end point, the error estimate, the dense information and the
        result of the wrapped solver's step.
        """
        if self.scan_kind is None and _has_explicit_tableau(self.solver):
            x1, error, dense_info = _unrolled_erk_step(
                self.solver.tableau, terms, t0, t1, x0, args
            )
            return x1, error, dense_info, diffrax.RESULTS.successful
        solver = self._solver_with_scan_kind()
        # A fresh state and `made_jump=True` make first-same-as-last solvers evaluate
        # their first stage at `x0`, instead of reusing one from another trajectory.
        solver_state = solver.init(terms, t0, t1, x0, args)
        x1, error, dense_info, _, result = solver.step(
            terms, t0, t1, x0, args, solver_state, made_jump=True
        )
        return x1, error, dense_info, result

    def func(
        self, terms: PyTree[diffrax.AbstractTerm], t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return self.solver.func(terms, t0, y0, args)

    def _coupling(self, like: Y) -> ArrayLike:
        # Cast to the state's dtype: strict dtype promotion forbids mixing.
        dtype = jnp.result_type(*jtu.tree_leaves(like))
        return jnp.asarray(self.coupling_parameter, dtype=dtype)

    def _solver_with_scan_kind(self) -> diffrax.AbstractSolver:
        # `DirectAdjoint` and `ForwardMode` set `scan_kind` on what they believe is a
        # Runge--Kutta solver (the `isinstance` check sees through the wrapper).
        if self.scan_kind is None or not isinstance(
            self.solver, (diffrax.AbstractRungeKutta, diffrax.AbstractSRK)
        ):
            return self.solver
        return eqx.tree_at(
            lambda s: s.scan_kind, self.solver, self.scan_kind, is_leaf=is_none
        )


Reversible.__init__.__doc__ = """**Arguments:**

- `solver`: the explicit solver to make reversible, e.g. `diffrax.Tsit5()`. Implicit
    solvers, solvers that carry state between steps (`diffrax.ReversibleHeun`,
    `diffrax.LeapfrogMidpoint`, `Reversible` itself) and stochastic Runge--Kutta solvers
    with Lévy area raise a `ValueError`.
- `coupling_parameter`: the coupling `λ` in `(0, 1]` between the two states. Values
    close to 1 make the backward reconstruction most stable (round-off grows like
    `λ^{-N}` over `N` steps); smaller values damp the parasitic mode of the scheme more
    strongly. Defaults to 0.999.
- `scan_kind`: how the stages of a Runge--Kutta base solver are run. `None` (the
    default) unrolls the stages of explicit Runge--Kutta methods: fastest, and XLA
    drops unused stages. Any other value (`"checkpointed"`, `"lax"`, `"bounded"`) is
    passed on to the wrapped solver, which then runs its stages in Diffrax's own loop;
    with [`diffrax_reversible.ReversibleAdjoint`][], `"checkpointed"` stores fewer
    stage activations in the backward pass (less memory when the vector field's
    activations are much larger than the state), at 2-3 times the time.
    [`diffrax.DirectAdjoint`][] and [`diffrax.ForwardMode`][] set this themselves.
"""
