import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax
import pytest

from .helpers import check_against_recursive_checkpoint, grad_tol, rel_error


# Bases whose reversible scheme is an SDE solver here (see `test_strong_order`).
sde_bases = {
    "Heun": diffrax.Heun,
    "Midpoint": diffrax.Midpoint,
    "Ralston": diffrax.Ralston,
    "EulerHeun": diffrax.EulerHeun,
}
adaptive_sde_bases = ("Heun", "Midpoint", "Ralston")


def _brownian(key, shape=(2,), dtype=jnp.float64, t1=1.0, tol=2**-12):
    return diffrax.VirtualBrownianTree(
        0.0, t1, tol=tol, shape=jax.ShapeDtypeStruct(shape, dtype), key=key
    )


def _sde_terms(brownian, diagonal=False):
    drift = lambda t, y, args: -args[0] * y + jnp.sin(t)
    if diagonal:
        diffusion = lambda t, y, args: lx.DiagonalLinearOperator(args[1] * jnp.cos(y))
    else:
        diffusion = lambda t, y, args: (
            args[1] * jnp.stack([jnp.cos(y), jnp.sin(y[::-1])])
        )
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
    )


@pytest.mark.parametrize("base", sde_bases)
@pytest.mark.parametrize("controller", ["constant", "pid"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_sde_gradients_match_recursive_checkpoint(base, controller, diagonal):
    if controller == "pid" and base not in adaptive_sde_bases:
        pytest.skip("Diffrax allows adaptive SDE steps only with an error estimate")
    brownian = _brownian(jr.PRNGKey(5678))
    stepsize_controller = (
        diffrax.ConstantStepSize()
        if controller == "constant"
        else diffrax.PIDController(rtol=1e-3, atol=1e-3)
    )

    def loss(y0, args, adjoint):
        sol = diffrax.diffeqsolve(
            _sde_terms(brownian, diagonal),
            dr.Reversible(sde_bases[base]()),
            0.0,
            1.0,
            0.02,
            y0,
            args,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 6)),
            stepsize_controller=stepsize_controller,
            adjoint=adjoint,
            max_steps=2048,
        )
        return jnp.sum(sol.ys**2)

    y0 = jnp.array([1.0, 0.5])
    args = (jnp.array(0.7), jnp.array(0.4))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = grad(y0, args, dr.ReversibleAdjoint())
    ref_grads = grad(y0, args, diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


@pytest.mark.parametrize("key", [jr.key, jr.PRNGKey], ids=["typed", "raw"])
def test_sde_with_typed_prng_key(key):
    # `jax.random.key` makes a typed key array, which the Brownian tree holds: the
    # custom VJP must pass it through untouched (it raised a `ValueError` before).
    brownian = _brownian(key(5678))

    def loss(adjoint, y0, args):
        sol = diffrax.diffeqsolve(
            _sde_terms(brownian),
            dr.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.05,
            y0,
            args,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    check_against_recursive_checkpoint(
        loss, jnp.array([1.0, 0.5]), (jnp.array(0.7), jnp.array(0.4))
    )


@pytest.mark.parametrize("base", ["Heun", "Midpoint"])
def test_backward_base_step_reuses_the_negated_control(base):
    # `Reversible` evaluates the control (a Brownian increment) once per step, and
    # drives `Φ_{-h}` with its negation: the same numbers as `terms.contr(t1, t0)`,
    # so a step is bitwise the base solver's own backward step.
    terms = _sde_terms(_brownian(jr.PRNGKey(1)))
    solver = dr.Reversible(sde_bases[base]())
    y1, args = jnp.array([0.8, -0.3]), (jnp.array(0.7), jnp.array(0.4))
    t0, t1 = jnp.array(0.25), jnp.array(0.3125)
    own = solver.base_step(terms, t1, t0, y1, args)[0]
    negated = solver.base_step(
        terms, t1, t0, y1, args, jax.tree.map(jnp.negative, terms.contr(t0, t1))
    )[0]
    assert bool(jnp.all(own == negated))


def test_adaptive_sde_under_vmap_with_step_and_jump_times():
    # Under `vmap` the backward loop runs on for the elements that are done; they
    # evaluated the Brownian path at the unwritten end of the step record (`inf`):
    # "Cannot evaluate VirtualBrownianTree outside of its range".
    brownian = _brownian(jr.PRNGKey(5678))
    controller = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=1e-3, atol=1e-4), step_ts=[0.3], jump_ts=[0.6]
    )
    ts = jnp.linspace(0.0, 1.0, 6)

    def solve(y0, args, adjoint, stepsize_controller, dt0=0.05):
        saveat = diffrax.SaveAt(
            subs=[diffrax.SubSaveAt(ts=ts), diffrax.SubSaveAt(steps=True)]
        )
        return diffrax.diffeqsolve(
            _sde_terms(brownian, diagonal=True),
            dr.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            dt0,
            y0,
            args,
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            adjoint=adjoint,
            max_steps=4096,
        )

    def loss(y0, args, adjoint, stepsize_controller, dt0=0.05):
        sol = solve(y0, args, adjoint, stepsize_controller, dt0)
        return jnp.sum(sol.ys[0] ** 2)

    y0s = jnp.array([[1.0, 0.5], [0.2, -1.0], [2.0, 1.0]])
    args = (jnp.array(0.7), jnp.array(0.4))
    adjoint = dr.ReversibleAdjoint()
    batched = lambda y0s, args: jnp.sum(
        jax.vmap(lambda y0: loss(y0, args, adjoint, controller))(y0s)
    )
    ours = jax.jit(jax.grad(batched, argnums=(0, 1)))(y0s, args)
    # Reference: each element's own solve on `StepTo` at the step times it took (an
    # adaptive SDE solve's step times are sensitive to round-off, see README).
    step_times = jax.jit(
        jax.vmap(lambda y0: solve(y0, args, adjoint, controller).ts[1])
    )(y0s)
    ref_y0s, ref_args = [], jax.tree_util.tree_map(jnp.zeros_like, args)
    for y0, times in zip(y0s, np.asarray(step_times)):
        step_to = diffrax.StepTo(
            jnp.concatenate([jnp.zeros(1), times[np.isfinite(times)]])
        )
        ref = jax.grad(loss, argnums=(0, 1))(
            y0, args, diffrax.RecursiveCheckpointAdjoint(), step_to, None
        )
        ref_y0s.append(ref[0])
        ref_args = jax.tree_util.tree_map(jnp.add, ref_args, ref[1])
    assert rel_error(ours, (jnp.stack(ref_y0s), ref_args)) < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize(
    "checkpoints", [None, 2048], ids=["default-checkpoints", "every-step"]
)
def test_reversible_under_recursive_checkpoint_on_adaptive_sde_is_exact(checkpoints):
    # Issue 19's finding: `RecursiveCheckpointAdjoint` on `Reversible(Heun())` with
    # adaptive SDE steps was 1e-3 to 4e-2 off the gradient of the same solve on `StepTo`
    # at its step times. With a checkpoint at every step (nothing recomputed) it was
    # exact: the backward pass recomputed steps from checkpoints in a differently
    # compiled program, whose error estimates differed in their last bits, so it chose
    # steps a few ulps apart, which move the Brownian increments by their square root.
    # `Reversible`'s error estimate is now rounded to half its mantissa.
    brownian = _brownian(jr.PRNGKey(0), tol=1e-3)
    solver = dr.Reversible(diffrax.Heun(), coupling_parameter=0.9)

    def solve(y0, adjoint, controller, dt0=0.05):
        saveat = diffrax.SaveAt(
            subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(steps=True)]
        )
        return diffrax.diffeqsolve(
            _sde_terms(brownian, diagonal=True),
            solver,
            0.0,
            1.0,
            dt0,
            y0,
            (jnp.array(0.7), jnp.array(0.4)),
            saveat=saveat,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=2048,
        )

    def grad_and_steps(adjoint, controller, dt0=0.05):
        def loss(y0):
            sol = solve(y0, adjoint, controller, dt0)
            return jnp.sum(sol.ys[0] ** 2), sol.ts[1]

        return jax.jit(jax.grad(loss, has_aux=True))(jnp.array([1.0, 0.5]))

    pid = diffrax.PIDController(rtol=1e-4, atol=1e-6)
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    grads, step_times = grad_and_steps(adjoint, pid)
    step_times = np.asarray(step_times)
    step_to = diffrax.StepTo(
        jnp.concatenate([jnp.zeros(1), step_times[np.isfinite(step_times)]])
    )
    ref, _ = grad_and_steps(diffrax.RecursiveCheckpointAdjoint(), step_to, None)
    assert rel_error(grads, ref) < 1e-12


