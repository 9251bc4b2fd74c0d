"""`ReversibleAdjoint` as a drop-in for `RecursiveCheckpointAdjoint`: every output
Diffrax can save, time gradients, events, controllers, Diffrax's own reversible
solvers, other transformations. Each gradient is checked against
`RecursiveCheckpointAdjoint` on the same solver."""

import functools as ft

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
import pytest

from .helpers import (
    assert_grads_close,
    check_against_recursive_checkpoint,
    finite_sum_of_squares,
)


def _forced_oscillator(t, y, args):
    stiffness, damping = args
    return jnp.stack([y[1], -stiffness * y[0] - damping * y[1] + jnp.sin(t)])


_Y0 = jnp.array([1.0, 0.5])
_ARGS = (jnp.array(2.0), jnp.array(0.3))
_TS = jnp.linspace(0.3, 1.7, 4)


def _solve(adjoint, *, y0=_Y0, args=_ARGS, t0=0.0, t1=2.0, dt0=0.1, **kwargs):
    kwargs.setdefault("solver", dr.Reversible(diffrax.Tsit5()))
    kwargs.setdefault("max_steps", 64)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_forced_oscillator),
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        adjoint=adjoint,
        **kwargs,
    )


def _outputs_loss(saveat_of_ts, **kwargs):
    """A loss of every saved value and every saved time."""

    def loss(adjoint, y0, args, t0, t1, ts):
        sol = _solve(
            adjoint, y0=y0, args=args, t0=t0, t1=t1, saveat=saveat_of_ts(ts), **kwargs
        )
        times = sum(
            jnp.sum(jnp.where(jnp.isfinite(t), jnp.sin(t), 0.0))
            for t in jtu.tree_leaves(sol.ts)
        )
        return finite_sum_of_squares(sol.ys) + times

    return loss


_ALL_INPUTS = (_Y0, _ARGS, jnp.array(0.0), jnp.array(2.0), _TS)
_W = jnp.array([[1.0, 2.0], [0.5, -1.0]])

_SAVEATS = {
    "steps": lambda ts: diffrax.SaveAt(steps=True),
    "steps-ts-t0-t1": lambda ts: diffrax.SaveAt(t0=True, steps=True, ts=ts, t1=True),
    "every-3rd-step-ts-t1": lambda ts: diffrax.SaveAt(steps=3, ts=ts, t1=True),
    "fn": lambda ts: diffrax.SaveAt(
        t0=True, ts=ts, t1=True, fn=lambda t, y, args: jnp.tanh(_W @ y) * t * args[0]
    ),
    "nested-subs": lambda ts: diffrax.SaveAt(
        subs={
            "a": diffrax.SubSaveAt(ts=ts),
            "b": [
                diffrax.SubSaveAt(steps=2, fn=lambda t, y, args: y[0] * t),
                diffrax.SubSaveAt(t1=True, fn=lambda t, y, args: {"y": y, "t": t}),
            ],
        }
    ),
}


@pytest.mark.parametrize("name", _SAVEATS)
def test_saveat_outputs_and_time_gradients(name):
    # Gradients with respect to y0, args, t0, t1 and the SaveAt times.
    check_against_recursive_checkpoint(_outputs_loss(_SAVEATS[name]), *_ALL_INPUTS)


@pytest.mark.parametrize("name", ["steps-ts-t0-t1", "fn"])
def test_saveat_outputs_adaptive(name):
    # No gradients with respect to t0/t1 with adaptive steps; the `ts` ones work.
    loss = _outputs_loss(
        _SAVEATS[name],
        stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
    )
    loss_no_t = lambda adjoint, y0, args, ts: loss(adjoint, y0, args, 0.0, 2.0, ts)
    check_against_recursive_checkpoint(loss_no_t, _Y0, _ARGS, _TS)


class _Readout(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, t, y, args):
        return self.linear(y) * t


