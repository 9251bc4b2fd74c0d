import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp
import pytest


def _gradient_temp_bytes(
    num_steps, state_size=64, controller=diffrax.ConstantStepSize(), max_steps=None
):
    def loss(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -args * jnp.tanh(y)),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            1.0,
            None if isinstance(controller, diffrax.StepTo) else 1.0 / num_steps,
            y0,
            args,
            stepsize_controller=controller,
            adjoint=dr.ReversibleAdjoint(),
            max_steps=num_steps if max_steps is None else max_steps,
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


@pytest.mark.parametrize(
    "controller",
    [diffrax.ConstantStepSize(), diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, 101))],
    ids=["constant", "step_to"],
)
def test_constant_steps_store_nothing_per_step(controller):
    # The same 100 steps, in buffers sized by `max_steps`: nothing is. The backward
    # pass computes the step times (`test_step_times.py`).
    small, large = (
        _gradient_temp_bytes(100, controller=controller, max_steps=n)
        for n in (100, 20_000)
    )
    assert large == small, f"{small=} {large=}"
