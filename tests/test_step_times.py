"""With constant steps the backward pass records no step times of ODEs and CDEs: it
computes each step's end as Diffrax's loop did. Bitwise for `StepTo`; for
`ConstantStepSize`, within two units in the last place (XLA evaluates Diffrax's formula
with or without a fused multiply-add, depending on the program around it), which moves
an undone step by a round-off error."""

import diffrax
import diffrax_reversible as dr
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax_reversible._diffrax_internals import known_step_end

from .helpers import decaying_oscillator


def _step_ends(controller, t0, t1, dt0, dtype):
    # Diffrax's own loop, saving at the end of every step.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(decaying_oscillator),
        diffrax.Euler(),
        t0,
        t1,
        dt0,
        jnp.array([1.0, 0.5], dtype),
        (jnp.array(0.3, dtype), jnp.array(1.2, dtype)),
        saveat=diffrax.SaveAt(steps=True),
        stepsize_controller=controller,
        max_steps=64,
    )
    return sol.ts[: int(sol.stats["num_accepted_steps"])]


@jax.jit
def _known_constant_ends(t0, t1, dt0):
    # Diffrax steps forward in time: backwards solves are negated first.
    direction = jnp.where(t1 >= t0, 1, -1).astype(t0.dtype)
    t0, t1, dt0 = t0 * direction, t1 * direction, dt0 * direction
    num_steps = jnp.ceil((t1 - t0) / eqxi.nextafter(dt0)).astype(jnp.int32)
    ends = jax.vmap(
        lambda k: known_step_end(
            diffrax.ConstantStepSize(), k, t0, t1, dt0, None, num_steps
        )
    )(jnp.arange(64))
    return ends * direction, num_steps


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=str)
def test_constant_step_ends_are_diffrax_ones(dtype):
    rng = np.random.default_rng(0)
    for _ in range(60):
        t0 = rng.uniform(-3, 3)
        length = rng.uniform(0.01, 5) * rng.choice([-1, 1])
        steps = rng.integers(1, 40)
        # Step sizes that divide the interval evenly, and that do not.
        dt0 = length / steps * rng.choice([1, rng.uniform(0.7, 1.3)])
        t0, t1, dt0 = (jnp.asarray(x, dtype) for x in (t0, t0 + length, dt0))
        ends = _step_ends(diffrax.ConstantStepSize(), t0, t1, dt0, dtype)
        known, num_steps = _known_constant_ends(t0, t1, dt0)
        if int(num_steps) > 64:
            continue
        assert len(ends) == int(num_steps)
        known, ends = np.asarray(known[: len(ends)]), np.asarray(ends)
        # Round-off of the time: a product rounded or not, in the last bit or two.
        ulp = np.spacing(np.maximum(np.abs(np.asarray(t0)), np.abs(np.asarray(t1))))
        assert np.all(np.abs(known - ends) <= 2 * ulp), (t0, t1, dt0)
        # The first step (`t0 + dt0`) and the last (`t1`) have no product to fuse.
        assert known[0] == ends[0] and known[-1] == ends[-1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=str)
def test_step_to_ends_are_its_ts(dtype):
    ts = jnp.sort(jnp.asarray(np.random.default_rng(1).uniform(0, 2, 20), dtype))
    ends = _step_ends(diffrax.StepTo(ts=ts), ts[0], ts[-1], None, dtype)
    known = jax.vmap(
        lambda k: known_step_end(
            diffrax.StepTo(ts=ts), k, ts[0], ts[-1], None, ts, None
        )
    )(jnp.arange(len(ends)))
    np.testing.assert_array_equal(np.asarray(known), np.asarray(ends))


def test_sdes_keep_their_recorded_step_times():
    # A Brownian increment from a time one bit off is not a round-off error away.
    def temp_bytes(num_steps):
        bm = diffrax.VirtualBrownianTree(0.0, 1.0, 1e-3, (4,), key=jax.random.key(0))
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: -a * y),
            diffrax.ControlTerm(lambda t, y, a: 0.1 * jnp.diag(jnp.cos(y)), bm),
        )

        def loss(y0, a):
            sol = diffrax.diffeqsolve(
                terms,
                dr.Reversible(diffrax.Heun()),
                0.0,
                1.0,
                1.0 / num_steps,
                y0,
                a,
                adjoint=dr.ReversibleAdjoint(),
                max_steps=num_steps,
            )
            return jnp.sum(sol.ys**2)

        compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(4), 0.5).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(100), temp_bytes(20_000)
    per_step = (large - small) / (20_000 - 100)
    assert 4 <= per_step <= 8.5, f"{small=} {large=} {per_step=}"
