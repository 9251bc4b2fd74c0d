import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

from .helpers import (
    base_solver_params,
    decaying_oscillator,
    grad_tol,
    rel_error,
    tree_equal_bitwise,
)


_saveats = {
    "t1": lambda: diffrax.SaveAt(t1=True),
    "ts": lambda: diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 9)),
    "t0_t1_ts": lambda: diffrax.SaveAt(
        t0=True, t1=True, ts=jnp.array([0.13, 0.5, 0.5, 1.234, 1.9])
    ),
}
_controllers = {
    "constant": lambda: diffrax.ConstantStepSize(),
    "pid": lambda: diffrax.PIDController(rtol=1e-6, atol=1e-8),
}


def _solve(y0, args, *, base, adjoint, saveat, controller, t1=2.0, dt0=0.05):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(decaying_oscillator),
        dr.Reversible(base),
        0.0,
        t1,
        dt0,
        y0,
        args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=4096,
    )
    return sol.ys


def _loss_and_grad(adjoint, y0, args, **kwargs):
    @jax.jit
    @jax.value_and_grad
    def loss(y0__args):
        ys = _solve(*y0__args, adjoint=adjoint, **kwargs)
        weights = jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape)
        return jnp.sum(jnp.sin(ys) * weights)

    return loss((y0, args))


@pytest.mark.parametrize("base,order", base_solver_params())
@pytest.mark.parametrize("saveat", _saveats)
@pytest.mark.parametrize("controller", _controllers)
def test_gradients_match_recursive_checkpoint(base, order, saveat, controller):
    del order
    if controller == "pid" and not isinstance(base, diffrax.AbstractAdaptiveSolver):
        pytest.skip("Diffrax rejects adaptive steps for solvers with no error estimate")
    y0 = jnp.array([1.0, -0.5])
    args = (jnp.array(0.3), jnp.array(1.7))
    kwargs = dict(
        base=base, saveat=_saveats[saveat](), controller=_controllers[controller]()
    )
    value, grads = _loss_and_grad(dr.ReversibleAdjoint(), y0, args, **kwargs)
    ref_value, ref_grads = _loss_and_grad(
        diffrax.RecursiveCheckpointAdjoint(), y0, args, **kwargs
    )
    # Bit-identity of the forward solve is `test_forward_values_bit_identical`; here the
    # loss is compiled together with two different backward passes, and XLA may fuse
    # the (identical) forward arithmetic differently.
    assert abs(value - ref_value) <= 1e-13 * abs(ref_value)
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


@pytest.mark.parametrize("base", [diffrax.Tsit5(), diffrax.Heun()])
def test_gradients_float32_long_solve(base):
    # ~500 steps in float32: the round-off of the reconstruction is amplified, but must
    # stay well inside the float32 tolerance.
    y0 = jnp.array([1.0, -0.5], dtype=jnp.float32)
    args = (jnp.array(0.3, jnp.float32), jnp.array(1.7, jnp.float32))
    kwargs = dict(
        base=base,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 10.0, 11, dtype=jnp.float32)),
        controller=diffrax.ConstantStepSize(),
        t1=jnp.float32(10.0),
        dt0=jnp.float32(0.02),
    )
    _, grads = _loss_and_grad(dr.ReversibleAdjoint(), y0, args, **kwargs)
    _, ref_grads = _loss_and_grad(
        diffrax.RecursiveCheckpointAdjoint(), y0, args, **kwargs
    )
    assert jtu.tree_leaves(grads)[0].dtype == jnp.float32
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float32)


@pytest.mark.parametrize("controller", _controllers)
def test_forward_values_bit_identical(controller):
    y0 = jnp.array([1.0, -0.5])
    args = (jnp.array(0.3), jnp.array(1.7))
    kwargs = dict(
        base=diffrax.Tsit5(),
        saveat=_saveats["t0_t1_ts"](),
        controller=_controllers[controller](),
    )
    ys = _solve(y0, args, adjoint=dr.ReversibleAdjoint(), **kwargs)
    ys_ref = _solve(y0, args, adjoint=diffrax.RecursiveCheckpointAdjoint(), **kwargs)
    assert tree_equal_bitwise(ys, ys_ref)
    # And under differentiation too: the primal of the custom VJP is the same loop.
    primal, _ = jax.vjp(
        lambda y: _solve(y, args, adjoint=dr.ReversibleAdjoint(), **kwargs), y0
    )
    assert tree_equal_bitwise(primal, ys_ref)


