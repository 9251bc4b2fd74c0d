"""A reversible solver written only against the public interface,
`diffrax_reversible.AbstractReversibleSolver`, gets `ReversibleAdjoint`'s exact
gradients: velocity Verlet for a separable Hamiltonian, exactly invertible."""

from typing import ClassVar

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from .helpers import grad_tol, rel_error


class VelocityVerlet(dr.AbstractReversibleSolver):
    term_structure: ClassVar = (diffrax.AbstractTerm, diffrax.AbstractTerm)
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        (q_term, p_term), (q0, p0) = terms, y0
        tm = t0 + (t1 - t0) / 2
        p_half = p0 + p_term.vf_prod(t0, q0, args, p_term.contr(t0, tm))
        q1 = q0 + q_term.vf_prod(tm, p_half, args, q_term.contr(t0, t1))
        p1 = p_half + p_term.vf_prod(t1, q1, args, p_term.contr(tm, t1))
        dense_info = dict(y0=y0, y1=(q1, p1))
        return (q1, p1), None, dense_info, None, diffrax.RESULTS.successful

    def backward_step(self, terms, t0, t1, y1, args, solver_state, t_before):
        (q_term, p_term), (q1, p1) = terms, y1
        tm = t0 + (t1 - t0) / 2
        p_half = p1 - p_term.vf_prod(t1, q1, args, p_term.contr(tm, t1))
        q0 = q1 - q_term.vf_prod(tm, p_half, args, q_term.contr(t0, t1))
        p0 = p_half - p_term.vf_prod(t0, q0, args, p_term.contr(t0, tm))
        return (q0, p0), None

    def func(self, terms, t0, y0, args):
        (q_term, p_term), (q0, p0) = terms, y0
        return q_term.vf(t0, p0, args), p_term.vf(t0, q0, args)


class Force(eqx.Module):
    """`-∇V` of a learned potential `V(q) = mlp(q)` plus a spring `k |q|² / 2`."""

    mlp: eqx.nn.MLP

    def __call__(self, t, q, k):
        potential = lambda q: self.mlp(q)[0] + 0.5 * k * jnp.sum(q**2)
        return -jax.grad(potential)(q)


def _hamiltonian_terms(force):
    return (diffrax.ODETerm(lambda t, p, k: p), diffrax.ODETerm(force))


def _loss(inputs, adjoint, controller, dt0):
    force, y0, k, ts = inputs
    sol = diffrax.diffeqsolve(
        _hamiltonian_terms(force),
        VelocityVerlet(),
        0.0,
        3.0,
        dt0,
        y0,
        args=k,
        saveat=diffrax.SaveAt(ts=ts, steps=True, t1=True),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=64,
    )
    finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
    q, p = sol.ys
    return jnp.sum(finite(q) ** 2) + jnp.sum(jnp.sin(finite(p))) + jnp.sum(ts**2)


@pytest.mark.parametrize(
    "controller, dt0",
    [
        (diffrax.ConstantStepSize(), 0.1),
        (diffrax.StepTo(ts=3.0 * jnp.linspace(0.0, 1.0, 23) ** 1.2), None),
    ],
    ids=["constant", "step_to"],
)
def test_solver_on_the_public_interface_gets_exact_gradients(getkey, controller, dt0):
    force = Force(eqx.nn.MLP(2, 1, 8, 2, activation=jnp.tanh, key=getkey()))
    y0 = (jnp.array([1.0, -0.5]), jnp.array([0.0, 0.7]))
    k = jnp.array(2.0)
    ts = jnp.array([0.25, 1.3, 2.9])
    inputs = (force, y0, k, ts)
    grad = eqx.filter_grad(_loss)
    ours = grad(inputs, dr.ReversibleAdjoint(), controller, dt0)
    reference = grad(inputs, diffrax.RecursiveCheckpointAdjoint(), controller, dt0)
    assert rel_error(ours, reference) < grad_tol(jnp.float64)


def test_backward_step_undoes_step():
    force = Force(eqx.nn.MLP(2, 1, 8, 2, activation=jnp.tanh, key=jax.random.key(0)))
    terms = _hamiltonian_terms(force)
    solver = VelocityVerlet()
    y0 = (jnp.array([1.0, -0.5]), jnp.array([0.0, 0.7]))
    y1, _, _, state1, _ = solver.step(terms, 0.0, 0.3, y0, 2.0, None, False)
    recovered, _ = solver.backward_step(terms, 0.0, 0.3, y1, 2.0, state1, 0.0)
    # One step forward and back: round-off only.
    assert rel_error(recovered, y0) < 1e-14


def test_jump_times_are_refused():
    force = Force(eqx.nn.MLP(2, 1, 8, 2, activation=jnp.tanh, key=jax.random.key(0)))
    controller = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=1e-3, atol=1e-6), jump_ts=jnp.array([1.0])
    )
    y0 = (jnp.array([1.0, -0.5]), jnp.array([0.0, 0.7]))
    with pytest.raises(ValueError, match="VelocityVerlet.*jump_ts"):
        inputs = (force, y0, 2.0, jnp.array([0.5]))
        _loss(inputs, dr.ReversibleAdjoint(), controller, 0.1)
