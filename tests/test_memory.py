import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp


def _gradient_temp_bytes(num_steps, state_size=64):
    def loss(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -args * jnp.tanh(y)),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            1.0,
            1.0 / num_steps,
            y0,
            args,
            adjoint=dr.ReversibleAdjoint(),
            max_steps=num_steps,
        )
        return jnp.sum(sol.ys**2)

    y0 = jnp.ones(state_size)
    args = jnp.array(0.5)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(y0, args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_gradient_memory_constant_in_steps():
    # Deterministic: bytes of the compiled XLA program, not a measurement at run time.
    small, large = _gradient_temp_bytes(100), _gradient_temp_bytes(20_000)
    per_step = (large - small) / (20_000 - 100)
    # The state (64 floats = 512 bytes) is never stored per step. (Nor are the step
    # times of constant steps: `test_step_times.py`; other controllers record one
    # time, at most 8 bytes, per step.)
    assert per_step <= 8.5, f"{small=} {large=} {per_step=}"
