"""`check_stability` and `suggest_coupling`, and the stability helpers on plain solvers.

The references are independent of the code under test: dense eigenvalues of
`jax.jacfwd` of the vector field, closed forms, LAPACK's eigenvalues of the step
matrix, actual solves with `diffrax.diffeqsolve`, and the reconstruction error that
`ReversibleAdjoint` measures.
"""

import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from diffrax_reversible._coupling import auto_coupling


def _assert_same_eigenvalues(estimated, reference, rtol):
    # As sets: every eigenvalue has a close estimate, and every estimate is close to an
    # eigenvalue (sorting would pair conjugates and near-ties arbitrarily).
    estimated, reference = np.asarray(estimated), np.asarray(reference)
    assert estimated.shape == reference.shape
    distances = np.abs(estimated[:, None] - reference[None, :])
    scale = np.max(np.abs(reference))
    assert np.max(np.min(distances, axis=0)) <= rtol * scale
    assert np.max(np.min(distances, axis=1)) <= rtol * scale


def _dense_eigenvalues(vector_field, y0, args=None):
    jacobian = jax.jacfwd(lambda y: vector_field(0.0, y, args))(y0)
    return np.linalg.eigvals(np.asarray(jacobian))


_HEAT_SIZE = 50
_DX = 1 / (_HEAT_SIZE + 1)


def _heat(t, u, args):
    """The heat equation `u_t = u_xx` on (0, 1), at 50 interior points, with Dirichlet
    boundaries. Its eigenvalues are `-4/dx² sin²(kπ/(2(n+1)))`, `k = 1, ..., n`."""
    padded = jnp.pad(u, 1)
    return (padded[2:] - 2 * padded[1:-1] + padded[:-2]) / _DX**2


_HEAT_EIGENVALUES = (
    -4 / _DX**2 * np.sin(np.arange(1, _HEAT_SIZE + 1) * np.pi * _DX / 2) ** 2
)


@pytest.fixture(scope="module")
def heat_report():
    # Shared by two tests: one compilation.
    u0 = jr.normal(jr.PRNGKey(5678), (_HEAT_SIZE,))
    report = dr.check_stability(
        diffrax.ODETerm(_heat), diffrax.Tsit5(), 0.0, 0.1, 1e-4, u0
    )
    return report, u0


def _linear(t, y, matrix):
    return matrix @ y


def _nonlinear(t, y, weights):
    return jnp.tanh(weights @ y) - 0.5 * y + 0.1 * y[::-1] ** 2


def _small_systems(getkey):
    n = 8
    random = jr.normal(getkey(), (n, n))
    skew = random - random.T
    return {
        "random linear": (_linear, jr.normal(getkey(), (n,)), random),
        "nonlinear": (_nonlinear, jr.normal(getkey(), (n,)), random / 2),
        # Eigenvalues ±iω: purely imaginary.
        "rotation": (_linear, jr.normal(getkey(), (n,)), skew),
        # One eigenvalue, repeated: the Krylov space is invariant after one step, and
        # Arnoldi's method must restart rather than report zeros.
        "repeated": (_linear, jr.normal(getkey(), (n,)), -2.0 * jnp.eye(n)),
    }


@pytest.mark.parametrize("name", ["random linear", "nonlinear", "rotation", "repeated"])
def test_eigenvalues_of_small_systems_match_dense(getkey, name):
    vector_field, y0, args = _small_systems(getkey)[name]
    report = dr.check_stability(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, 1.0, 0.01, y0, args
    )
    reference = _dense_eigenvalues(vector_field, y0, args)
    # The state (8 entries) fits in the Krylov space: Arnoldi's method is then a
    # Hessenberg reduction, backward stable, so all eigenvalues are exact to round-off
    # (times their condition numbers, moderate for these small matrices).
    _assert_same_eigenvalues(report.eigenvalues, reference, rtol=1e-9)
    assert report.most_damped_eigenvalue.real == pytest.approx(
        np.min(reference.real), abs=1e-9 * np.max(np.abs(reference))
    )
    assert abs(report.largest_eigenvalue) == pytest.approx(
        np.max(np.abs(reference)), rel=1e-9
    )
    if name == "rotation":
        assert np.max(np.abs(report.eigenvalues.real)) < 1e-12 * np.max(
            np.abs(reference)
        )
        # Nothing decays: the coupling is the largest `auto_coupling` allows.
        assert report.suggested_coupling == pytest.approx(float(auto_coupling(0.0)))


