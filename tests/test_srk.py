"""Stochastic Runge--Kutta bases (`AbstractSRK`: ShARK, SRA1, SEA, SPaRK, GeneralShARK,
SlowRK) inside `Reversible`, driven by a `VirtualBrownianTree` with space-time Lévy
area."""

import functools

import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

from . import strong_order
from .helpers import check_against_recursive_checkpoint


_THETA, _SIGMA = 0.7, 0.5
# The noise each tableau is valid for, as Diffrax documents it.
additive_only = {"ShARK": diffrax.ShARK, "SRA1": diffrax.SRA1, "SEA": diffrax.SEA}
general = {
    "SPaRK": diffrax.SPaRK,
    "GeneralShARK": diffrax.GeneralShARK,
    "SlowRK": diffrax.SlowRK,
}
srk_bases = additive_only | general
adaptive = ("ShARK", "SRA1", "SPaRK")  # the ones with an error estimate


def _brownian(key, t1=1.0, tol=2**-14):
    return diffrax.VirtualBrownianTree(
        0.0, t1, tol=tol, shape=(2,), key=key, levy_area=diffrax.SpaceTimeLevyArea
    )


def _terms(brownian, noise):
    drift = lambda t, y, args: -args[0] * y + jnp.tanh(args[1] * y) + jnp.sin(t)
    if noise == "additive":  # time-dependent, state-independent
        matrix = jnp.array([[0.5, 0.1], [0.0, 0.3]])
        diffusion = lambda t, y, args: args[2] * matrix * (1 + 0.2 * t)
    else:  # diagonal, hence commutative
        diffusion = lambda t, y, args: lx.DiagonalLinearOperator(args[2] * jnp.cos(y))
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
    )


_ARGS = jnp.array([0.7, 1.3, 0.9])
# The SDE of `strong_order.DOCUMENTED_ORDERS` whose noise is of the same kind.
_SDE_OF_NOISE = {"additive": "ou", "diagonal": "gbm"}


def _noises(name):
    return ["additive"] if name in additive_only else ["additive", "diagonal"]


@pytest.mark.parametrize("name", srk_bases)
def test_base_step_undone_by_the_backward_step(name):
    # One base step `Φ_h` forward, then `Φ_{-h}` from its end back to its start, as
    # `Reversible` takes them, on the same path: the start comes back up to the base's
    # local error. A wrong sign of the space-time Lévy area over the reversed interval
    # would leave an O(h^1.5) term.
    solver = dr.Reversible(srk_bases[name]())
    noise = _noises(name)[-1]

    @jax.jit
    def round_trip(key, h):
        terms = _terms(_brownian(key), noise)
        x0, t0 = jnp.array([1.0, -0.5]), 0.25
        x1, *_ = solver.base_step(terms, t0, t0 + h, x0, _ARGS)
        back, *_ = solver.base_step(terms, t0 + h, t0, x1, _ARGS)
        return jnp.linalg.norm(back - x0)

    keys = jr.split(jr.key(0), 16)
    hs = [2.0**-k for k in range(3, 8)]
    errors = [float(jnp.mean(jax.vmap(round_trip, (0, None))(keys, h))) for h in hs]
    slope = np.polyfit(np.log2(hs), np.log2(errors), 1)[0]
    # The mean-square local error is of order (strong order + 1/2).
    expected = strong_order.DOCUMENTED_ORDERS[_SDE_OF_NOISE[noise], name] + 0.5
    assert slope > expected - 0.3, f"{name}: slope {slope:.2f}, {errors=}"