class _PytreeField(eqx.Module):
    weight: jax.Array
    scale: jax.Array

    def __call__(self, t, y, args):
        del t
        matrix, vector = y["matrix"], y["pair"][1]
        decay = args["decay"]
        return {
            "matrix": jnp.tanh(self.weight @ matrix) - decay * matrix,
            "pair": (jnp.zeros((), matrix.dtype), -self.scale * vector),
        }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_pytree_state_and_module_vector_field(dtype, getkey):
    field = _PytreeField(
        weight=jr.normal(getkey(), (3, 3), dtype), scale=jnp.array(0.5, dtype)
    )
    y0 = {
        "matrix": jr.normal(getkey(), (3, 2), dtype),
        "pair": (jnp.array(1.0, dtype), jr.normal(getkey(), (4,), dtype)),
    }
    args = {"decay": jnp.array(0.1, dtype), "label": "not an array"}

    def loss(field__y0__args, adjoint):
        field, y0, args = field__y0__args
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            dr.Reversible(diffrax.Dopri5()),
            jnp.asarray(0.0, dtype),
            jnp.asarray(1.0, dtype),
            jnp.asarray(0.1, dtype),
            y0,
            args,
            saveat=diffrax.SaveAt(t0=True, ts=jnp.array([0.25, 0.75], dtype)),
            stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-6),
            adjoint=adjoint,
        )
        return sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(sol.ys))

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    grads = grad((field, y0, args), dr.ReversibleAdjoint())
    ref_grads = grad((field, y0, args), diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(grads, ref_grads) < grad_tol(dtype)


def test_closure_over_differentiated_model(getkey):
    model = eqx.nn.MLP(2, 2, 16, 2, activation=jnp.tanh, key=getkey())
    y0 = jnp.array([0.5, -1.0])

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(model, adjoint):
        term = diffrax.ODETerm(lambda t, y, args: model(y))
        sol = diffrax.diffeqsolve(
            term,
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            1.0,
            0.05,
            y0,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 5)),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    grads = grad(model, dr.ReversibleAdjoint())
    ref_grads = grad(model, diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


def test_vmap_with_different_step_counts():
    # Different `t1` per batch element: different numbers of steps, from 6 to 40.
    t1s = jnp.array([2.0, 0.3, 0.6, 1.35])
    y0s = jnp.array([[1.0, -0.5], [0.2, 0.3], [-1.0, 2.0], [0.5, 0.5]])
    args = (jnp.array(0.3), jnp.array(1.7))

    def single(y0, args, t1, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(decaying_oscillator),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            t1,
            0.05,
            y0,
            args,
            saveat=diffrax.SaveAt(t1=True, ts=jnp.linspace(0.0, 1.0, 3) * t1),
            adjoint=adjoint,
            max_steps=64,
        )
        return jnp.sum(sol.ys**3), sol.stats["num_accepted_steps"]

    def batched(y0s, args, adjoint):
        losses, num_steps = jax.vmap(single, in_axes=(0, None, 0, None))(
            y0s, args, t1s, adjoint
        )
        return jnp.sum(losses), num_steps

    grads, num_steps = jax.jit(
        jax.grad(batched, argnums=(0, 1), has_aux=True), static_argnums=2
    )(y0s, args, dr.ReversibleAdjoint())
    assert len(set(num_steps.tolist())) == 4
    # Reference: each batch element on its own. (Diffrax's checkpointed loop returns
    # NaN gradients for this batch under `vmap`, from the zero-length steps that the
    # finished elements keep taking.)
    single_grad = jax.jit(
        jax.grad(single, argnums=(0, 1), has_aux=True), static_argnums=3
    )
    ref = [
        single_grad(y0, args, t1, diffrax.RecursiveCheckpointAdjoint())[0]
        for y0, t1 in zip(y0s, t1s)
    ]
    ref_grads = (
        jnp.stack([r[0] for r in ref]),
        jtu.tree_map(lambda *g: sum(g), *[r[1] for r in ref]),
    )
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


def test_vmap_pid_different_step_counts():
    y0s = jnp.array([[1.0, -0.5], [0.01, 0.02], [3.0, -2.0]])
    args = (jnp.array(0.3), jnp.array(1.7))

    def single(y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(decaying_oscillator),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            3.0,
            None,
            y0,
            args,
            stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2), sol.stats["num_accepted_steps"]

    def batched(y0s, adjoint):
        losses, num_steps = jax.vmap(single, in_axes=(0, None))(y0s, adjoint)
        return jnp.sum(losses), num_steps

    grads, num_steps = jax.jit(jax.grad(batched, has_aux=True), static_argnums=1)(
        y0s, dr.ReversibleAdjoint()
    )
    assert len(set(num_steps.tolist())) > 1
    single_grad = jax.jit(jax.grad(single, has_aux=True), static_argnums=1)
    ref_grads = jnp.stack(
        [single_grad(y0, diffrax.RecursiveCheckpointAdjoint())[0] for y0 in y0s]
    )
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


@pytest.mark.parametrize("controller", ["stepto", "clip_jumps"])
def test_other_controllers(controller):
    if controller == "stepto":
        stepsize_controller = diffrax.StepTo(ts=jnp.linspace(0.0, 2.0, 17) ** 1.5)
        dt0 = None
    else:
        # Steps on either side of a jump are not contiguous: their start times are
        # recorded as well as their ends.
        stepsize_controller = diffrax.ClipStepSizeController(
            diffrax.PIDController(rtol=1e-6, atol=1e-8), jump_ts=[0.7, 1.3]
        )
        dt0 = 0.1
    y0 = jnp.array([1.0, -0.5])
    args = (jnp.array(0.3), jnp.array(1.7))

    def loss(y0, args, adjoint):
        t1 = 2.0**1.5 if controller == "stepto" else 2.0
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(decaying_oscillator),
            dr.Reversible(diffrax.Bosh3()),
            0.0,
            t1,
            dt0,
            y0,
            args,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 6)),
            stepsize_controller=stepsize_controller,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = grad(y0, args, dr.ReversibleAdjoint())
    ref_grads = grad(y0, args, diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


def test_backwards_in_time_and_several_subsaveats():
    y0 = jnp.array([1.0, -0.5])
    args = (jnp.array(0.3), jnp.array(1.7))
    saveat = diffrax.SaveAt(
        subs=(
            diffrax.SubSaveAt(ts=jnp.array([1.5, 1.0, 0.2])),
            [diffrax.SubSaveAt(t0=True, t1=True)],
        )
    )

    def loss(y0, args, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(decaying_oscillator),
            dr.Reversible(diffrax.Midpoint()),
            2.0,
            0.0,
            -0.05,
            y0,
            args,
            saveat=saveat,
            adjoint=adjoint,
        )
        ys_ts, [ys_ends] = sol.ys
        return jnp.sum(ys_ts**2) + jnp.sum(jnp.cos(ys_ends))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = grad(y0, args, dr.ReversibleAdjoint())
    ref_grads = grad(y0, args, diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)


def test_zero_length_interval():
    y0 = jnp.array([1.0, -0.5])
    args = (jnp.array(0.3), jnp.array(1.7))

    def loss(y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(decaying_oscillator),
            dr.Reversible(diffrax.Tsit5()),
            1.0,
            1.0,
            0.1,
            y0,
            args,
            saveat=diffrax.SaveAt(t0=True, t1=True, ts=jnp.array([1.0, 1.0])),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys * jnp.arange(1.0, 9.0).reshape(4, 2))

    grads = jax.grad(loss)(y0, dr.ReversibleAdjoint())
    ref_grads = jax.grad(loss)(y0, diffrax.RecursiveCheckpointAdjoint())
    assert rel_error(grads, ref_grads) < grad_tol(jnp.float64)
    assert jnp.allclose(grads, jnp.array([16.0, 20.0]))


def test_stage_loop_of_base_solver():
    # `scan_kind` set: the base solver runs its stages in Diffrax's own loop instead of
    # unrolled. Same gradients.
    y0 = jnp.array([1.0, -0.5])
    args = (jnp.array(0.3), jnp.array(1.7))

    def grads(scan_kind, adjoint):
        def loss(y0, args):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(decaying_oscillator),
                dr.Reversible(diffrax.Dopri5(), scan_kind=scan_kind),
                0.0,
                2.0,
                0.05,
                y0,
                args,
                saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 7)),
                stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8),
                adjoint=adjoint,
            )
            return jnp.sum(sol.ys**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args)

    ref = grads(None, diffrax.RecursiveCheckpointAdjoint())
    looped = grads("checkpointed", dr.ReversibleAdjoint())
    assert rel_error(looped, ref) < grad_tol(jnp.float64)
    assert rel_error(grads(None, dr.ReversibleAdjoint()), ref) < grad_tol(jnp.float64)
