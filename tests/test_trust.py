"""Reconstruction-error diagnostics, checkpoints, and the linear stability helper."""

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .helpers import rel_error


def _damped_rotation(t, y, args):
    rotation, damping = args
    return -damping * y + jnp.tanh(rotation @ y)


def _gradient(adjoint, dtype, num_steps, *, coupling=0.999, damping=0.3, t1=10.0):
    rotation = jnp.array([[0.0, 1.0], [-1.0, 0.0]], dtype)
    args = (rotation, jnp.asarray(damping, dtype))
    y0 = jnp.array([1.0, 2.0], dtype)
    solver = dr.Reversible(diffrax.Tsit5(), coupling_parameter=coupling)

    def loss(args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_damped_rotation),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            jnp.asarray(t1 / num_steps, dtype),
            y0,
            args,
            adjoint=adjoint,
            max_steps=num_steps,
        )
        return jnp.sum(sol.ys**2)

    grads = jax.grad(loss)(args)
    # In float64, to compare float32 gradients with a float64 reference.
    return jax.tree_util.tree_map(lambda g: g.astype(jnp.float64), grads)


def _recorded_errors(**kwargs):
    errors = []
    adjoint = dr.ReversibleAdjoint(
        reconstruction_callback=errors.append, reconstruction_tol=None, **kwargs
    )
    return adjoint, errors


def test_diagnostic_at_round_off_when_benign():
    adjoint, errors = _recorded_errors()
    _gradient(adjoint, jnp.float64, 100)
    [error] = errors
    assert 0 <= float(error) < 1e-13


def test_diagnostic_catches_drift():
    # float32, a small coupling and a long horizon: λ^{-N} = 2^{2000}.
    adjoint, errors = _recorded_errors()
    _gradient(adjoint, jnp.float32, 2000, coupling=0.5)
    [error] = errors
    assert not float(error) < 1e-2

    with pytest.raises(Exception, match="reconstruction_tol"):
        _gradient(
            dr.ReversibleAdjoint(reconstruction_tol=1e-3),
            jnp.float32,
            2000,
            coupling=0.5,
        )


def test_fixed_coupling_on_strong_decay_stops_the_solve():
    # Damping 5, h = 0.1, λ = 0.999: the parasitic mode grows by λ e^{0.5} = 1.65 per
    # step. (Before the forward check, the solve returned garbage and the backward pass
    # measured a reconstruction error above 1.)
    with pytest.warns(RuntimeWarning, match="coupled scheme is unstable"):
        with pytest.raises(Exception, match="coupled scheme is unstable"):
            _gradient(dr.ReversibleAdjoint(), jnp.float64, 100, damping=5.0)


def test_auto_coupling_on_strong_decay_reconstructs_exactly():
    # The same problem with the automatic coupling: stable, and undoing it loses
    # nothing (every mode decays at about the same rate, so the round-off amplified by
    # e^{a T} is relative to a state that decayed by as much).
    adjoint, errors = _recorded_errors()
    kwargs = dict(damping=5.0, coupling="auto")
    ours = _gradient(adjoint, jnp.float64, 100, **kwargs)
    ref = _gradient(diffrax.RecursiveCheckpointAdjoint(), jnp.float64, 100, **kwargs)
    assert float(errors[0]) < 1e-11
    assert rel_error(ours, ref) < 1e-8


def test_auto_coupling_on_sde_paths_through_zero_reconstructs_exactly():
    # Ornstein--Uhlenbeck paths around 0 cross zero often, and near zero the norm of
    # the solution shrinks by far more than the dynamics decay. Taken for decay, this
    # drove `λ` to its floor 0.01, and undoing such steps amplified round-off by 100
    # each: here 7e-12 instead of 6e-16, and in the Neural SDE notebook up to 8e-4 in
    # float64 over 40 steps (a false alarm of the reconstruction check; the gradient
    # was right).
    dtype = jnp.float64
    drift = lambda t, y, args: -args[0] * y
    diffusion = lambda t, y, args: args[1] * jnp.ones((1, 1), dtype)
    solver = dr.Reversible(diffrax.Heun())

    def loss(args, adjoint, key):
        brownian = diffrax.VirtualBrownianTree(0.0, 3.0, tol=0.01, shape=(1,), key=key)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
        )
        y0 = jnp.ones(1, dtype)
        sol = diffrax.diffeqsolve(
            terms, solver, 0.0, 3.0, 3.0 / 40, y0, args, adjoint=adjoint
        )
        return jnp.sum(sol.ys**2)

    def grads(adjoint):
        keys = jax.random.split(jax.random.PRNGKey(0), 256)
        batch = lambda args: jnp.sum(jax.vmap(lambda k: loss(args, adjoint, k))(keys))
        args = (jnp.asarray(1.0, dtype), jnp.asarray(1.0, dtype))
        return jax.jit(jax.grad(batch))(args)

    adjoint, errors = _recorded_errors()
    ours = grads(adjoint)
    assert float(np.max(errors[0])) < 1e-13
    assert rel_error(ours, grads(diffrax.RecursiveCheckpointAdjoint())) < 1e-8


def test_tolerance_passes_when_benign():
    ours = _gradient(dr.ReversibleAdjoint(reconstruction_tol=1e-10), jnp.float64, 100)
    ref = _gradient(diffrax.RecursiveCheckpointAdjoint(), jnp.float64, 100)
    assert rel_error(ours, ref) < 1e-8


