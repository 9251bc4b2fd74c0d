from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import ω
from jaxtyping import ArrayLike, PyTree

from ._base_step import (
    after,
    check_base_solver,
    check_sde_base,
    erk_step_with_stage_pull_backs,
    has_explicit_tableau,
    looped_erk_step,
    stage_activation_bytes,
    tree_nbytes,
    unrolled_erk_step,
)
from ._coupling import (
    auto_coupling,
    FIRST_ORDER_TOL,
    gap_is_unstable,
    leaf_scales,
    local_decay,
    PARASITIC_TOL,
    report_instability,
    reproducible,
    solution_growth,
    with_gap_growth,
)
from ._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from ._diffrax_internals import is_sde, linear_rescale
from ._misc import is_none, tree_add
from ._srk import srk_step


# Above this many bytes of stage activations, a base step's VJP in the backward pass
# is taken one stage at a time (see `Reversible.per_stage_vjp`).
PER_STAGE_BYTES = 2**17


class _ReversibleState(eqx.Module):
    # `z`, the second state of the coupled scheme. Two diagnostics, not differentiated:
    # `peak`, the largest `max|y|` (per leaf) so far, against which the gap `y - z` is
    # judged (see `gap_is_unstable`), and only used forwards; and `log_growth`, the sum
    # over the steps so far of the logarithm of the factor by which undoing a step
    # amplifies round-off, from which `ReversibleAdjoint(checkpoint_every="auto")`
    # places its checkpoints: undoing a step subtracts that step's term again.
    z: Y
    peak: list[ArrayLike]
    log_growth: ArrayLike


_SolverState: TypeAlias = _ReversibleState


def _previous_state(
    state1: _ReversibleState, z0: Y, log_growth: ArrayLike
) -> _ReversibleState:
    return _ReversibleState(
        z=z0, peak=state1.peak, log_growth=state1.log_growth - log_growth
    )


def _reversed(control: PyTree | None) -> PyTree | None:
    """The control over a step taken backwards: `terms.contr(t1, t0)` is
    `-terms.contr(t0, t1)` bitwise, for time, interpolated paths and Brownian paths."""
    return None if control is None else jtu.tree_map(jnp.negative, control)


def _stage(interval: tuple[RealScalarLike, RealScalarLike]):
    """The increment of one stage of a base step over `interval`, as a function of
    the stage's fraction `c` of the step, its input `x`, and `inputs = (args, terms,
    times, control)`; `times` replaces `interval` where it is differentiated."""

    def stage(c, x, inputs):
        args, terms, times, control = inputs
        ta, tb = interval if times is None else times
        # As in `unrolled_erk_step`: `t0` itself, and `c` rounded to the time's dtype.
        if isinstance(c, float) and c == 0.0:
            t = ta
        else:
            t = ta + jnp.asarray(c, jnp.result_type(ta)) * (tb - ta)
        return terms.vf_prod(t, x, args, control)

    return stage