def _gbm_strong_error(base, dt, num_paths=64):
    # Geometric Brownian motion in Stratonovich form, dX = μX dt + σX∘dW: its exact
    # solution on the same Brownian path is X0 exp(μt + σW_t).
    mu, sigma = 0.5, 0.8

    def single(key):
        brownian = _brownian(key, shape=(), tol=2**-14)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, args: mu * y),
            diffrax.ControlTerm(lambda t, y, args: sigma * y, brownian),
        )
        sol = diffrax.diffeqsolve(
            terms, dr.Reversible(base), 0.0, 1.0, dt, jnp.array(1.0), max_steps=4096
        )
        exact = jnp.exp(mu + sigma * brownian.evaluate(1.0))
        return jnp.abs(sol.ys[-1] - exact)

    keys = jr.split(jr.PRNGKey(5678), num_paths)
    return float(jnp.mean(jax.vmap(single)(keys)))


# Scalar (hence commutative) noise: each base measures strong order ~1 here (0.99 for
# Heun, Midpoint and Ralston, 1.02 for EulerHeun, λ = 0.999, 64 paths). For general
# non-commutative noise, order 1/2 is what these bases can be expected to give.
_expected_strong_order = {
    "Heun": 1.0,
    "Midpoint": 1.0,
    "Ralston": 1.0,
    "EulerHeun": 1.0,
}