def test_heat_equation_eigenvalues(heat_report):
    report, u0 = heat_report
    most_damped = np.min(_HEAT_EIGENVALUES)
    # With the default 32 Arnoldi steps, fewer than the 50 entries: the extreme
    # eigenvalue converges first (measured 1.1e-4 relative; Ritz values of a symmetric
    # matrix lie inside its spectrum, so it is underestimated).
    assert report.eigenvalues.shape == (32,)
    assert report.most_damped_eigenvalue.real == pytest.approx(most_damped, rel=1e-3)
    assert report.most_damped_eigenvalue.real >= most_damped * (1 + 1e-12)
    assert report.largest_eigenvalue == report.most_damped_eigenvalue
    # With the whole state in the Krylov space: all eigenvalues, against the closed
    # form and against the dense Jacobian.
    full = dr.check_stability(
        diffrax.ODETerm(_heat), diffrax.Tsit5(), 0.0, 0.1, 1e-4, u0, krylov_dim=50
    )
    # Round-off relative to the largest eigenvalue, 1e4.
    _assert_same_eigenvalues(full.eigenvalues, _HEAT_EIGENVALUES, rtol=1e-12)
    _assert_same_eigenvalues(
        full.eigenvalues, _dense_eigenvalues(_heat, u0), rtol=1e-12
    )


def test_large_pytree_state_without_forming_the_jacobian():
    # A 100 x 100 heat equation (10^4 entries, split over two leaves): its dense
    # Jacobian would take 800 MB. Extreme eigenvalue -8/dx² sin²(Nπ/(2(N+1))).
    size = 100
    dx = 1 / (size + 1)

    def heat_2d(t, y, args):
        u = jnp.concatenate([y["top"], y["bottom"]])
        padded = jnp.pad(u, 1)
        laplacian = (
            padded[2:, 1:-1]
            + padded[:-2, 1:-1]
            + padded[1:-1, 2:]
            + padded[1:-1, :-2]
            - 4 * u
        ) / dx**2
        return {"top": laplacian[:50], "bottom": laplacian[50:]}

    u = jr.normal(jr.PRNGKey(5678), (size, size))
    y0 = {"top": u[:50], "bottom": u[50:]}
    report = dr.check_stability(
        diffrax.ODETerm(heat_2d), diffrax.Tsit5(), 0.0, 1.0, 1e-5, y0
    )
    most_damped = -8 / dx**2 * np.sin(size * np.pi / (2 * (size + 1))) ** 2
    # Measured 1.4e-3 relative after 32 Arnoldi steps: the top of this spectrum is
    # tightly clustered.
    assert report.most_damped_eigenvalue.real == pytest.approx(most_damped, rel=5e-3)
    assert abs(report.most_damped_eigenvalue.imag) < 1e-6 * abs(most_damped)
    # The slowest modes are not resolved, so they are assumed neutral: undoing a step
    # then costs at least `1/λ`.
    assert report.reconstruction_growth >= 1 / report.coupling * (1 - 1e-12)


def _heat_solve(coupling, dt, num_steps, u0):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_heat),
        dr.Reversible(diffrax.Tsit5(), coupling_parameter=coupling),
        0.0,
        dt * num_steps,
        dt,
        u0,
        max_steps=num_steps + 1,
        throw=False,
    )
    return sol.result == diffrax.RESULTS.successful, jnp.max(jnp.abs(sol.ys[-1]))


@jax.jit
def _heat_steps(coupling, dt, u0):
    # The solver's own steps, without `diffeqsolve`: every step is taken, whatever
    # the step reports.
    term = diffrax.ODETerm(_heat)
    solver = dr.Reversible(diffrax.Tsit5(), coupling_parameter=coupling)
    state = solver.init(term, 0.0, dt, u0, None)

    def step(carry, _):
        t, y, state = carry
        y, _, _, state, _ = solver.step(term, t, t + dt, y, None, state, False)
        return (t + dt, y, state), jnp.max(jnp.abs(y))

    _, sizes = jax.lax.scan(step, (jnp.zeros(()), u0, state), length=400)
    return sizes