def test_checkpoints_bound_float32_drift():
    # 10 000 float32 steps: λ^{-N} = e^{10} amplifies the reconstruction's round-off.
    reference = _gradient(diffrax.RecursiveCheckpointAdjoint(), jnp.float64, 10_000)
    plain, plain_errors = _recorded_errors()
    checkpointed, checkpointed_errors = _recorded_errors(checkpoint_every=100)
    error_plain = rel_error(_gradient(plain, jnp.float32, 10_000), reference)
    error_checkpointed = rel_error(
        _gradient(checkpointed, jnp.float32, 10_000), reference
    )
    error_float32_rca = rel_error(
        _gradient(diffrax.RecursiveCheckpointAdjoint(), jnp.float32, 10_000), reference
    )
    assert error_checkpointed < 0.2 * error_plain
    assert error_checkpointed < 3 * error_float32_rca + 1e-6
    assert float(checkpointed_errors[0]) < 0.1 * float(plain_errors[0])


@pytest.mark.parametrize("checkpoint_every", [1, 7])
def test_checkpoints_exact_gradients(checkpoint_every):
    def loss(adjoint, y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_damped_rotation),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            3.0,
            0.1,
            y0,
            args,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.5, 2.5, 5), steps=True),
            stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
            adjoint=adjoint,
            max_steps=100,
        )
        return jnp.sum(jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0) ** 2)

    y0 = jnp.array([1.0, 2.0])
    args = (jnp.array([[0.0, 1.0], [-1.0, 0.0]]), jnp.array(0.3))
    grad = lambda adjoint: jax.grad(loss, argnums=(1, 2))(adjoint, y0, args)
    ours = grad(dr.ReversibleAdjoint(checkpoint_every=checkpoint_every))
    ref = grad(diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(ours, ref) < 1e-8


def _temp_bytes(checkpoint_every, state_size=256, max_steps=2000):
    def loss(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -jnp.tanh(y)),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            1.0,
            1.0 / max_steps,
            y0,
            adjoint=dr.ReversibleAdjoint(checkpoint_every=checkpoint_every),
            max_steps=max_steps,
        )
        return jnp.sum(sol.ys**2)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(state_size)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_checkpoint_memory_grows_as_steps_over_k():
    # Deterministic: bytes of the compiled program. Each checkpoint is (y, z): 2 × 256
    # float64 = 4 KiB.
    state_bytes = 2 * 256 * 8
    plain = _temp_bytes(None)
    for every in (10, 100):
        extra = _temp_bytes(every) - plain
        expected = (2000 // every + 1) * state_bytes
        assert 0.9 * expected <= extra <= 1.1 * expected + 64 * 1024, (every, extra)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_checkpoint_every_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="checkpoint_every"):
        dr.ReversibleAdjoint(checkpoint_every=bad)


def test_reconstruction_tol_must_be_positive():
    with pytest.raises(ValueError, match="reconstruction_tol"):
        dr.ReversibleAdjoint(reconstruction_tol=0.0)


def test_stability_function_of_known_bases():
    z = jnp.array([-0.5, -1.0 + 1.0j, 0.3j, -2.0])
    euler = dr.stability_function(dr.Reversible(diffrax.Euler()), z)
    assert np.allclose(euler, 1 + z, atol=1e-14)
    heun = dr.stability_function(dr.Reversible(diffrax.Heun()), z)
    assert np.allclose(heun, 1 + z + z**2 / 2, atol=1e-14)
    # Tsit5 is 5th order: R(z) = e^z + O(z^6).
    small = 0.05 * z
    tsit5 = dr.stability_function(dr.Reversible(diffrax.Tsit5()), small)
    assert np.allclose(tsit5, jnp.exp(small), atol=1e-9)


@pytest.mark.parametrize("coupling", [0.999, 0.5])
@pytest.mark.parametrize("base", [diffrax.Euler(), diffrax.Tsit5()])
def test_step_matrix_matches_a_reversible_step(base, coupling):
    # Independent reference: one actual step of the solver on `y' = a y`.
    solver = dr.Reversible(base, coupling_parameter=coupling)
    a, dt = -1.3, 0.4
    term = diffrax.ODETerm(lambda t, y, args: a * y)
    y0, z0 = jnp.array(0.7), jnp.array(-0.2)
    state0 = eqx.tree_at(lambda s: s.z, solver.init(term, 0.0, dt, y0, None), z0)
    y1, _, _, state1, _ = solver.step(term, 0.0, dt, y0, None, state0, False)
    matrix = dr.step_matrix(solver, a * dt)
    expected = np.asarray(matrix) @ np.array([y0, z0])
    assert np.allclose(expected, jnp.array([y1, state1.z]), atol=1e-14)


def test_is_linearly_stable_predicts_growth():
    # Predicted stable ⇔ 2000 steps of the scheme stay bounded on `y' = a y`.
    solver = dr.Reversible(diffrax.Heun(), coupling_parameter=0.5)
    eigenvalues = jnp.array([-0.02, -0.5, -4.0, -6.0, 2.0j, -1.0 + 2.0j])
    dt = 0.5
    predicted = dr.is_linearly_stable(solver, dt, eigenvalues)
    matrices = dr.step_matrix(solver, dt * eigenvalues)
    with np.errstate(all="ignore"):  # The unstable ones overflow.
        grown = [
            np.abs(np.linalg.matrix_power(np.asarray(m), 2000) @ np.ones(2)).max()
            for m in matrices
        ]
    for stable, growth in zip(predicted, grown):
        assert bool(stable) == (growth < 10), (stable, growth)
    assert bool(predicted.any()) and not bool(predicted.all())


def test_stability_helpers_vectorise():
    solver = dr.Reversible(diffrax.Tsit5())
    z = jax.lax.complex(jnp.linspace(-3, 0.5, 12), jnp.ones(12)).reshape(3, 4)
    assert dr.spectral_radius(solver, z).shape == (3, 4)
    assert dr.step_matrix(solver, z).shape == (3, 4, 2, 2)