@pytest.mark.slow
@pytest.mark.parametrize("base", sde_bases)
def test_strong_order(base):
    dts = [2.0**-k for k in range(4, 9)]
    errors = [_gbm_strong_error(sde_bases[base](), dt) for dt in dts]
    order = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    expected = _expected_strong_order[base]
    message = f"Reversible({base}()): measured strong order {order:.3f}, {errors=}"
    assert expected - 0.2 < order < expected + 0.5, message


@pytest.mark.parametrize("base", [diffrax.Euler(), diffrax.ItoMilstein()])
def test_ito_base_rejected_for_sdes(base):
    # Measured: Reversible(Euler()) on geometric Brownian motion converges to neither
    # the Itô nor the Stratonovich solution (its error stays at ~0.3 or grows).
    terms = _sde_terms(_brownian(jr.PRNGKey(0)))
    with pytest.raises(ValueError, match="Itô base solver"):
        diffrax.diffeqsolve(
            terms,
            dr.Reversible(base),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0, 0.5]),
            (jnp.array(0.7), jnp.array(0.4)),
            adjoint=dr.ReversibleAdjoint(),
        )


def test_sde_vmap_over_brownian_keys_float32():
    # A batch of sample paths, in float32 (the Brownian tree then needs a float32
    # `shape`).
    keys = jr.split(jr.PRNGKey(5678), 8)
    y0 = jnp.array([1.0, 0.5], jnp.float32)
    args = (jnp.array(0.7, jnp.float32), jnp.array(0.4, jnp.float32))

    def single(args, key, adjoint):
        brownian = _brownian(key, dtype=jnp.float32)
        sol = diffrax.diffeqsolve(
            _sde_terms(brownian),
            dr.Reversible(diffrax.Heun()),
            jnp.float32(0.0),
            jnp.float32(1.0),
            jnp.float32(0.01),
            y0,
            args,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    def loss(args, adjoint):
        return jnp.mean(jax.vmap(single, in_axes=(None, 0, None))(args, keys, adjoint))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    grads = grad(args, dr.ReversibleAdjoint())
    ref_grads = grad(args, diffrax.RecursiveCheckpointAdjoint())
    assert grads[0].dtype == jnp.float32
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float32)


_interpolations = {
    "cubic": lambda ts, xs: diffrax.CubicInterpolation(
        ts, diffrax.backward_hermite_coefficients(ts, xs)
    ),
    "linear": lambda ts, xs: diffrax.LinearInterpolation(ts, xs),
}


class _CDEField(eqx.Module):
    mlp: eqx.nn.MLP
    hidden: int
    channels: int

    def __call__(self, t, y, args):
        del t, args
        return jnp.tanh(self.mlp(y)).reshape(self.hidden, self.channels)


def _irregular_series(key, num_points=12):
    # Irregularly sampled times; the first channel is time itself.
    t_key, x_key = jr.split(key)
    ts = jnp.sort(jr.uniform(t_key, (num_points,), minval=0.0, maxval=1.0))
    ts = ts.at[0].set(0.0).at[-1].set(1.0)
    xs = jnp.stack([ts, jnp.sin(4 * ts) + 0.1 * jr.normal(x_key, ts.shape)], axis=-1)
    return ts, xs