def test_largest_stable_step_against_actual_solves(heat_report):
    report, noise = heat_report
    assert report.stable
    assert report.coupling == report.suggested_coupling
    dt = report.max_stable_dt
    # Below the Tsit5 stability limit on the fastest mode, |z| ≈ 3.5.
    assert 1e-4 < dt < 3.5 / 1e4
    coupling = jnp.asarray(report.coupling)
    below, above = jnp.asarray(0.97 * dt), jnp.asarray(1.5 * dt)

    # A smooth solution with some noise on every mode, the fastest included. (With
    # noise of size 1, the first steps already put the two states of the scheme 5%
    # apart, which `Reversible` reports as a failure; the scheme is still stable, as
    # the steps below show.)
    x = jnp.linspace(0, 1, _HEAT_SIZE + 2)[1:-1]
    u0 = jnp.sin(jnp.pi * x) + 1e-3 * noise
    num_steps = 400
    size0 = float(jnp.max(jnp.abs(u0)))
    # Just below: the heat equation decays, and so does the coupled scheme. (If the
    # limit were 5% lower, the fastest mode would grow by 1.05^400 = 3e8.)
    ok, size = _heat_solve(coupling, below, num_steps, u0)
    assert bool(ok) and float(size) <= size0
    # Well above: the fastest mode grows (or the solver reports that the two states
    # drifted apart, and stops).
    ok, size = _heat_solve(coupling, above, num_steps, u0)
    assert (not bool(ok)) or not float(size) < 1e3 * size0

    # The same with noise of size 1, step by step.
    sizes = _heat_steps(coupling, below, noise)
    assert float(jnp.max(sizes[-100:])) <= float(jnp.max(jnp.abs(noise)))
    sizes = _heat_steps(coupling, above, noise)
    assert not float(sizes[-1]) < 1e3 * float(jnp.max(jnp.abs(noise)))

    # The linear predictions agree: the step matrix's spectral radius on the exact
    # eigenvalues crosses 1 at `max_stable_dt`.
    solver = dr.Reversible(diffrax.Tsit5(), coupling_parameter=report.coupling)
    assert bool(jnp.all(dr.is_linearly_stable(solver, 0.999 * dt, _HEAT_EIGENVALUES)))
    # The estimated extreme eigenvalue is 1e-4 too small, so the true crossing is
    # within 1e-4 below the reported one.
    assert not bool(
        jnp.all(dr.is_linearly_stable(solver, 1.001 * dt, _HEAT_EIGENVALUES))
    )


def test_report_against_dense_references(getkey):
    vector_field, y0, args = _small_systems(getkey)["nonlinear"]
    dt0 = 0.3
    report = dr.check_stability(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, 3.0, dt0, y0, args
    )
    eigenvalues = _dense_eigenvalues(vector_field, y0, args)
    suggested = float(auto_coupling(-dt0 * np.min(eigenvalues.real)))
    # Both from the same eigenvalues, to round-off.
    assert report.suggested_coupling == pytest.approx(suggested, rel=1e-10)
    solver = dr.Reversible(diffrax.Tsit5(), coupling_parameter=suggested)
    radius = float(jnp.max(dr.spectral_radius(solver, dt0 * eigenvalues)))
    assert report.spectral_radius == pytest.approx(radius, rel=1e-10)
    assert report.num_steps == 10
    # A `Reversible` with a numeric coupling is analysed with that coupling.
    fixed = dr.check_stability(
        diffrax.ODETerm(vector_field),
        dr.Reversible(diffrax.Tsit5(), coupling_parameter=0.9),
        0.0,
        3.0,
        dt0,
        y0,
        args,
    )
    assert fixed.coupling == 0.9
    assert fixed.suggested_coupling == report.suggested_coupling
    # `suggest_coupling` is the same number, and works under `jax.jit`.
    jitted = jax.jit(
        lambda y0, args: dr.suggest_coupling(
            diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, dt0, y0, args
        )
    )
    assert float(jitted(y0, args)) == pytest.approx(
        report.suggested_coupling, rel=1e-12
    )


