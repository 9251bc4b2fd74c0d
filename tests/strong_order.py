"""Strong errors and orders of SDE solvers on SDEs with known solutions on the same
Brownian path: shared by `tests/test_srk.py` and `benchmarks/srk_strong_order.py`.

- Ornstein--Uhlenbeck, additive noise: `dX = -θ X dt + σ dW`. Its solution
  `X(t) = e^{-θt} X0 + σ ∫_0^t e^{-θ(t-u)} dW(u)` is integrated exactly on a fine grid
  of width `δ` from the path's increments and space-time Lévy areas: over `[s, s+δ]`,
  `∫ e^{-θ(s+δ-u)} dW(u) = e^{-θδ} (W + θ δ (W/2 - H)) + O(θ² δ^{5/2})`, using
  `∫ (u - s) dW(u) = δ (W/2 - H)`.
- Geometric Brownian motion, diagonal (so commutative) noise, Stratonovich:
  `dX = μ X dt + σ X ∘ dW`, solved by `X(t) = X0 exp(μ t + σ W(t))`.

Errors are root-mean-square over paths of `|X_N - X(1)|` at `t = 1`; the order is the
least-squares slope of `log2(error)` against `log2(dt)`.
"""

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np


THETA, SIGMA_OU = 1.0, 0.8
MU, SIGMA_GBM = 0.3, 0.6
X0 = np.array([1.0, -0.5])
FINE_LEVELS = 12  # the exact OU solution's grid: 2^-12
TOL = 2.0**-14

# The noise each SRK tableau is valid for, as Diffrax documents it, and its strong
# order there; `Heun` for comparison.
DOCUMENTED_ORDERS = {
    ("ou", "Heun"): 1.0,
    ("ou", "ShARK"): 1.5,
    ("ou", "SRA1"): 1.5,
    ("ou", "SEA"): 1.0,
    ("ou", "SPaRK"): 1.5,
    ("ou", "GeneralShARK"): 1.5,
    ("ou", "SlowRK"): 1.5,
    ("gbm", "Heun"): 1.0,
    ("gbm", "SPaRK"): 1.0,
    ("gbm", "GeneralShARK"): 1.0,
    ("gbm", "SlowRK"): 1.5,
}


def brownian(key) -> diffrax.VirtualBrownianTree:
    return diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=TOL, shape=(2,), key=key, levy_area=diffrax.SpaceTimeLevyArea
    )


def terms(sde: str, path) -> diffrax.MultiTerm:
    if sde == "ou":
        drift = lambda t, y, args: -THETA * y
        diffusion = lambda t, y, args: SIGMA_OU * jnp.eye(2)
    else:
        drift = lambda t, y, args: MU * y
        diffusion = lambda t, y, args: lx.DiagonalLinearOperator(SIGMA_GBM * y)
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, path)
    )


def exact_solution(sde: str, path) -> jax.Array:
    """The solution at `t = 1` on `path`."""
    if sde == "gbm":
        return X0 * jnp.exp(MU + SIGMA_GBM * path.evaluate(0.0, 1.0))
    delta = 2.0**-FINE_LEVELS
    decay = jnp.exp(-THETA * delta)

    def fine_step(x, s):
        increment = path.evaluate(s, s + delta, use_levy=True)
        W, H = increment.W, increment.H
        noise = SIGMA_OU * (W + THETA * delta * (W / 2 - H))
        return decay * (x + noise), None

    grid = jnp.arange(2**FINE_LEVELS, dtype=jnp.result_type(float)) * delta
    x1, _ = jax.lax.scan(fine_step, jnp.asarray(X0), grid)
    return x1


def exact_solutions(sde: str, keys) -> jax.Array:
    """The solutions at `t = 1` on the paths of `keys`."""
    return jax.jit(jax.vmap(lambda key: exact_solution(sde, brownian(key))))(keys)


def strong_errors(
    solver: diffrax.AbstractSolver,
    sde: str,
    dts: list[float],
    keys,
    exact: jax.Array,
) -> np.ndarray:
    """Root-mean-square errors at `t = 1` of `solver` with constant steps `dts`, over
    the Brownian paths of `keys`, against their `exact_solutions`."""

    def solve(key, dt):
        sol = diffrax.diffeqsolve(
            terms(sde, brownian(key)),
            solver,
            0.0,
            1.0,
            dt,
            jnp.asarray(X0),
            max_steps=int(round(1 / min(dts))) + 1,
        )
        return sol.ys[-1]

    solve_all = jax.jit(jax.vmap(solve, in_axes=(0, None)))
    errors = [jnp.sum((solve_all(keys, dt) - exact) ** 2, axis=-1) for dt in dts]
    return np.array([float(jnp.sqrt(jnp.mean(e))) for e in errors])


def order(dts, errors) -> float:
    return float(np.polyfit(np.log2(dts), np.log2(errors), 1)[0])