def test_saveat_fn_parameters_get_gradients():
    # A `fn` with parameters of its own, as a module and through a closure.
    readout = _Readout(eqx.nn.Linear(2, 3, key=jax.random.PRNGKey(0)))
    scale = jnp.array(1.5)

    def loss(adjoint, readout, scale):
        saveat = diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=_TS, fn=lambda t, y, args: scale * jnp.sin(y)),
                diffrax.SubSaveAt(steps=True, t1=True, fn=readout),
            ]
        )
        sol = _solve(adjoint, saveat=saveat)
        return finite_sum_of_squares(sol.ys)

    grads = check_against_recursive_checkpoint(loss, readout, scale)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jtu.tree_leaves(grads))


@pytest.mark.parametrize("adaptive", [False, True])
def test_dense_output(adaptive):
    controller = (
        diffrax.PIDController(rtol=1e-5, atol=1e-7)
        if adaptive
        else diffrax.ConstantStepSize()
    )

    def loss(adjoint, y0, args, t):
        sol = _solve(
            adjoint,
            y0=y0,
            args=args,
            saveat=diffrax.SaveAt(dense=True),
            stepsize_controller=controller,
        )
        values = [sol.evaluate(s) for s in (0.0, 0.33, 1.21, t, 2.0)]
        return finite_sum_of_squares(values) + jnp.sum(sol.derivative(0.77) ** 2)

    check_against_recursive_checkpoint(loss, _Y0, _ARGS, jnp.array(1.6))


def test_dense_output_time_gradients():
    def loss(adjoint, t0, t1):
        sol = _solve(adjoint, t0=t0, t1=t1, saveat=diffrax.SaveAt(dense=True))
        return jnp.sum(sol.evaluate(0.9) ** 2) + jnp.sum(sol.evaluate(t1) ** 2)

    check_against_recursive_checkpoint(loss, jnp.array(0.0), jnp.array(2.0))


@pytest.mark.parametrize("steps", [False, True])
def test_dense_output_saved_but_unused(steps):
    # Nothing depends on the dense output: its cotangents are `None`, not zeros.
    def loss(adjoint, y0, args, t1):
        saveat = diffrax.SaveAt(t1=True, steps=steps, dense=True)
        sol = _solve(adjoint, y0=y0, args=args, t1=t1, saveat=saveat)
        return finite_sum_of_squares(sol.ys)

    check_against_recursive_checkpoint(loss, _Y0, _ARGS, jnp.array(2.0))


@pytest.mark.parametrize(
    "solver", [dr.Reversible(diffrax.Tsit5()), diffrax.ReversibleHeun()]
)
def test_saved_solver_state_and_controller_state(solver):
    def loss(adjoint, y0, args):
        saveat = diffrax.SaveAt(
            t1=True, solver_state=True, controller_state=True, made_jump=True
        )
        sol = _solve(adjoint, y0=y0, args=args, saveat=saveat, solver=solver)
        assert sol.made_jump is not None and sol.controller_state is not None
        return jnp.sum(sol.ys**2) + finite_sum_of_squares(
            jtu.tree_map(jnp.sin, sol.solver_state)
        )

    check_against_recursive_checkpoint(loss, _Y0, _ARGS)


@pytest.mark.parametrize(
    "dt0",
    [
        pytest.param(0.3, id="last-step-shorter"),
        pytest.param(2.0, id="one-step"),
        pytest.param(3.0, id="dt0-beyond-t1"),
    ],
)
def test_time_gradients_constant_steps(dt0):
    def loss(adjoint, t0, t1, dt0, ts):
        sol = _solve(
            adjoint, t0=t0, t1=t1, dt0=dt0, saveat=diffrax.SaveAt(ts=ts, t1=True)
        )
        return finite_sum_of_squares(sol.ys) + jnp.sum(jnp.sin(sol.ts))

    check_against_recursive_checkpoint(
        loss, jnp.array(0.0), jnp.array(2.0), jnp.array(dt0), _TS
    )