def _stiff_gradient(coupling, adjoint):
    # Notebook 05, section 2d: decay rates 1 and 20 mixed by a rotation, 40 steps.
    angle = jnp.pi / 6
    rotation = jnp.array(
        [[jnp.cos(angle), -jnp.sin(angle)], [jnp.sin(angle), jnp.cos(angle)]]
    )

    def two_rates(t, y, rates):
        return rotation @ (-rates * (rotation.T @ y))

    def loss(rates):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(two_rates),
            dr.Reversible(diffrax.Tsit5(), coupling_parameter=coupling),
            0.0,
            2.0,
            0.05,
            jnp.array([1.0, 1.0]),
            args=rates,
            adjoint=adjoint,
            max_steps=40,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    jax.grad(loss)(jnp.array([1.0, 20.0]))
    return two_rates


def test_suggested_checkpoints_bound_the_measured_reconstruction_error():
    errors = []
    # `reconstruction_tol=None`: measure the error rather than raise on it.
    adjoint = dr.ReversibleAdjoint(
        reconstruction_callback=errors.append, reconstruction_tol=None
    )
    two_rates = _stiff_gradient(0.3, adjoint)
    report = dr.check_stability(
        diffrax.ODETerm(two_rates),
        dr.Reversible(diffrax.Tsit5(), coupling_parameter=0.3),
        0.0,
        2.0,
        0.05,
        jnp.array([1.0, 1.0]),
        jnp.array([1.0, 20.0]),
    )
    [measured] = errors
    # Without checkpoints: both say the reconstruction is useless (measured 26,
    # predicted 2e4: the estimate errs on the safe side, by 3 of the 20 digits lost).
    assert report.needs_checkpoints and not report.float32_safe
    assert float(measured) > report.reconstruction_tol
    assert 1 < report.reconstruction_error / float(measured) < 1e4
    # With the suggested checkpoints: within tolerance.
    assert report.checkpoint_every is not None and 1 < report.checkpoint_every < 40
    errors.clear()
    adjoint = dr.ReversibleAdjoint(
        checkpoint_every=report.checkpoint_every,
        reconstruction_callback=errors.append,
        reconstruction_tol=None,
    )
    _stiff_gradient(0.3, adjoint)
    [measured] = errors
    assert float(measured) <= report.reconstruction_tol


def test_benign_problem_needs_no_checkpoints(getkey):
    vector_field, y0, args = _small_systems(getkey)["rotation"]
    report = dr.check_stability(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, 1.0, 0.01, y0, args
    )
    # 100 steps of `λ = 0.999`: `0.999^{-100}` loses 0.04 digits, plus √100 round-offs.
    assert report.stable
    assert not report.needs_checkpoints and report.checkpoint_every is None
    assert report.float32_safe
    assert report.digits == pytest.approx(-np.log10(np.finfo(np.float64).eps))
    assert report.digits_lost == pytest.approx(
        100 * np.log10(report.reconstruction_growth) + 1
    )


# The stability helpers on plain solvers, and `"auto"`.

_Z = jnp.array([-0.5, -1.0 + 1.0j, 0.3j, -2.0, -3.0 + 0.2j, 0.1])


def test_stability_function_of_plain_solvers():
    # Independent references: the exponential (Tsit5 is 5th order, so
    # R(z) = e^z + O(z^6)) and the known polynomials of Euler and Heun.
    small = 0.05 * _Z
    tsit5 = dr.stability_function(diffrax.Tsit5(), small)
    assert np.allclose(tsit5, jnp.exp(small), rtol=0, atol=1e-9)
    euler = dr.stability_function(diffrax.Euler(), _Z)
    assert np.allclose(euler, 1 + _Z, rtol=0, atol=1e-14)
    heun = dr.stability_function(diffrax.Heun(), _Z)
    assert np.allclose(heun, 1 + _Z + _Z**2 / 2, rtol=0, atol=1e-14)
    # Diffrax's own step of the plain solver, against `Reversible`'s unrolled stages.
    for base in (diffrax.Dopri5(), diffrax.Tsit5()):
        plain = dr.stability_function(base, _Z)
        wrapped = dr.stability_function(dr.Reversible(base), _Z)
        assert np.allclose(plain, wrapped, rtol=1e-13, atol=0)