@pytest.mark.parametrize("name", ["ShARK", "SlowRK"])
def test_backward_in_time_solve_returns_to_the_start(name):
    # `diffeqsolve` from 1 back to 0, from the end of the solve from 0 to 1 on the same
    # path, returns to the start up to the global error of both. Diffrax 0.7.2's own
    # SRK steps do not (diffrax #598: about 1 here, at every step size).
    solver = dr.Reversible(srk_bases[name]())
    noise = _noises(name)[-1]
    x0 = jnp.array([1.0, -0.5])

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, None))
    def round_trip(key, dt):
        terms = _terms(_brownian(key), noise)
        solve = lambda t0, t1, dt, y0: diffrax.diffeqsolve(
            terms, solver, t0, t1, dt, y0, _ARGS, max_steps=64
        ).ys[-1]
        return jnp.linalg.norm(solve(1.0, 0.0, -dt, solve(0.0, 1.0, dt, x0)) - x0)

    keys = jr.split(jr.key(1), 16)
    dts = [2.0**-k for k in range(2, 6)]
    errors = [float(jnp.mean(round_trip(keys, dt))) for dt in dts]
    slope = np.polyfit(np.log2(dts), np.log2(errors), 1)[0]
    assert errors[-1] < 1e-3 and slope > 1.2, f"{name}: {slope=:.2f}, {errors=}"


@pytest.mark.parametrize("name", srk_bases)
@pytest.mark.parametrize("controller", ["constant", "pid"])
def test_gradients_match_recursive_checkpoint(name, controller):
    if controller == "pid" and name not in adaptive:
        pytest.skip(f"{name} has no error estimate: Diffrax refuses adaptive steps")
    # The most general noise each tableau takes: the additive-noise tableaus run the
    # additive code path of Diffrax's step, the others the general one on any noise.
    terms = _terms(_brownian(jr.key(3)), _noises(name)[-1])
    stepsize_controller = (
        diffrax.PIDController(rtol=1e-4, atol=1e-4)
        if controller == "pid"
        else diffrax.ConstantStepSize()
    )

    def loss(adjoint, y0, args):
        sol = diffrax.diffeqsolve(
            terms,
            dr.Reversible(srk_bases[name]()),
            0.0,
            1.0,
            0.05,
            y0,
            args,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 5)),
            stepsize_controller=stepsize_controller,
            adjoint=adjoint,
            max_steps=400,
        )
        return jnp.sum(sol.ys**2)

    check_against_recursive_checkpoint(loss, jnp.array([1.0, -0.5]), _ARGS)


def _solve(terms, base):
    return diffrax.diffeqsolve(
        terms,
        dr.Reversible(base),
        0.0,
        1.0,
        0.1,
        jnp.array([1.0, -0.5]),
        _ARGS,
        adjoint=dr.ReversibleAdjoint(),
    )


@pytest.mark.parametrize("name", additive_only)
def test_additive_only_tableau_rejects_state_dependent_noise(name):
    with pytest.raises(ValueError, match="independent of y"):  # Diffrax's own error
        _solve(_terms(_brownian(jr.key(0)), "diagonal"), srk_bases[name]())


def test_brownian_path_without_levy_area_is_rejected():
    brownian = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=2**-8, shape=(2,), key=jr.key(0)
    )
    with pytest.raises(ValueError, match="not compatible with solver"):  # Diffrax's own
        _solve(_terms(brownian, "additive"), diffrax.ShARK())


@functools.cache
def _paths_and_exact_solutions(sde):
    keys = jr.split(jr.key(5), 32)
    return keys, strong_order.exact_solutions(sde, keys)


@pytest.mark.parametrize(
    "sde, name",
    [case for case in strong_order.DOCUMENTED_ORDERS if case[1] in srk_bases],
)
def test_strong_order_inside_reversible(sde, name):
    # On an Ornstein--Uhlenbeck process (additive noise) and a geometric Brownian
    # motion (commutative noise), against the exact solution on the same path:
    # `Reversible(base)` keeps the base's strong order.
    # (`benchmarks/srk_strong_order.py` measures it beside the base's own.)
    keys, exact = _paths_and_exact_solutions(sde)
    dts = [2.0**-k for k in range(3, 9)]
    solver = dr.Reversible(srk_bases[name]())
    errors = strong_order.strong_errors(solver, sde, dts, keys, exact)
    slope = strong_order.order(dts, errors)
    documented = strong_order.DOCUMENTED_ORDERS[sde, name]
    assert slope > documented - 0.2, f"{name} on {sde}: {slope=:.2f}, {errors=}"
