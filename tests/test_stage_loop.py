"""`Reversible(..., per_stage_vjp=...)`: the stages of a base step run in a loop, one
at a time, and the backward pass takes their VJPs one at a time (for large states)."""

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

from .helpers import (
    assert_grads_close,
    base_solver_params,
    decaying_oscillator,
    rel_error,
    tree_equal_bitwise,
)


def _solve(solver, adjoint, y0, args, t1, saveat, controller, dt0=0.05):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(decaying_oscillator),
        solver,
        0.0,
        t1,
        dt0,
        y0,
        args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=256,
    )


def _grads(solver, adjoint, saveat, controller, argnums=(0, 1, 2)):
    def loss(y0, args, t1):
        ys = _solve(solver, adjoint, y0, args, t1, saveat, controller).ys
        return jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0) ** 2)

    inputs = (jnp.array([1.0, 0.5]), (jnp.array(0.3), jnp.array(1.2)), jnp.array(2.0))
    return jax.grad(loss, argnums=argnums)(*inputs)


_saveats = {
    "t1": diffrax.SaveAt(t1=True),
    "ts": diffrax.SaveAt(ts=jnp.linspace(0.1, 1.9, 7)),
    "steps": diffrax.SaveAt(steps=True),
}


@pytest.mark.parametrize("base, order", base_solver_params())
@pytest.mark.parametrize("saveat", list(_saveats), ids=list(_saveats))
def test_gradients_equal_recursive_checkpoint(base, order, saveat):
    del order
    solver = dr.Reversible(base, per_stage_vjp=True)
    controller = diffrax.ConstantStepSize()
    ours = _grads(solver, dr.ReversibleAdjoint(), _saveats[saveat], controller)
    ref = _grads(
        solver, diffrax.RecursiveCheckpointAdjoint(), _saveats[saveat], controller
    )
    # Every input, `t1` included: the stage times are differentiated per stage.
    assert_grads_close(ours, ref, 1e-8)


@pytest.mark.parametrize("base", [diffrax.Heun(), diffrax.Tsit5()], ids=str)
def test_adaptive_gradients_equal_recursive_checkpoint(base):
    solver = dr.Reversible(base, per_stage_vjp=True)
    controller = diffrax.PIDController(rtol=1e-4, atol=1e-4)
    saveat = _saveats["ts"]
    # No `t1`: adaptive step times are not differentiated.
    ours = _grads(solver, dr.ReversibleAdjoint(), saveat, controller, (0, 1))
    ref = _grads(
        solver, diffrax.RecursiveCheckpointAdjoint(), saveat, controller, (0, 1)
    )
    assert_grads_close(ours, ref, 1e-8)


def test_same_solution_as_unrolled_stages():
    # The loop adds up the stages in another order: equal to round-off, no more.
    saveat, controller = _saveats["ts"], diffrax.PIDController(rtol=1e-6, atol=1e-6)
    y0, args = jnp.array([1.0, 0.5]), (jnp.array(0.3), jnp.array(1.2))
    looped, unrolled = (
        _solve(
            dr.Reversible(diffrax.Tsit5(), per_stage_vjp=flag),
            diffrax.RecursiveCheckpointAdjoint(),
            y0,
            args,
            2.0,
            saveat,
            controller,
        )
        for flag in (True, False)
    )
    assert int(looped.stats["num_steps"]) == int(unrolled.stats["num_steps"])
    assert rel_error(looped.ys, unrolled.ys) < 1e-11