def _first_failure(*results: diffrax.RESULTS) -> diffrax.RESULTS:
    out = diffrax.RESULTS.successful
    for result in results:
        out = diffrax.RESULTS.where(out == diffrax.RESULTS.successful, result, out)
    return out


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

    The solution output is `y`; `z` is kept in the solver state. The order (and, for
    SDEs, the strong order) of the wrapped solver is retained. The error estimate for
    adaptive step sizing is that of the wrapped solver's step `Φ_h(t0, z0)`, plus the
    growth of the gap `y - z` in the step, so `Reversible(solver)` can use an adaptive
    step size controller exactly when `solver` can, and the controller keeps the coupled
    scheme stable. Dense output (`SaveAt(ts=...)`) uses the wrapped solver's interpolant
    of the `z`-step, shifted linearly by `y - z`.

    The coupling `λ` is chosen per step by default (`coupling_parameter="auto"`): the
    step matrix of the scheme on `y' = a y` has a parasitic eigenvalue of about
    `λ e^{a h}` besides the physical `e^{-a h}`, so a fixed `λ` close to 1 lets every
    mode that decays faster than `(1 - λ) / h` grow. The automatic coupling estimates
    the local decay `a h` (a Rayleigh quotient of the Jacobian of the vector field
    along the base step's error estimate, one Jacobian-vector product per step) and
    takes `λ = e^{-2 a h}`, clipped to `[0.01, 0.999]`: decaying modes are damped as
    fast as the physical ones, and on oscillatory or neutral dynamics `λ = 0.999`, the
    reconstruction's round-off grows only like `0.999^{-N}`. The coupling is computed
    from what the inverse step also knows (`z0`, `t0`, `t1`), so the step stays exactly
    invertible. It is not differentiated (like a step size, it is a choice of
    discretisation), so every adjoint differentiates the same discrete map.

    !!! warning "Never silently unstable"

        Each step measures how far `y` and `z` have drifted apart, relative to the
        solution's scale. Where the coupled scheme is unstable (a fixed coupling on
        decaying dynamics, or steps too large for any coupling), the gap grows
        geometrically, and the solve stops with an unsuccessful `sol.result` (Diffrax's
        `nonlinear_divergence`), with a `RuntimeWarning` that says what it means, and,
        with `throw=True` under [`diffrax_reversible.ReversibleAdjoint`][], an error
        with that message.

    Each step makes two steps of the wrapped solver. First-same-as-last solvers (e.g.
    [`diffrax.Tsit5`][]) re-evaluate their first stage in every step, because each step
    of the wrapped solver must depend only on its start point. The stages of explicit
    Runge--Kutta solvers are unrolled, with the same arithmetic as Diffrax's own step,
    or, on large states, run in a loop one at a time (see `scan_kind` and
    `per_stage_vjp`).

    ??? info "Stochastic Runge--Kutta solvers: the Lévy areas over a reversed step"

        Diffrax's SRK solvers (`diffrax.ShARK`, `diffrax.SRA1`, `diffrax.SEA`,
        `diffrax.SPaRK`, `diffrax.GeneralShARK`, `diffrax.SlowRK`) use the
        space-time Lévy area `H` of the Brownian path (so a
        `diffrax.VirtualBrownianTree(..., levy_area=diffrax.SpaceTimeLevyArea)`), and
        `Φ_{-h}` needs it over a reversed interval. With `h = t1 - t0`,
        `B(u) = W_{t0,u} - (u - t0)/h W_{t0,t1}` the Brownian bridge, and

        ```
        H_{t0,t1} = (1/h) ∫_{t0}^{t1} B(u) du
        K_{t0,t1} = (1/h²) ∫_{t0}^{t1} B(u) (h/2 - (u - t0)) du
        ```

        (`K` the space-time-time Lévy area), swapping `t0` and `t1` leaves the bridge
        and the weight `h/2 - (u - t0)` unchanged and negates the integral and `h`. So
        over a reversed interval `W` and `K` change sign and `H` does not:
        `H_{t1,t0} = H_{t0,t1}`. Each SRK step is taken as a step forward in the
        reflected time `s = sign(h) t`, with the increments `(|h|, W_{t0,t1},
        H_{t0,t1}, K_{t0,t1})`, which Diffrax's step then uses as it does forwards, in
        0.7.2 and after its fix of backward SRK solves (diffrax issue #598). Solves
        backwards in time (`t1 < t0`) are right too, where Diffrax 0.7.2's own SRK
        steps are not.

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
    coupling_parameter: RealScalarLike | Literal["auto"] = "auto"
    scan_kind: None | Literal["lax", "checkpointed", "bounded"] = None
    per_stage_vjp: bool | Literal["auto"] = "auto"

    def __check_init__(self):
        check_base_solver(self.solver)
        coupling = self.coupling_parameter
        if isinstance(coupling, str):
            if coupling != "auto":
                raise ValueError(
                    f"`Reversible(..., coupling_parameter={coupling!r})` is not valid: "
                    'the coupling parameter is `"auto"` or a number in (0, 1].'
                )
            return
        if isinstance(coupling, jax.core.Tracer):
            return  # Only known at run time: checked in `_coupling`.
        if not 0 < float(coupling) <= 1:
            raise ValueError(
                f"`Reversible(..., coupling_parameter={coupling})` is not valid: the "
                'coupling parameter must lie in (0, 1], or be `"auto"` (the default).'
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
        check_sde_base(self.solver, terms)
        return _ReversibleState(
            z=y0,
            peak=lax.stop_gradient(leaf_scales(y0)),
            log_growth=jnp.zeros((), jnp.result_type(float)),
        )

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
        check_sde_base(self.solver, terms)
        z0 = solver_state.z
        control = self._step_control(terms, t0, t1)
        z_step, base_error, base_dense_info, result1 = self.base_step(
            terms, t0, t1, z0, args, control
        )
        coupling, log_growth = self._coupling(
            terms, t0, t1, z0, args, z_step, base_error, control
        )
        y1 = (coupling * (y0**ω - z0**ω) + z_step**ω).ω
        y1_back, _, _, result2 = self.base_step(
            terms, t1, t0, y1, args, _reversed(control), solution_only=True
        )
        z1 = (y1**ω + z0**ω - y1_back**ω).ω
        dense_info = _dense_info(base_dense_info, y0, z0, y1, z_step)
        gap0, gap1 = (y0**ω - z0**ω).ω, (y1**ω - z1**ω).ω
        y_error = reproducible(with_gap_growth(base_error, gap0, gap1))
        increment = (z_step**ω - z0**ω).ω
        peak = lax.stop_gradient(
            [jnp.maximum(a, b) for a, b in zip(solver_state.peak, leaf_scales(y1))]
        )
        tol = PARASITIC_TOL if (self.solver.order(terms) or 1) > 1 else FIRST_ORDER_TOL
        unstable = gap_is_unstable(
            gap0, gap1, y0, y1, increment, peak, tol, noisy=is_sde(terms)
        )
        result = _first_failure(result1, result2, report_instability(unstable))
        state1 = _ReversibleState(
            z=z1, peak=peak, log_growth=solver_state.log_growth + log_growth
        )
        return y1, y_error, dense_info, state1, result

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
        state1 = z1
        z1 = state1.z
        control = self._step_control(terms, t0, t1)
        y1_back, _, _, _ = self.base_step(
            terms, t1, t0, y1, args, _reversed(control), solution_only=True
        )
        z0 = (z1**ω - y1**ω + y1_back**ω).ω
        z_step, y_error, _, _ = self.base_step(terms, t0, t1, z0, args, control)
        coupling, log_growth = self._coupling(
            terms, t0, t1, z0, args, z_step, y_error, control
        )
        y0 = ((y1**ω - z_step**ω) / coupling + z0**ω).ω
        return y0, _previous_state(state1, z0, log_growth)

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
        """Undoes one step and pulls cotangents back through it: `undo_step`, then its
        pull-back.

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
        dense = dense_info_cotangent is not None
        state0, dense_info, pull_back = self.undo_step(
            terms, t0, t1, y1, z1, args, y1_bar, z1_bar, dense, time_cotangents
        )
        if dense:
            dense_info_bar, aux = dense_info_cotangent(dense_info)
        else:
            dense_info_bar, aux = None, None
        return state0, pull_back(dense_info_bar), aux

    def undo_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        z1: Y,
        args: Args,
        y1_bar: Y,
        z1_bar: Y,
        dense: bool,
        time_cotangents: bool = False,
    ) -> tuple[tuple[Y, Y], DenseInfo | None, Callable[[DenseInfo | None], tuple]]:
        """Undoes one step, and returns the pull-back of its vector-Jacobian product.

        The two base steps that the inverse evaluates, `Φ_{-h}(t1, y1)` and
        `Φ_h(t0, z0)`, are the same ones the step's vector-Jacobian product needs: each
        is evaluated once, under `eqx.filter_vjp`, and serves both. The first is pulled
        back (with `z1_bar`) before the second is linearised, so that only one base
        step's residuals are alive at a time.

        **Arguments:** as `reverse_step`; `dense` says whether the step's `dense_info`
        is wanted (anything saved from the dense output).

        **Returns:**

        `((y0, z0), dense_info, pull_back)`: the state at `t0`, the step's `dense_info`
        (`None` without `dense`), and a function from the cotangent of `dense_info`
        (`None` without `dense`) to `(y0_bar, z0_bar, args_bar, terms_bar, times_bar)`
        as `reverse_step` returns them.
        """
        # The scale in the state is carried unchanged: its cotangent passes through.
        state1, state1_bar = z1, z1_bar
        z1, z1_bar = state1.z, state1_bar.z

        times = (t0, t1) if time_cotangents else None

        def step_control(terms, times):
            ta, tb = (t0, t1) if times is None else times
            return self._step_control(terms, ta, tb)

        # One control for both base steps; its cotangents are pulled back once.
        control, pull_back_control = eqx.filter_vjp(step_control, terms, times)
        # Reverse of: A = Φ_h(z0); y1 = λ(y0 - z0) + A; B = Φ_{-h}(y1);
        # z1 = y1 + z0 - B; and, in `dense_info`, the offsets y0 - z0 and y1 - A.
        (y1_back, _, _), pull_back_backward = self._base_step_vjp(
            terms,
            (t1, t0),
            y1,
            args,
            _reversed(control),
            time_cotangents,
            dense=False,
            solution_only=True,
        )
        y1_bar_via_back, args_bar, terms_bar, times_bar, control_bar = (
            pull_back_backward((-(z1_bar**ω)).ω, None)
        )
        times_bar = None if times_bar is None else times_bar[::-1]
        control_bar = _reversed(control_bar)
        y1_bar = (y1_bar**ω + z1_bar**ω + y1_bar_via_back**ω).ω
        z0 = (z1**ω - y1**ω + y1_back**ω).ω

        (z_step, y_error, base_dense_info), pull_back_forward = self._base_step_vjp(
            terms, (t0, t1), z0, args, control, time_cotangents, dense
        )
        coupling, log_growth = self._coupling(
            terms, t0, t1, z0, args, z_step, y_error, control
        )
        y0 = ((y1**ω - z_step**ω) / coupling + z0**ω).ω
        state0 = _previous_state(state1, z0, log_growth)
        dense_info = _dense_info(base_dense_info, y0, z0, y1, z_step) if dense else None

        def pull_back(dense_info_bar):
            if dense:
                offset0_bar = dense_info_bar["y0_offset"]
                offset1_bar = dense_info_bar["y1_offset"]
                y1_bar_all = (y1_bar**ω + offset1_bar**ω).ω
                z_step_bar = (y1_bar_all**ω - offset1_bar**ω).ω
                y0_bar = (coupling * y1_bar_all**ω + offset0_bar**ω).ω
                z0_bar = (z1_bar**ω - coupling * y1_bar_all**ω - offset0_bar**ω).ω
                base_dense_info_bar = dense_info_bar["base"]
            else:
                z_step_bar = y1_bar
                y0_bar = (coupling * y1_bar**ω).ω
                z0_bar = (z1_bar**ω - coupling * y1_bar**ω).ω
                base_dense_info_bar = None
            # After `y0`: the base step's forward evaluation and the coupling's
            # Jacobian-vector product are done with before its stages are pulled back.
            (
                z0_bar_via_step,
                args_bar_step,
                terms_bar_step,
                times_bar_step,
                control_bar2,
            ) = pull_back_forward(z_step_bar, base_dense_info_bar, wait_for=y0)
            terms_bar_control, times_bar_control = pull_back_control(
                tree_add(control_bar, control_bar2)
            )
            z0_bar = (z0_bar**ω + z0_bar_via_step**ω).ω
            # As the step's own VJP: `log_growth` is carried on, `peak` is not
            # differentiated.
            state0_bar = _ReversibleState(
                z=z0_bar,
                peak=[jnp.zeros_like(p) for p in state1_bar.peak],
                log_growth=state1_bar.log_growth,
            )
            return (
                y0_bar,
                state0_bar,
                tree_add(args_bar, args_bar_step),
                tree_add(terms_bar, terms_bar_step, terms_bar_control),
                tree_add(times_bar, times_bar_step, times_bar_control),
            )

        return (y0, state0), dense_info, pull_back

    def _base_step_vjp(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        interval: tuple[RealScalarLike, RealScalarLike],
        x0: Y,
        args: Args,
        control: PyTree | None,
        time_cotangents: bool,
        dense: bool,
        solution_only: bool = False,
    ) -> tuple[tuple[Y, Y | None, DenseInfo | None], Callable]:
        """`base_step` over `interval = (t0, t1)` and its pull-back. `x1` is
        differentiated, and with `dense`, `dense_info`; with `solution_only`, only `x1`
        is wanted (see `base_step`).

        **Returns:**

        `((x1, error, dense_info), pull_back)`, with `dense_info` `None` without
        `dense`, and `pull_back(x1_bar, dense_info_bar, wait_for=None)`
        giving the cotangents `(x0_bar, args_bar, terms_bar, times_bar,
        control_bar)`, `times_bar` the pair `(t0_bar, t1_bar)` with `time_cotangents`
        and `None` without. The error estimate is not differentiated: it only feeds
        the coupling, which is not. A pull-back one stage at a time starts after
        `wait_for` is computed.
        """
        times = interval if time_cotangents else None
        inputs = (args, terms, times, control)
        stage = _stage(interval)
        if control is not None and self._runs_stages_in_loop(stage, x0, inputs):
            (x1, error, dense_info), pull_back_stages = erk_step_with_stage_pull_backs(
                self.solver.tableau, stage, x0, inputs, solution_only
            )

            def pull_back(x1_bar, dense_info_bar, wait_for=None):
                if wait_for is not None:
                    x1_bar = after(x1_bar, wait_for)
                x0_bar, inputs_bar = pull_back_stages(x1_bar, dense_info_bar)
                return (x0_bar, *inputs_bar)

            return (x1, error, dense_info if dense else None), pull_back

        def step(x, args, terms, times, control):
            ta, tb = interval if times is None else times
            x1, error, dense_info, _ = self.base_step(terms, ta, tb, x, args, control)
            return (x1, dense_info if dense else None), error

        (x1, dense_info), pull_back_step, error = eqx.filter_vjp(
            step, x0, args, terms, times, control, has_aux=True
        )

        def pull_back(x1_bar, dense_info_bar, wait_for=None):
            del wait_for  # XLA schedules an unrolled pull-back well by itself.
            return pull_back_step((x1_bar, dense_info_bar))

        return (x1, error, dense_info), pull_back

    def _runs_stages_in_loop(self, stage, x0: Y, inputs: PyTree) -> bool:
        """Whether the stages run in a loop, one at a time (see `per_stage_vjp`)."""
        if (
            self.per_stage_vjp is False
            or self.scan_kind is not None
            or not has_explicit_tableau(self.solver)
        ):
            return False
        if self.per_stage_vjp is True:
            return True
        stages = len(self.solver.tableau.c) + 1
        activations = stage_activation_bytes(stage, x0, inputs)
        # The loop carries the inputs' cotangent (a model's parameters) from stage to
        # stage, and under `vmap` one per batch element, which XLA cannot sum across
        # stages as it does unrolled: a wide MLP on a small state under `vmap` took
        # 2.5x the memory and time in the loop.
        large = stages * activations > PER_STAGE_BYTES
        return large and activations > tree_nbytes(inputs)

    def base_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        x0: Y,
        args: Args,
        control: PyTree | None = None,
        solution_only: bool = False,
    ) -> tuple[Y, Y | None, DenseInfo, diffrax.RESULTS]:
        """One step `Φ` of the wrapped solver from `t0` to `t1` (either way in time),
        as a pure function of its start point `x0`; driven by `control`, if given
        (`terms.contr(t0, t1)`, see `_step_control`).

        **Returns:**

        A 4-tuple of the end point, the error estimate, the dense information and the
        result of the wrapped solver's step. With `solution_only`, the error estimate
        and the dense information may be `None`.
        """
        if self.scan_kind is None and has_explicit_tableau(self.solver):
            if control is None:
                control = terms.contr(t0, t1)
            inputs = (args, terms, None, control)
            stage = _stage((t0, t1))
            if self._runs_stages_in_loop(stage, x0, inputs):
                (x1, error, dense_info), _ = looped_erk_step(
                    self.solver.tableau, stage, x0, inputs, solution_only
                )
            else:
                x1, error, dense_info = unrolled_erk_step(
                    self.solver.tableau, terms, t0, t1, x0, args, control
                )
            return x1, error, dense_info, diffrax.RESULTS.successful
        solver = self._solver_with_scan_kind()
        if isinstance(solver, diffrax.AbstractSRK):
            return srk_step(solver, terms, t0, t1, x0, args)
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

    def _coupling(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        z0: Y,
        args: Args,
        z_step: Y,
        z_step_error: Y | None,
        control: PyTree | None,
    ) -> tuple[ArrayLike, ArrayLike]:
        """The coupling `λ` of the step `t0 -> t1`, and the logarithm of the factor by
        which undoing the step amplifies round-off (see `_ReversibleState`).

        A function of what the inverse step also knows before it needs `λ`: the
        interval, `z0`, and the base step from `z0` (its error estimate). Never of
        `y0`, which the inverse is solving for."""
        # Cast to the state's dtype: strict dtype promotion forbids mixing.
        dtype = jnp.result_type(*jtu.tree_leaves(z0))
        decay = local_decay(terms, t0, t1, z0, args, z_step_error, control)
        decay = lax.stop_gradient(decay)
        if isinstance(self.coupling_parameter, str):
            growth = lax.stop_gradient(solution_growth(z0, z_step))
            # The parasitic mode grows by about `λ e^{decay}`, the solution by
            # `e^{growth}`: balance the two. On `y' = -a y` this is `λ = e^{-2 a h}`.
            # A solution shrinking faster than the dynamics decay is passing near zero
            # (noise, a crossing), not decaying: `λ` is then no smaller than
            # `e^{-2|decay|}`. Else the inverse's `1 / λ` would amplify round-off for
            # nothing, and `λ` would hang on `log|z0|`, which is ill-conditioned there.
            growth = jnp.maximum(growth, -jnp.abs(decay))
            # Not differentiated: `λ` is a choice of discretisation, like a step size,
            # and every adjoint then differentiates the same discrete map.
            coupling = auto_coupling((decay - growth) / 2).astype(dtype)
        else:
            coupling = jnp.asarray(self.coupling_parameter, dtype=dtype)
            if isinstance(coupling, jax.core.Tracer):
                coupling = eqx.error_if(
                    coupling,
                    (coupling <= 0) | (coupling > 1),
                    "`Reversible(..., coupling_parameter=...)` must lie in (0, 1].",
                )
        # Undoing the step amplifies round-off by `1 / λ` along the parasitic mode,
        # and by about `e^{|a h|}` through the dynamics: where they contract, and,
        # where they expand, through the parasitic mode they then damp.
        float_dtype = jnp.result_type(float)
        log_growth = -jnp.log(lax.stop_gradient(coupling)).astype(
            float_dtype
        ) + jnp.abs(decay).astype(float_dtype)
        return coupling, log_growth

    def _step_control(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
    ) -> PyTree | None:
        """The control over the step, `terms.contr(t0, t1)`, evaluated once and shared
        by `Φ_h`, `Φ_{-h}` (negated: `terms.contr(t1, t0)`, exactly) and the coupling.
        A Brownian increment costs a descent of the `VirtualBrownianTree` each time.
        `None` where the base solver's own step evaluates it (bases without an
        unrolled tableau), or where the control is more than an increment (a Lévy
        area, whose reversal is not a sign flip)."""
        if self.scan_kind is not None or not has_explicit_tableau(self.solver):
            return None
        control = terms.contr(t0, t1)
        leaves = jtu.tree_leaves(control, is_leaf=lambda x: isinstance(x, eqx.Module))
        if not all(eqx.is_inexact_array(x) for x in leaves):
            return None
        return control

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
    `diffrax.LeapfrogMidpoint`, `Reversible` itself) and the underdamped Langevin
    solvers raise a `ValueError`. For SDEs: a Stratonovich base (`diffrax.Heun()`,
    `Midpoint()`, `Ralston()`, `EulerHeun()`), or a stochastic Runge--Kutta solver
    with space-time Lévy area (`diffrax.ShARK()`, `SRA1()`, `SEA()` for additive
    noise; `SPaRK()`, `GeneralShARK()`, `SlowRK()` for general or commutative noise).
- `coupling_parameter`: the coupling `λ` between the two states: `"auto"` (the
    default) to choose it per step from the local decay of the dynamics, as above; or a
    fixed number in `(0, 1]`. A fixed value close to 1 (such as 0.999, the paper's)
    makes the backward reconstruction most stable on oscillatory problems (round-off
    grows like `λ^{-N}` over `N` steps) but is unstable on decaying ones; smaller
    values damp the parasitic mode of the scheme more strongly.
- `scan_kind`: how the stages of a Runge--Kutta base solver are run. `None` (the
    default) unrolls the stages of explicit Runge--Kutta methods: fastest on small
    states, and XLA drops unused stages (or runs them in a loop of its own, see
    `per_stage_vjp`). Any other value (`"checkpointed"`, `"lax"`, `"bounded"`) is
    passed on to the wrapped solver, which then runs its stages in Diffrax's own loop;
    with [`diffrax_reversible.ReversibleAdjoint`][], `"checkpointed"` stores fewer
    stage activations in the backward pass (less memory when the vector field's
    activations are much larger than the state), at 2-3 times the time.
    [`diffrax.DirectAdjoint`][] and [`diffrax.ForwardMode`][] set this themselves.
- `per_stage_vjp`: for large states. `True` runs the stages of an explicit
    Runge--Kutta base solver in a loop, one at a time, and makes
    [`diffrax_reversible.ReversibleAdjoint`][] take their vector-Jacobian products one
    at a time too, evaluating each stage's vector field again inside its own: the
    backward pass then keeps the stage inputs and one stage's activations alive, where
    the unrolled stages (`False`) keep every stage's. That costs one more vector field
    evaluation per stage and a loop's overhead, which is what matters on small states.
    `"auto"` (the default) chooses `True` where the activations of all the stages of
    one base step would exceed 128 KiB and one stage's activations exceed the size of
    what the vector field reads besides the state (its parameters), both measured at
    trace time (so per element under `jax.vmap`). On a 64x64 grid with a pointwise MLP
    (float32, 100 steps), this took the memory of a gradient from 2.6 to 0.74 times
    that of `Tsit5()+RecursiveCheckpointAdjoint()`, and its time from about 8 to under
    2 times: unrolled, XLA re-evaluated earlier stages inside later ones there. A
    Neural ODE on a small state under `jax.vmap` keeps the unrolled stages, which are
    faster there.
"""