def test_time_gradients_step_to():
    def loss(adjoint, t0, t1, ts):
        controller = diffrax.StepTo(ts=jnp.array([0.0, 0.3, 0.9, 1.4, 2.0]))
        sol = _solve(
            adjoint,
            t0=t0,
            t1=t1,
            dt0=None,
            saveat=diffrax.SaveAt(t0=True, ts=ts, t1=True),
            stepsize_controller=controller,
        )
        return finite_sum_of_squares(sol.ys) + jnp.sum(sol.ts)

    check_against_recursive_checkpoint(loss, jnp.array(0.0), jnp.array(2.0), _TS)


@pytest.mark.parametrize(
    "solver",
    [
        diffrax.ReversibleHeun(),
        diffrax.LeapfrogMidpoint(),
        dr.Reversible(diffrax.Heun()),
    ],
    ids=lambda s: type(s).__name__,
)
def test_time_gradients_under_vmap_are_not_multiplied_by_the_batch_size(solver):
    # Seed 31337, case 98 of the randomized tests. With step times that do not depend
    # on the state, the saved times are the same for every batch element; the
    # reference is each element solved on its own, summed (Diffrax's
    # `RecursiveCheckpointAdjoint` under `vmap` is itself off here).
    y0s = jnp.array([[1.0, 0.5], [0.3, -0.2], [2.0, 0.1]])

    def solve(adjoint, t1, y0):
        saveat = diffrax.SaveAt(t1=True, steps=True, fn=lambda t, y, args: y * t)
        sol = _solve(adjoint, y0=y0, t1=t1, dt0=t1 / 5, saveat=saveat, solver=solver)
        return finite_sum_of_squares(sol.ys) + jnp.sum(jnp.sin(sol.ts))

    def batched(t1):
        return jnp.sum(jax.vmap(ft.partial(solve, dr.ReversibleAdjoint(), t1))(y0s))

    def one_by_one(t1):
        adjoint = diffrax.RecursiveCheckpointAdjoint()
        return sum(solve(adjoint, t1, y0) for y0 in y0s)

    t1 = jnp.array(2.0)
    assert_grads_close(jax.grad(batched)(t1), jax.grad(one_by_one)(t1))


def test_time_gradients_zero_length_interval():
    def loss(adjoint, y0, t0, t1, ts):
        saveat = diffrax.SaveAt(t0=True, ts=ts, t1=True)
        sol = _solve(adjoint, y0=y0, t0=t0, t1=t1, saveat=saveat)
        return finite_sum_of_squares(sol.ys) + jnp.sum(sol.ts)

    t = jnp.array(0.5)
    check_against_recursive_checkpoint(loss, _Y0, t, t, jnp.array([0.5, 0.5]))


def _event_loss(cond_fn, *, root_finder=True, saveat=None, **kwargs):
    def loss(adjoint, y0, args):
        event = diffrax.Event(
            cond_fn, root_finder=optx.Newton(1e-10, 1e-10) if root_finder else None
        )
        sol = _solve(
            adjoint,
            y0=y0,
            args=args,
            t1=5.0,
            dt0=0.05,
            max_steps=256,
            event=event,
            saveat=saveat or diffrax.SaveAt(t1=True),
            **kwargs,
        )
        return finite_sum_of_squares(sol.ys) + finite_sum_of_squares(sol.ts)

    return loss


_EVENTS = {
    "real": dict(cond_fn=lambda t, y, args, **kwargs: y[0] + 0.5),
    "real-without-root-finder": dict(
        cond_fn=lambda t, y, args, **kwargs: y[0] + 0.5, root_finder=False
    ),
    "boolean": dict(cond_fn=lambda t, y, args, **kwargs: y[0] < -0.5),
    "real-with-ts": dict(
        cond_fn=lambda t, y, args, **kwargs: y[0] + 0.5,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 4.0, 21), t1=True),
    ),
    "real-adaptive": dict(
        cond_fn=lambda t, y, args, **kwargs: y[0] + 0.5 * args[1],
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
    ),
    "several-one-fires": dict(
        cond_fn=[
            lambda t, y, args, **kwargs: y[0] + 100.0,
            lambda t, y, args, **kwargs: y[1] + 0.3,
        ]
    ),
    "never-fires": dict(cond_fn=lambda t, y, args, **kwargs: y[0] + 100.0),
}