def _cde_solve(field, ts, xs, interpolation, adjoint, solver=None):
    path = _interpolations[interpolation](ts, xs)
    y0 = jnp.concatenate(
        [path.evaluate(ts[0]), jnp.zeros(field.hidden - field.channels)]
    )
    return diffrax.diffeqsolve(
        diffrax.ControlTerm(field, path),
        dr.Reversible(diffrax.Tsit5()) if solver is None else solver,
        ts[0],
        ts[-1],
        None,
        y0,
        stepsize_controller=diffrax.StepTo(ts=ts)
        if interpolation == "linear"
        else diffrax.PIDController(rtol=1e-5, atol=1e-5),
        adjoint=adjoint,
    ).ys[-1]


@pytest.mark.parametrize("interpolation", _interpolations)
def test_cde_gradients_vector_field_and_data(interpolation):
    hidden, channels = 4, 2
    field = _CDEField(
        eqx.nn.MLP(hidden, hidden * channels, 16, 1, key=jr.PRNGKey(0)),
        hidden,
        channels,
    )
    keys = jr.split(jr.PRNGKey(5678), 3)
    ts, xs = jax.vmap(_irregular_series)(keys)

    def loss(field__xs, adjoint):
        field, xs = field__xs
        solve = lambda t, x: _cde_solve(field, t, x, interpolation, adjoint)
        return jnp.sum(jax.vmap(solve)(ts, xs) ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    grads = grad((field, xs), dr.ReversibleAdjoint())
    ref_grads = grad((field, xs), diffrax.RecursiveCheckpointAdjoint())
    # Gradients reach both the vector field and the data (through the interpolation).
    assert float(jnp.max(jnp.abs(grads[1]))) > 0
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


def _train(loss, params, steps, learning_rate):
    optimiser = optax.adam(learning_rate)
    opt_state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(params, opt_state):
        value, grads = eqx.filter_value_and_grad(loss)(params)
        updates, opt_state = optimiser.update(grads, opt_state)
        return eqx.apply_updates(params, updates), opt_state, value

    values = []
    # Optax mixes integer step counts with floats: not allowed under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(steps):
            params, opt_state, value = step(params, opt_state)
            values.append(float(value))
    return values


def test_neural_cde_training_reduces_loss():
    # Classify clockwise vs anticlockwise spirals, irregularly sampled.
    hidden, channels = 4, 3
    key = jr.PRNGKey(5678)
    model_key, readout_key, *data_keys = jr.split(key, 18)

    def spiral(key, clockwise):
        t_key, phase_key = jr.split(key)
        ts = jnp.sort(jr.uniform(t_key, (16,))).at[0].set(0.0).at[-1].set(1.0)
        angle = (1 - 2 * clockwise) * 4 * ts + jr.uniform(phase_key) * 6.0
        xs = jnp.stack([ts, jnp.cos(angle), jnp.sin(angle)], axis=-1)
        return ts, xs

    labels = (jnp.arange(16) % 2).astype(jnp.float64)
    ts, xs = jax.vmap(spiral)(jnp.stack(data_keys), labels)
    field = _CDEField(
        eqx.nn.MLP(hidden, hidden * channels, 16, 1, key=model_key), hidden, channels
    )
    readout = eqx.nn.Linear(hidden, 1, key=readout_key)

    def loss(params):
        field, readout = params
        solve = lambda t, x: _cde_solve(field, t, x, "cubic", dr.ReversibleAdjoint())
        logits = jax.vmap(lambda y: readout(y)[0])(jax.vmap(solve)(ts, xs))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    values = _train(loss, (field, readout), steps=15, learning_rate=3e-2)
    assert values[-1] < 0.8 * values[0], values


def test_neural_sde_training_reduces_loss():
    # Fit drift and diffusion scale so the mean and spread at t=1 of sample paths
    # match targets.
    keys = jr.split(jr.PRNGKey(5678), 16)
    drift = eqx.nn.MLP(1, 1, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(1))
    log_sigma = jnp.array(-1.0)

    def sample(params, key):
        drift, log_sigma = params
        brownian = _brownian(key, shape=(1,))
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, args: drift(y)),
            diffrax.ControlTerm(
                lambda t, y, args: jnp.exp(log_sigma) * jnp.eye(1), brownian
            ),
        )
        return diffrax.diffeqsolve(
            terms,
            dr.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.05,
            jnp.array([0.0]),
            adjoint=dr.ReversibleAdjoint(),
        ).ys[-1, 0]

    def loss(params):
        finals = jax.vmap(sample, in_axes=(None, 0))(params, keys)
        return (jnp.mean(finals) - 1.0) ** 2 + (jnp.std(finals) - 0.5) ** 2

    values = _train(loss, (drift, log_sigma), steps=15, learning_rate=5e-2)
    assert values[-1] < 0.5 * values[0], values
