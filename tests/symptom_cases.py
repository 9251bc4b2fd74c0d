"""Small versions of Diffrax's documentation examples on which `Reversible(base)` with
the old fixed coupling `coupling_parameter=0.999` is silently wrong.

Each case is a function `case(solver, adjoint, *, dtype=..., throw=True, **kwargs)` that
runs one solve, and the gradient of a scalar loss of it, with the given solver and
adjoint (both under one `eqx.filter_jit`), and returns a dict:

- `"value"`: the forward quantity to compare (a pytree of arrays);
- `"grad"`: the gradient of the case's loss (a pytree of arrays);
- `"scale"`: the size of the solution over the solve. Compare `"value"` relative to the
    larger of the reference's magnitude and this, so that a quantity that decays to
    ~0 (as in `decay`) is measured against the size it started from;
- `"result"`: `sol.result` (pass `throw=False` to get an unsuccessful one back instead
    of an error);
- `"num_steps"`, `"num_rejected_steps"`: from `sol.stats`;
- and a few case-specific extras (e.g. `"t_event"`, `"loss"`).

`case_reference(*, dtype=..., **kwargs)` runs the same case with the base solver and
`diffrax.RecursiveCheckpointAdjoint()`. `CASES` lists `(name, case, reference, base)`
for `benchmarks/trust_cases.py`, with `base()` the explicit solver to wrap in
`Reversible`.

No `test_` functions here: this module only builds the problems.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


def _run(loss: Callable, params: Any) -> tuple[Any, Any]:
    """`loss(params) -> (scalar, aux)`: returns `(aux, gradient)`, compiled."""

    @eqx.filter_jit
    def run(params):
        return eqx.filter_grad(loss, has_aux=True)(params)

    grad, aux = run(params)
    return aux, grad


def _outputs(sol: diffrax.Solution, **extras) -> dict[str, Any]:
    return dict(
        result=sol.result,
        num_steps=sol.stats["num_steps"],
        num_rejected_steps=sol.stats["num_rejected_steps"],
        **extras,
    )


def result_name(result: diffrax.RESULTS) -> str:
    """The name of a concrete `diffrax.RESULTS` item, e.g. `"max_steps_reached"`."""
    for name, item in diffrax.RESULTS._name_to_item.items():
        if bool(result == item):
            return name
    return str(result)


# ------------------------------------------------------------------------------------
# 1. Steady states (docs/examples/steady_state.ipynb).
# ------------------------------------------------------------------------------------


def _relaxation(t, y, args):
    # The docs' `ExponentialDecayToSteadyState`: `y' = s - y`, steady state `s`. Their
    # training starts from `s = 0`: `y' = -y`.
    del t
    return args - y


def steady_state(
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    *,
    dtype=jnp.float64,
    equilibrium: float = 0.0,
    target: float = 0.76,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    max_steps: int = 4096,
    throw: bool = True,
) -> dict[str, Any]:
    """`y' = s - y`, `y(0) = 1`, from `t = 0` to `t1 = inf`, stopped by
    `diffrax.Event(diffrax.steady_state_event())`, with
    `PIDController(rtol=1e-3, atol=1e-6)`; the gradient of `(y_event - 0.76)**2` with
    respect to `s`. (The docs use `max_steps=None`, which `ReversibleAdjoint` rejects.)

    Symptom with `coupling_parameter=0.999`: the parasitic mode grows, the solve never
    reaches the steady state and stops at `max_steps` with `y` overflowed.
    """
    y0 = jnp.asarray(1.0, dtype)

    def loss(s):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_relaxation),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(jnp.inf, dtype),
            None,
            y0,
            s,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            event=diffrax.Event(diffrax.steady_state_event()),
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
        )
        assert sol.ys is not None and sol.ts is not None
        (y1,) = sol.ys
        return (y1 - target) ** 2, _outputs(sol, value=y1, t_event=sol.ts[-1])

    out, grad = _run(loss, jnp.asarray(equilibrium, dtype))
    return dict(out, grad=grad, scale=1.0)


def steady_state_reference(*, dtype=jnp.float64, **kwargs) -> dict[str, Any]:
    return steady_state(
        diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


def decay(
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    *,
    dtype=jnp.float64,
    equilibrium: float = 0.0,
    target: float = 0.76,
    t1: float = 20.0,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    max_steps: int = 4096,
    throw: bool = True,
) -> dict[str, Any]:
    """The steady-state problem on a fixed interval: `y' = s - y`, `y(0) = 1`, on
    `[0, 20]` with `PIDController(rtol=1e-4, atol=1e-6)`; the gradient of
    `(y(20) - 0.76)**2` with respect to `s`. Exact: `y(20) = s + (1 - s) e^{-20}`.

    Symptom with `coupling_parameter=0.999`: `y(20)` is O(1e3) instead of 2e-9, with a
    successful result.
    """
    y0 = jnp.asarray(1.0, dtype)

    def loss(s):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_relaxation),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            None,
            y0,
            s,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
        )
        assert sol.ys is not None
        (y1,) = sol.ys
        return (y1 - target) ** 2, _outputs(sol, value=y1)

    out, grad = _run(loss, jnp.asarray(equilibrium, dtype))
    return dict(out, grad=grad, scale=1.0)


def decay_reference(*, dtype=jnp.float64, **kwargs) -> dict[str, Any]:
    return decay(
        diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


# ------------------------------------------------------------------------------------
# 2. Kalman filter (docs/examples/kalman_filter.ipynb).
# ------------------------------------------------------------------------------------


def _harmonic_oscillator(damping: float, dtype):
    a = jnp.array([[0.0, 1.0], [-1.0, -2 * damping]], dtype)
    c = jnp.array([[0.0, 1.0]], dtype)
    return a, c  # `B u = 0`: the example has no input.


def _oscillator_from_rest(damping: float, ts):
    # The exact solution of `x' = A x` for `_harmonic_oscillator(damping)` (damped
    # less than critically) from `x(0) = (1, 0)`.
    omega = (1 - damping**2) ** 0.5
    decay = jnp.exp(-damping * ts)
    position = decay * (jnp.cos(omega * ts) + damping / omega * jnp.sin(omega * ts))
    velocity = -decay * jnp.sin(omega * ts) / omega
    return jnp.stack([position, velocity], axis=-1)


class _KalmanFilter(eqx.Module):
    # The continuous-time Kalman filter of the docs, with `u = 0`: the mean `x` and
    # the covariance `P` (a Riccati equation), driven by the measurements `y_t`.
    a: jax.Array
    c: jax.Array
    y_t: diffrax.LinearInterpolation

    def __call__(self, t, state, args):
        x, p = state
        q, r_inv = args
        a, c = self.a, self.c
        k = p @ c.T @ r_inv
        dp = a @ p + p @ a.T + q - p @ c.T @ r_inv @ c @ p
        dx = a @ x + k @ (self.y_t.evaluate(t) - c @ x)
        return dx, dp


def kalman_filter(
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    *,
    dtype=jnp.float64,
    dt0: float = 0.01,
    t_end: float = 5.0,
    throw: bool = True,
) -> dict[str, Any]:
    """The docs' filter (a harmonic oscillator with damping 0.7 as model, data from
    damping 0.3 plus unit measurement noise, `P0 = 10 I`, `Q_root = 0.1 I`,
    `R_root = I`), constant steps `dt0 = 0.01` on `ts = arange(0, 5, 0.01)`, saved at
    `ts`; the gradient of the MSE of the filtered state against the true one with
    respect to `(Q_root, R_root)`. The value is the covariance `P` at the last time.

    The true trajectory (damping 0.3, from `x(0) = (1, 0)`) is the exact solution
    instead of a `Dopri5` solve, so the data do not depend on the solver under test.

    Symptom with `coupling_parameter=0.999`: `P` at the end is ~10x too large (the
    Riccati equation decays quickly from `P0 = 10 I`), and the gradient is off.
    """
    ts = jnp.arange(0.0, t_end, dt0, dtype=dtype)
    a_model, c = _harmonic_oscillator(0.7, dtype)
    xs = _oscillator_from_rest(0.3, ts)
    noise = jr.normal(jr.PRNGKey(1), (ts.shape[0], 1), dtype)
    ys = xs @ c.T + noise
    vector_field = _KalmanFilter(a_model, c, diffrax.LinearInterpolation(ts=ts, ys=ys))
    state0 = (jnp.zeros(2, dtype), 10 * jnp.eye(2, dtype=dtype))
    params = (0.1 * jnp.eye(2, dtype=dtype), jnp.eye(1, dtype=dtype))

    def loss(params):
        q_root, r_root = params
        # `Q = Q_root^T Q_root`, `R = R_root^T R_root` are positive definite; computed
        # once per solve rather than in every evaluation of the vector field.
        args = (q_root.T @ q_root, jnp.linalg.inv(r_root.T @ r_root))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            solver,
            ts[0],
            ts[-1],
            jnp.asarray(dt0, dtype),
            state0,
            args,
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=adjoint,
            throw=throw,
        )
        assert sol.ys is not None
        x_hat, p = sol.ys
        mse = jnp.mean((xs - x_hat) ** 2)
        return mse, _outputs(sol, value=p[-1], loss=mse)

    out, grad = _run(loss, params)
    return dict(out, grad=dict(Q_root=grad[0], R_root=grad[1]), scale=0.0)


def kalman_filter_reference(*, dtype=jnp.float64, **kwargs) -> dict[str, Any]:
    return kalman_filter(
        diffrax.Dopri5(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


# ------------------------------------------------------------------------------------
# 3. Nonlinear heat PDE (docs/examples/nonlinear_heat_pde.ipynb), and linear diffusion.
# ------------------------------------------------------------------------------------


class _Heat(eqx.Module):
    # `y' = κ (1 - y) Δy` (the docs' PDE), or `y' = κ Δy`, on a uniform grid of
    # [-1, 1]; Dirichlet boundaries: the end values are held fixed.
    dx: float = eqx.field(static=True)
    nonlinear: bool = eqx.field(static=True)

    def __call__(self, t, y, kappa):
        del t
        laplacian = (jnp.roll(y, 1) - 2 * y + jnp.roll(y, -1)) / self.dx**2
        laplacian = laplacian.at[0].set(0).at[-1].set(0)
        if self.nonlinear:
            return kappa * (1 - y) * laplacian
        return kappa * laplacian


def _heat(
    solver,
    adjoint,
    *,
    nonlinear: bool,
    dtype=jnp.float64,
    n: int = 50,
    t_final: float = 0.1,
    dt0: float = 1e-4,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    dtmax: float | None = 1e-3,
    num_saves: int = 11,
    max_steps: int = 4096,
    throw: bool = True,
) -> dict[str, Any]:
    x = jnp.linspace(-1.0, 1.0, n, dtype=dtype)
    y0 = x**2
    vector_field = _Heat(dx=2.0 / (n - 1), nonlinear=nonlinear)
    ts = jnp.linspace(0.0, t_final, num_saves, dtype=dtype)
    controller = diffrax.PIDController(
        pcoeff=0.3, icoeff=0.4, rtol=rtol, atol=atol, dtmax=dtmax
    )

    def loss(kappa):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            solver,
            ts[0],
            ts[-1],
            jnp.asarray(dt0, dtype),
            y0,
            kappa,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
        )
        assert sol.ys is not None
        return jnp.mean(sol.ys**2), _outputs(sol, value=sol.ys[-1])

    out, grad = _run(loss, jnp.asarray(1.0, dtype))
    return dict(out, grad=grad, scale=1.0)


def heat_pde(
    solver: diffrax.AbstractSolver, adjoint: diffrax.AbstractAdjoint, **kwargs
) -> dict[str, Any]:
    """The docs' nonlinear heat equation `y' = κ (1 - y) Δy` on 50 points of [-1, 1],
    `y(0, x) = x^2`, with their `PIDController(pcoeff=0.3, icoeff=0.4, dtmax=1e-3)`
    and `dt0 = 1e-4`, solved by an explicit base instead of their Crank--Nicolson;
    smaller than the docs: `t` in [0, 0.1], `rtol = atol = 1e-6`. The gradient of the
    mean square of the saved solutions with respect to `κ = 1`. The value is `y` at
    `t_final`.

    Symptom with `coupling_parameter=0.999`: the adaptive solve stalls (step after
    step rejected) and stops at `max_steps`.

    Keyword arguments (`dtype`, `n`, `t_final`, `dt0`, `rtol`, `atol`, `dtmax`,
    `num_saves`, `max_steps`, `throw`) as `_heat`.
    """
    return _heat(solver, adjoint, nonlinear=True, **kwargs)


def heat_pde_reference(*, dtype=jnp.float64, **kwargs) -> dict[str, Any]:
    return heat_pde(
        diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


def linear_diffusion(
    solver: diffrax.AbstractSolver, adjoint: diffrax.AbstractAdjoint, **kwargs
) -> dict[str, Any]:
    """As `heat_pde`, for the linear diffusion `y' = κ Δy`.

    Symptom: the gradient with respect to `κ` is wrong by orders of magnitude.
    """
    return _heat(solver, adjoint, nonlinear=False, **kwargs)


def linear_diffusion_reference(*, dtype=jnp.float64, **kwargs) -> dict[str, Any]:
    return linear_diffusion(
        diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


# ------------------------------------------------------------------------------------
# 4. Second-order sensitivities (docs/examples/hessian.ipynb).
# ------------------------------------------------------------------------------------


def _lotka_volterra(t, y, args):
    del t
    prey, predator = y
    alpha, beta, gamma, delta = args
    d_prey = alpha * prey - beta * prey * predator
    d_predator = -gamma * predator + delta * prey * predator
    return d_prey, d_predator


def lotka_volterra(
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    *,
    dtype=jnp.float32,
    t1: float = 140.0,
    dt0: float = 0.1,
    throw: bool = True,
) -> dict[str, Any]:
    """The docs' Lotka--Volterra problem, `args = (0.1, 0.02, 0.4, 0.02)`,
    `y0 = (10, 10)`, 1400 constant steps of `dt0 = 0.1` to `t1 = 140`, in float32
    (times too); the gradient of the final prey with respect to `y0` (the docs take
    its Hessian). The value is the final `(prey, predator)`.

    Symptom with `coupling_parameter=0.999`: the forward solve is fine, the gradient
    is wrong by orders of magnitude (float32 round-off amplified by the
    reconstruction over 1400 steps).
    """
    args = tuple(jnp.asarray(a, dtype) for a in (0.1, 0.02, 0.4, 0.02))

    def loss(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_lotka_volterra),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            jnp.asarray(dt0, dtype),
            y0,
            args,
            adjoint=adjoint,
            throw=throw,
        )
        assert sol.ys is not None
        (prey,), (predator,) = sol.ys
        return prey, _outputs(sol, value=jnp.stack([prey, predator]))

    out, grad = _run(loss, (jnp.asarray(10.0, dtype), jnp.asarray(10.0, dtype)))
    return dict(out, grad=jnp.stack(grad), scale=0.0)


def lotka_volterra_reference(*, dtype=jnp.float32, **kwargs) -> dict[str, Any]:
    return lotka_volterra(
        diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


# ------------------------------------------------------------------------------------
# 5. Underdamped Langevin diffusion (docs/examples/underdamped_langevin_example.ipynb).
# ------------------------------------------------------------------------------------


def _langevin_drift(t, y, args):
    # `dx = v dt`, `dv = (-γ v - u ∇f(x)) dt + ...` with `f(x) = |x|^2`: `∇f = 2 x`.
    del t
    gamma, u = args
    x, v = y[:2], y[2:]
    return jnp.concatenate([v, -gamma * v - u * 2 * x])


def _langevin_diffusion(t, y, args):
    # `... + sqrt(2 γ u) dW` on the velocities only: a 4x2 matrix.
    del t
    gamma, u = args
    return jnp.concatenate(
        [jnp.zeros((2, 2), y.dtype), jnp.diag(jnp.sqrt(2 * gamma * u))]
    )


def underdamped_langevin(
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    *,
    dtype=jnp.float32,
    t1: float = 20.0,
    dt0: float = 0.05,
    key=jr.PRNGKey(0),
    throw: bool = True,
) -> dict[str, Any]:
    """The docs' underdamped Langevin diffusion in 2 dimensions (`γ = (2, 0.5)`,
    `u = (0.5, 2)`, `f(x) = |x|^2`, `x0 = v0 = 0`), on `[0, 20]` with constant steps
    `dt0 = 0.05`, float32, on a `VirtualBrownianTree(tol=0.01)`, written as an
    `ODETerm` drift plus a `ControlTerm` diffusion for a Stratonovich base such as
    `Heun` (the docs use `QUICSORT`; the noise is additive, so Itô = Stratonovich).
    The value is the mean of `x^2` over the 401 step times and both coordinates; the
    gradient is that of the value with respect to `(γ, u)`.

    Symptom with `coupling_parameter=0.999`: the parasitic mode grows from the
    noise, `mean x^2` is O(1e6) instead of O(0.4).
    """
    args = (jnp.array([2.0, 0.5], dtype), jnp.array([0.5, 2.0], dtype))
    t0 = jnp.asarray(0.0, dtype)
    t1_ = jnp.asarray(t1, dtype)
    brownian = diffrax.VirtualBrownianTree(
        t0, t1_, tol=0.01, shape=jax.ShapeDtypeStruct((2,), dtype), key=key
    )
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(_langevin_drift),
        diffrax.ControlTerm(_langevin_diffusion, brownian),
    )
    num_steps = round(t1 / dt0)
    ts = jnp.linspace(t0, t1_, num_steps + 1, dtype=dtype)

    def loss(args):
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            t0,
            t1_,
            jnp.asarray(dt0, dtype),
            jnp.zeros(4, dtype),
            args,
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=adjoint,
            throw=throw,
        )
        assert sol.ys is not None
        mean_x2 = jnp.mean(sol.ys[:, :2] ** 2)
        return mean_x2, _outputs(sol, value=mean_x2)

    out, grad = _run(loss, args)
    return dict(out, grad=dict(gamma=grad[0], u=grad[1]), scale=0.0)


def underdamped_langevin_reference(*, dtype=jnp.float32, **kwargs) -> dict[str, Any]:
    return underdamped_langevin(
        diffrax.Heun(), diffrax.RecursiveCheckpointAdjoint(), dtype=dtype, **kwargs
    )


# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[..., dict[str, Any]]
    reference: Callable[..., dict[str, Any]]
    base: Callable[[], diffrax.AbstractSolver]


CASES = (
    Case("steady_state", steady_state, steady_state_reference, diffrax.Tsit5),
    Case("decay", decay, decay_reference, diffrax.Tsit5),
    Case("kalman_filter", kalman_filter, kalman_filter_reference, diffrax.Dopri5),
    Case("heat_pde", heat_pde, heat_pde_reference, diffrax.Tsit5),
    Case(
        "linear_diffusion", linear_diffusion, linear_diffusion_reference, diffrax.Tsit5
    ),
    Case("lotka_volterra", lotka_volterra, lotka_volterra_reference, diffrax.Tsit5),
    Case(
        "underdamped_langevin",
        underdamped_langevin,
        underdamped_langevin_reference,
        diffrax.Heun,
    ),
)