@pytest.mark.parametrize("name", _EVENTS)
def test_event_gradients(name):
    check_against_recursive_checkpoint(_event_loss(**_EVENTS[name]), _Y0, _ARGS)


def test_event_time_gradient_through_closure_and_fn():
    # The event time depends on a threshold the cond_fn closes over.
    def loss(adjoint, y0, threshold):
        event = diffrax.Event(
            lambda t, y, args, **kwargs: y[0] - threshold,
            root_finder=optx.Newton(1e-10, 1e-10),
        )
        saveat = diffrax.SaveAt(t1=True, fn=lambda t, y, args: t * y[1])
        sol = _solve(adjoint, y0=y0, t1=5.0, event=event, saveat=saveat)
        return jnp.sum(sol.ys) + jnp.sum(sol.ts)

    grads = check_against_recursive_checkpoint(loss, _Y0, jnp.array(0.3))
    assert float(jnp.abs(grads[1])) > 0


@pytest.mark.parametrize("event", ["boolean", "real-without-root-finder"])
def test_event_without_root_finder_and_time_dependent_fn(event):
    # Without a root finder the solve stops at the end of the step in which the event
    # triggers, before `t1`; the output "at `t1`" is `fn` there. Its cotangent was
    # pulled back through `fn` at `t1` itself: wrong whenever `fn` depends on `t`.
    saveat = diffrax.SaveAt(t1=True, fn=lambda t, y, args: t * y)
    loss = _event_loss(_EVENTS[event]["cond_fn"], root_finder=False, saveat=saveat)
    check_against_recursive_checkpoint(loss, _Y0, _ARGS)


def test_step_to_gradients_with_respect_to_its_times():
    # Gradients through `StepTo.ts` (and through `t1` in `StepTo(linspace(t0, t1))`)
    # raised a `RuntimeError` while differentiating; every step time is one of `ts`.
    def loss(adjoint, ts, y0, args):
        sol = _solve(
            adjoint,
            y0=y0,
            args=args,
            t0=ts[0],
            t1=ts[-1],
            dt0=None,
            stepsize_controller=diffrax.StepTo(ts),
            saveat=diffrax.SaveAt(ts=_TS, steps=True, t1=True),
        )
        return finite_sum_of_squares(sol.ys) + finite_sum_of_squares(sol.ts)

    ts = jnp.array([0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.2, 1.5, 1.8, 2.0])
    grads = check_against_recursive_checkpoint(loss, ts, _Y0, _ARGS)
    assert float(jnp.max(jnp.abs(grads[0][1:-1]))) > 0

    def loss_t1(adjoint, t1, y0, args):
        return loss(adjoint, jnp.linspace(0.0, t1, 21), y0, args)

    check_against_recursive_checkpoint(loss_t1, jnp.array(2.0), _Y0, _ARGS)


def test_event_under_vmap():
    # Some batch elements hit the event, others do not; each against its own reference.
    y0s = jnp.array([[1.0, 0.5], [0.2, 0.0], [3.0, -1.0]])
    loss = _event_loss(lambda t, y, args, **kwargs: y[0] + 0.8)
    batched = jax.vmap(jax.grad(lambda y0: loss(dr.ReversibleAdjoint(), y0, _ARGS)))
    ours = batched(y0s)
    for y0, ours_i in zip(y0s, ours):
        ref = jax.grad(lambda y0: loss(diffrax.RecursiveCheckpointAdjoint(), y0, _ARGS))
        assert_grads_close(ours_i, ref(y0))