def test_sde_gradients_equal_recursive_checkpoint():
    key = jr.key(3)
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=key)

    def loss(adjoint, y0, a):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: -a * y + jnp.sin(y[::-1])),
            diffrax.ControlTerm(lambda t, y, a: 0.3 * jnp.diag(jnp.cos(a * y)), bm),
        )
        sol = diffrax.diffeqsolve(
            terms,
            dr.Reversible(diffrax.Heun(), per_stage_vjp=True),
            0.0,
            1.0,
            0.02,
            y0,
            a,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    y0, a = jnp.array([0.4, -1.0]), jnp.array(0.7)
    grads = lambda adjoint: jax.grad(loss, argnums=(1, 2))(adjoint, y0, a)
    assert_grads_close(
        grads(dr.ReversibleAdjoint()), grads(diffrax.RecursiveCheckpointAdjoint()), 1e-8
    )


def test_vmap_and_float32():
    f32 = jnp.float32

    def loss(adjoint, y0s, args):
        solve = lambda y0: (
            diffrax.diffeqsolve(
                diffrax.ODETerm(decaying_oscillator),
                dr.Reversible(diffrax.Tsit5(), per_stage_vjp=True),
                f32(0),
                f32(1),
                f32(0.1),
                y0,
                args,
                adjoint=adjoint,
            ).ys
        )
        return jnp.sum(jax.vmap(solve)(y0s) ** 2)

    y0s = jnp.array([[1.0, 0.5], [-0.3, 0.2], [0.0, 1.0]], f32)
    args = (jnp.array(0.3, f32), jnp.array(1.2, f32))
    grads = lambda adjoint: jax.grad(lambda *x: loss(adjoint, *x), argnums=(0, 1))(
        y0s, args
    )
    ours = grads(dr.ReversibleAdjoint())
    assert ours[0].dtype == f32
    assert_grads_close(ours, grads(diffrax.RecursiveCheckpointAdjoint()), 1e-4)


def test_default_keeps_small_states_unrolled():
    # Small states keep the unrolled stages, which are faster there: the default
    # gives bitwise the gradients of `per_stage_vjp=False`.
    def grads(solver):
        return _grads(
            solver, dr.ReversibleAdjoint(), _saveats["ts"], diffrax.ConstantStepSize()
        )

    default = grads(dr.Reversible(diffrax.Tsit5()))
    unrolled = grads(dr.Reversible(diffrax.Tsit5(), per_stage_vjp=False))
    looped = grads(dr.Reversible(diffrax.Tsit5(), per_stage_vjp=True))
    assert tree_equal_bitwise(default, unrolled)
    assert rel_error(looped, unrolled) < 1e-12


class _GridField(eqx.Module):
    # Diffusion on a periodic grid plus a pointwise MLP: a large state driven by a
    # small network, whose activations (16 per grid point) dwarf the state.
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        laplacian = sum(jnp.roll(y, s, a) for s in (1, -1) for a in (0, 1)) - 4 * y
        return 0.1 * laplacian + jax.vmap(jax.vmap(self.mlp))(y[..., None])[..., 0]


def _gradient_temp_bytes(field, y0s, solver, adjoint, steps, batched=False):
    """Compiled temp memory of one gradient, constant steps over [0, 1], float32.
    With `batched`, `y0s` is a batch of initial states and the solve is vmapped."""

    def solve(field, y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            jnp.float32(0),
            jnp.float32(1),
            jnp.float32(1 / steps),
            y0,
            adjoint=adjoint,
            max_steps=steps,
        ).ys

    def loss(field, y0s):
        if batched:
            return jnp.mean(jax.vmap(solve, in_axes=(None, 0))(field, y0s) ** 2)
        return jnp.mean(solve(field, y0s) ** 2)

    compiled = eqx.filter_jit(eqx.filter_grad(loss)).lower(field, y0s).compile()
    return compiled.compiled.memory_analysis().temp_size_in_bytes


def _grid_gradient_temp_bytes(solver, adjoint, steps, size=64):
    model = _GridField(
        eqx.nn.MLP(1, 1, 16, 1, jnp.tanh, key=jr.PRNGKey(0), dtype=jnp.float32)
    )
    x = jnp.linspace(0, 2 * jnp.pi, size, dtype=jnp.float32)
    y0 = jnp.sin(x)[:, None] * jnp.cos(x)[None, :]
    return _gradient_temp_bytes(model, y0, solver, adjoint, steps)


@pytest.mark.parametrize("steps", [100, 10_000])
def test_large_state_memory_at_most_recursive_checkpoint(steps):
    # Deterministic: bytes of the compiled XLA programs. With every stage's
    # activations alive at once, the reversible backward pass used 2.6x Diffrax's
    # default memory at 100 steps.
    ours = _grid_gradient_temp_bytes(
        dr.Reversible(diffrax.Tsit5()), dr.ReversibleAdjoint(), steps
    )
    theirs = _grid_gradient_temp_bytes(
        diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint(), steps
    )
    assert ours <= theirs, f"{ours=} {theirs=}"


class _MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


@pytest.mark.parametrize("problem", ["grid", "vmapped wide MLP"])
def test_default_takes_the_stage_loop_where_it_saves_memory(problem):
    def temp_bytes(per_stage_vjp):
        solver = dr.Reversible(diffrax.Tsit5(), per_stage_vjp=per_stage_vjp)
        if problem == "grid":
            return _grid_gradient_temp_bytes(solver, dr.ReversibleAdjoint(), 50, 16)
        # A small state under `vmap` and a wide network: each stage's activations
        # (per batch element) are smaller than the parameters, whose cotangent the
        # stage loop carries from stage to stage, per batch element.
        key = jr.PRNGKey(0)
        field = _MLPField(
            eqx.nn.MLP(32, 32, 2048, 1, jnp.tanh, key=key, dtype=jnp.float32)
        )
        y0s = jr.normal(jr.PRNGKey(1), (16, 32), jnp.float32)
        adjoint = dr.ReversibleAdjoint()
        return _gradient_temp_bytes(field, y0s, solver, adjoint, 50, batched=True)

    default, looped, unrolled = (temp_bytes(flag) for flag in ("auto", True, False))
    assert default == min(looped, unrolled), f"{default=} {looped=} {unrolled=}"
    assert max(looped, unrolled) > 1.5 * default, f"{looped=} {unrolled=}"
