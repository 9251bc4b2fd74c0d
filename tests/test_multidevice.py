"""Data-parallel training and a sharded state across several (CPU host) devices.

JAX fixes its device count at start-up, so the check runs in a fresh interpreter with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`."""

import os
import subprocess
import sys
import textwrap


_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import diffrax, equinox as eqx, jax.numpy as jnp, optax
    import diffrax_reversible as dr
    from diffrax_reversible._misc import relative_error
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(jax.devices(), ("batch",))

    def rel_error(x, y):
        # On the host: the two sides live on different devices.
        return float(relative_error(jax.device_get(x), jax.device_get(y)))

    # 1. Data parallel: the batch of initial conditions is split across devices, the
    # model is replicated, the gradient is all-reduced by XLA.
    model = eqx.nn.MLP(4, 4, 32, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    y0s = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
    optimiser = optax.adam(1e-2)

    def loss(model, y0s):
        def solve(y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, model: model(y)),
                dr.Reversible(diffrax.Tsit5()),
                0.0, 1.0, 0.05, y0, model,
                saveat=diffrax.SaveAt(ts=jnp.linspace(0.25, 1.0, 4)),
                stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8),
                adjoint=dr.ReversibleAdjoint(),
            ).ys
        return jnp.mean(jax.vmap(solve)(y0s) ** 2)

    @eqx.filter_jit
    def train_step(model, opt_state, y0s):
        value, grads = eqx.filter_value_and_grad(loss)(model, y0s)
        updates, opt_state = optimiser.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, value, grads

    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    sharded = jax.device_put(y0s, NamedSharding(mesh, P("batch")))
    single = jax.device_put(y0s, jax.devices()[0])
    model_sh, _, value_sh, grads_sh = train_step(model, opt_state, sharded)
    model_1, _, value_1, grads_1 = train_step(model, opt_state, single)
    assert len(sharded.sharding.device_set) == 4
    grad_error = rel_error(grads_sh, grads_1)
    assert grad_error < 1e-12, grad_error
    assert rel_error(eqx.filter(model_sh, eqx.is_array),
                     eqx.filter(model_1, eqx.is_array)) < 1e-12
    print("data-parallel gradient rel. error", grad_error)

    # 2. One large state split across devices: a 1-D reaction-diffusion grid.
    grid_mesh = Mesh(jax.devices(), ("x",))
    n = 1024
    def grid_loss(diffusivity, u0):
        def vf(t, u, diffusivity):
            laplacian = jnp.roll(u, 1) - 2 * u + jnp.roll(u, -1)
            return diffusivity * laplacian + jnp.tanh(u) - u**3
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), dr.Reversible(diffrax.Heun()), 0.0, 0.5, 0.01,
            u0, diffusivity, adjoint=dr.ReversibleAdjoint(),
        )
        return jnp.mean(sol.ys ** 2)
    grad = jax.jit(jax.grad(grid_loss, argnums=(0, 1)))
    u0 = jnp.sin(jnp.linspace(0.0, 6.0, n)) + 0.1
    u0_sharded = jax.device_put(u0, NamedSharding(grid_mesh, P("x")))
    grads_sh = grad(jnp.array(0.3), u0_sharded)
    grads_1 = grad(jnp.array(0.3), jax.device_put(u0, jax.devices()[0]))
    assert len(grads_sh[1].sharding.device_set) == 4, grads_sh[1].sharding
    state_error = rel_error(grads_sh, grads_1)
    assert state_error < 1e-12, state_error
    print("sharded-state gradient rel. error", state_error)
    print("OK")
    """
)


def test_sharded_data_parallel_and_sharded_state():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