@pytest.mark.parametrize(
    "controller",
    [
        pytest.param(
            diffrax.PIDController(
                rtol=1e-6, atol=1e-8, dtmin=0.01, dtmax=0.15, factormax=2.0
            ),
            id="pid-dtmin-dtmax-factormax",
        ),
        pytest.param(
            diffrax.ClipStepSizeController(
                diffrax.PIDController(rtol=1e-4, atol=1e-6), step_ts=[0.5, 1.0]
            ),
            id="clip-step-ts",
        ),
        pytest.param(
            diffrax.ClipStepSizeController(
                diffrax.PIDController(rtol=1e-4, atol=1e-6),
                step_ts=[0.25],
                jump_ts=[0.5, 1.0],
            ),
            id="clip-step-ts-and-jump-ts",
        ),
        pytest.param(
            diffrax.StepTo(ts=jnp.linspace(0.0, 2.0, 9) ** 2 / 2), id="step-to"
        ),
    ],
)
def test_controllers(controller):
    def loss(adjoint, y0, args, ts):
        saveat = diffrax.SaveAt(ts=ts, steps=True, t1=True)
        dt0 = None if isinstance(controller, diffrax.StepTo) else 0.1
        sol = _solve(
            adjoint,
            y0=y0,
            args=args,
            dt0=dt0,
            saveat=saveat,
            stepsize_controller=controller,
        )
        return finite_sum_of_squares(sol.ys)

    check_against_recursive_checkpoint(loss, _Y0, _ARGS, _TS)


@pytest.mark.parametrize(
    "solver,controller",
    [
        (diffrax.ReversibleHeun(), diffrax.ConstantStepSize()),
        (diffrax.ReversibleHeun(), diffrax.PIDController(rtol=1e-3, atol=1e-4)),
        (diffrax.LeapfrogMidpoint(), diffrax.ConstantStepSize()),
    ],
    ids=["reversible-heun", "reversible-heun-adaptive", "leapfrog-midpoint"],
)
def test_native_reversible_solvers(solver, controller):
    loss = _outputs_loss(
        _SAVEATS["steps-ts-t0-t1"],
        solver=solver,
        stepsize_controller=controller,
        max_steps=256,
    )
    if isinstance(controller, diffrax.ConstantStepSize):
        check_against_recursive_checkpoint(loss, *_ALL_INPUTS)
    else:
        loss_no_t = lambda adjoint, y0, args, ts: loss(adjoint, y0, args, 0.0, 2.0, ts)
        check_against_recursive_checkpoint(loss_no_t, _Y0, _ARGS, _TS)


def test_semi_implicit_euler():
    def loss(adjoint, q0, p0, args, t1):
        terms = (
            diffrax.ODETerm(lambda t, p, args: args[1] * p),
            diffrax.ODETerm(lambda t, q, args: -args[0] * jnp.sin(q) + jnp.cos(t)),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.SemiImplicitEuler(),
            0.0,
            t1,
            0.05,
            (q0, p0),
            args,
            saveat=diffrax.SaveAt(ts=_TS, steps=True, t1=True),
            adjoint=adjoint,
            max_steps=64,
        )
        return finite_sum_of_squares(sol.ys)

    check_against_recursive_checkpoint(
        loss, jnp.array(1.0), jnp.array(0.5), _ARGS, jnp.array(2.0)
    )