def test_plain_solver_means_reversible_with_default_coupling():
    z = jax.lax.complex(jnp.linspace(-3, 0.5, 12), jnp.linspace(-2, 2, 12))
    wrapped = dr.Reversible(diffrax.Dopri5())
    plain = diffrax.Dopri5()
    assert np.array_equal(dr.spectral_radius(plain, z), dr.spectral_radius(wrapped, z))
    assert np.array_equal(dr.step_matrix(plain, z), dr.step_matrix(wrapped, z))
    assert np.array_equal(
        dr.is_linearly_stable(plain, 0.3, z), dr.is_linearly_stable(wrapped, 0.3, z)
    )
    with pytest.raises(ValueError, match="Reversible"):
        dr.spectral_radius(diffrax.Kvaerno5(), z)


@pytest.mark.parametrize("coupling", [0.999, 0.5, "auto"])
def test_spectral_radius_against_lapack(coupling):
    solver = dr.Reversible(diffrax.Tsit5(), coupling_parameter=coupling)
    # Including points near 0, where the two eigenvalues (1 and λ) are close.
    z = jnp.concatenate(
        [
            jax.lax.complex(jnp.linspace(-4, 1, 21), jnp.linspace(3, -3, 21)),
            jnp.array([1e-8, -1e-6 + 1e-7j, 0.0]),
        ]
    )
    reference = np.max(
        np.abs(np.linalg.eigvals(np.asarray(dr.step_matrix(solver, z)))), axis=-1
    )
    assert np.allclose(dr.spectral_radius(solver, z), reference, rtol=1e-12, atol=0)


def test_auto_step_matrix_matches_actual_steps():
    # On `y' = a y` the automatic coupling is `auto_coupling((-z - log R(z)) / 2)`
    # (decay `-z`, the solution's growth `log R(z)`), about `auto_coupling(-z)`:
    # three steps of the solver from `y0 = z0 = 1` are `M^3 (1, 1)`.
    a, dt = -2.0, 0.3
    solver = dr.Reversible(diffrax.Tsit5(), coupling_parameter="auto")
    matrix = np.asarray(dr.step_matrix(solver, a * dt))
    growth = float(jnp.log(jnp.abs(dr.stability_function(solver, a * dt))))
    expected_coupling = float(auto_coupling((-a * dt - growth) / 2))
    assert matrix[0, 0] == pytest.approx(expected_coupling, rel=1e-14)
    # Tsit5's `R(z)` is `e^z` up to `O(z^6)`.
    assert expected_coupling == pytest.approx(float(auto_coupling(-a * dt)), rel=1e-4)
    # The determinant is the coupling.
    assert np.linalg.det(matrix) == pytest.approx(matrix[0, 0], rel=1e-12)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: a * y),
        solver,
        0.0,
        3 * dt,
        dt,
        jnp.array(1.0),
        saveat=diffrax.SaveAt(steps=True),
        max_steps=3,
    )
    expected = [
        (np.linalg.matrix_power(matrix, k) @ np.ones(2))[0].real for k in (1, 2, 3)
    ]
    assert np.allclose(sol.ys[:3], expected, rtol=1e-13, atol=0)


def test_check_stability_errors():
    term = diffrax.ODETerm(lambda t, y, args: -y)
    y0 = jnp.ones(3)
    with pytest.raises(ValueError, match="Reversible"):
        dr.check_stability(term, diffrax.ImplicitEuler(), 0.0, 1.0, 0.1, y0)
    with pytest.raises(ValueError, match="dt0"):
        dr.check_stability(term, diffrax.Tsit5(), 0.0, 1.0, 0.0, y0)
    brownian = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(3,), key=jr.PRNGKey(0)
    )
    noise = diffrax.ControlTerm(lambda t, y, args: jnp.eye(3), brownian)
    with pytest.raises(ValueError, match="drift"):
        dr.check_stability(noise, diffrax.Heun(), 0.0, 1.0, 0.1, y0)
    # With a drift, only the drift is linearised: eigenvalues -1.
    sde = diffrax.MultiTerm(term, noise)
    report = dr.check_stability(sde, diffrax.Heun(), 0.0, 1.0, 0.1, y0)
    assert np.allclose(report.eigenvalues, -1.0, rtol=0, atol=1e-12)