def test_semi_implicit_euler_with_closures_over_a_network():
    # Each term is called with its own part of the state; the closures (over `mlp`)
    # were traced with the whole `(q, p)`, and `-(a**2) * q` raised a `TypeError`.
    mlp = eqx.nn.MLP(1, 1, 8, 1, jnp.tanh, key=jax.random.PRNGKey(0))
    mlp_params, mlp_static = eqx.partition(mlp, eqx.is_inexact_array)

    def loss(adjoint, mlp_params, q0, p0, a):
        network = eqx.combine(mlp_params, mlp_static)
        terms = (
            diffrax.ODETerm(lambda t, p, args: p),
            diffrax.ODETerm(
                lambda t, q, args: -(args**2) * q + 0.3 * network(q[None])[0]
            ),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.SemiImplicitEuler(),
            0.0,
            1.5,
            0.05,
            (q0, p0),
            a,
            saveat=diffrax.SaveAt(ts=_TS[_TS <= 1.5], t1=True),
            adjoint=adjoint,
            max_steps=64,
        )
        return finite_sum_of_squares(sol.ys)

    check_against_recursive_checkpoint(
        loss, mlp_params, jnp.array(1.0), jnp.array(0.5), jnp.array(1.2)
    )


def test_reversible_heun_sde():
    def loss(adjoint, y0, args):
        brownian = diffrax.VirtualBrownianTree(
            0.0, 2.0, tol=1e-3, shape=(2,), key=jax.random.PRNGKey(0)
        )
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(_forced_oscillator),
            diffrax.ControlTerm(
                lambda t, y, args: 0.3 * args[1] * jnp.diag(jnp.tanh(y)), brownian
            ),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.ReversibleHeun(),
            0.0,
            2.0,
            0.05,
            y0,
            args,
            saveat=diffrax.SaveAt(ts=_TS, t1=True),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    check_against_recursive_checkpoint(loss, _Y0, _ARGS)


def _saved_values(adjoint, args, solver=None):
    sol = _solve(
        adjoint,
        args=args,
        saveat=diffrax.SaveAt(ts=_TS),
        solver=solver or dr.Reversible(diffrax.Tsit5()),
    )
    return sol.ys


def test_jacrev():
    ref = jax.jacrev(ft.partial(_saved_values, diffrax.RecursiveCheckpointAdjoint()))
    ours = jax.jacrev(ft.partial(_saved_values, dr.ReversibleAdjoint()))
    assert_grads_close(ours(_ARGS), ref(_ARGS))


def test_jacfwd_and_hessian_with_forward_mode():
    # Forward mode goes through `diffrax.ForwardMode` (or `DirectAdjoint`), with the
    # `Reversible` solver; `ReversibleAdjoint` is reverse mode only.
    solver = dr.Reversible(diffrax.Tsit5())
    forward = lambda args: _saved_values(diffrax.ForwardMode(), args, solver)
    reverse = lambda args: _saved_values(dr.ReversibleAdjoint(), args, solver)
    assert_grads_close(jax.jacfwd(forward)(_ARGS), jax.jacrev(reverse)(_ARGS))

    scalar = lambda adjoint: lambda args: jnp.sum(_saved_values(adjoint, args, solver))
    hessian_ref = jax.hessian(scalar(diffrax.DirectAdjoint()))(_ARGS)
    hessian = jax.jacfwd(jax.jacfwd(scalar(diffrax.ForwardMode())))(_ARGS)
    assert_grads_close(hessian, hessian_ref)


def test_hessian_forward_over_reverse():
    # `jax.hessian` is forward-mode over the custom VJP's forward and backward passes.
    def loss(adjoint):
        def scalar(y0, args):
            sol = _solve(adjoint, y0=y0, args=args, saveat=diffrax.SaveAt(ts=_TS))
            return jnp.sum(sol.ys**2)

        return scalar

    argnums = (0, 1)
    ref = jax.hessian(loss(diffrax.DirectAdjoint()), argnums)(_Y0, _ARGS)
    ours = jax.hessian(loss(dr.ReversibleAdjoint()), argnums)(_Y0, _ARGS)
    assert_grads_close(ours, ref)


def test_forward_mode_through_reversible_adjoint_raises():
    scalar = lambda args: jnp.sum(_saved_values(dr.ReversibleAdjoint(), args))
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jacfwd(scalar)(_ARGS)


def test_progress_meter(capfd):
    pytest.importorskip("tqdm")

    def loss(adjoint, y0, args):
        sol = _solve(
            adjoint,
            y0=y0,
            args=args,
            saveat=diffrax.SaveAt(ts=_TS),
            progress_meter=diffrax.TqdmProgressMeter(refresh_steps=2),
        )
        return jnp.sum(sol.ys**2)

    check_against_recursive_checkpoint(loss, _Y0, _ARGS)
    assert "100.00%" in capfd.readouterr().err


def test_vmap_steps_and_fn_with_different_step_counts():
    saveat = diffrax.SaveAt(
        steps=True, ts=_TS, t1=True, fn=lambda t, y, args: jnp.sin(y) * t
    )

    def loss(adjoint, y0):
        sol = _solve(
            adjoint,
            y0=y0,
            saveat=saveat,
            stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
        )
        return finite_sum_of_squares(sol.ys)

    y0s = jnp.array([[1.0, 0.5], [0.1, 0.0], [3.0, -2.0]])
    ours = jax.vmap(jax.grad(ft.partial(loss, dr.ReversibleAdjoint())))(y0s)
    for y0, ours_i in zip(y0s, ours):
        ref = jax.grad(ft.partial(loss, diffrax.RecursiveCheckpointAdjoint()))(y0)
        assert_grads_close(ours_i, ref)


# Found in review: ties in Diffrax's `jnp.minimum`s of step times, events that stop
# before `t1`, an infinite `t1`, and event functions reading `t0`/`t1`/`dt0`.


def test_single_step_time_gradients():
    # `dt0 == t1 - t0`: the first step's end ties with `t1` twice (JAX halves ties).
    def loss(adjoint, t0, t1, dt0):
        saveat = diffrax.SaveAt(steps=True, dense=True)
        sol = _solve(adjoint, t0=t0, t1=t1, dt0=dt0, saveat=saveat)
        return jnp.sum(sol.ts[0]) + jnp.sum(sol.evaluate(1.3) ** 2)

    check_against_recursive_checkpoint(
        loss, jnp.array(0.0), jnp.array(2.0), jnp.array(2.0)
    )


def test_event_without_root_finder_time_gradients():
    def loss(adjoint, t0, t1, dt0):
        event = diffrax.Event(lambda t, y, args, **kwargs: y[0] + 0.5)
        saveat = diffrax.SaveAt(t1=True, steps=2)
        sol = _solve(adjoint, t0=t0, t1=t1, dt0=dt0, event=event, saveat=saveat)
        return finite_sum_of_squares(sol.ys) + finite_sum_of_squares(sol.ts)

    check_against_recursive_checkpoint(
        loss, jnp.array(0.0), jnp.array(5.0), jnp.array(0.1)
    )


@pytest.mark.parametrize("root_finder", [None, optx.Newton(1e-10, 1e-10)])
def test_event_with_infinite_t1(root_finder):
    def loss(adjoint, t0, dt0):
        event = diffrax.Event(lambda t, y, args, **kwargs: y[0] + 0.5, root_finder)
        sol = _solve(adjoint, t0=t0, t1=jnp.inf, dt0=dt0, event=event)
        return jnp.sum(sol.ts) + jnp.sum(sol.ys**2)

    check_against_recursive_checkpoint(loss, jnp.array(0.0), jnp.array(0.1))


def test_event_cond_fn_reading_times():
    def loss(adjoint, t1, dt0):
        event = diffrax.Event(
            lambda t, y, args, *, t1, dt0, **kwargs: y[0] + 0.1 * t1 + dt0,
            root_finder=optx.Newton(1e-10, 1e-10),
        )
        sol = _solve(adjoint, t1=t1, dt0=dt0, event=event)
        return jnp.sum(sol.ts) + jnp.sum(sol.ys**2)

    check_against_recursive_checkpoint(loss, jnp.array(5.0), jnp.array(0.1))
