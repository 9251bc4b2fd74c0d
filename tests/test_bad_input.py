"""Bad or unusual input: each row behaves as with `RecursiveCheckpointAdjoint` (same
values and gradients, or the same error), apart from the one documented difference."""

import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _decay(t, y, args):
    return -args * y


def _sqrt_decay(t, y, args):
    # NaN once `y` goes negative, around t = 1.6.
    return -args * jnp.sqrt(y) - 1.0


def _gradient(adjoint, *, y0=(1.0, 2.0), vector_field=_decay, **kwargs):
    kwargs.setdefault("t0", 0.0)
    kwargs.setdefault("t1", 1.0)
    kwargs.setdefault("dt0", 0.1)

    def loss(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            dr.Reversible(diffrax.Tsit5()),
            y0=y0,
            args=args,
            adjoint=adjoint,
            **kwargs,
        )
        return jnp.sum(sol.ys**2), sol.result == diffrax.RESULTS.successful

    y0 = jnp.asarray(y0)
    grads, successful = jax.grad(loss, argnums=(0, 1), has_aux=True)(y0, jnp.array(0.5))
    return grads, bool(successful)


def _outcome(adjoint, **kwargs):
    try:
        return _gradient(adjoint, **kwargs)
    except Exception as error:
        return type(error)


def _assert_same_outcome(**kwargs):
    ref = _outcome(diffrax.RecursiveCheckpointAdjoint(), **kwargs)
    ours = _outcome(dr.ReversibleAdjoint(), **kwargs)
    if isinstance(ref, type):
        assert ours is ref
        return ref
    (ref_grads, ref_ok), (grads, ok) = ref, ours
    assert ok == ref_ok
    for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)
    ):
        assert np.allclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=True)
    return ours


_PID = diffrax.PIDController(rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "row,kwargs,expected",
    [
        # NaN mid-solve with constant steps: no check fires in Diffrax; NaN out, NaN
        # gradients (not silent: the output is NaN too).
        ("nan-constant-steps", dict(vector_field=_sqrt_decay, t1=5.0), "nan"),
        # NaN mid-solve with adaptive steps: rejected steps shrink to nothing and
        # `throw=True` raises, as in Diffrax.
        (
            "nan-adaptive-throw",
            dict(vector_field=_sqrt_decay, t1=5.0, stepsize_controller=_PID),
            "raises",
        ),
        ("max-steps-throw", dict(max_steps=5), "raises"),
        ("max-steps-no-throw", dict(max_steps=5, throw=False), "unsuccessful"),
        ("nan-in-y0", dict(y0=(jnp.nan, 2.0)), "nan"),
        ("reversed-time", dict(t0=1.0, t1=0.0, dt0=-0.1), "ok"),
        ("reversed-time-wrong-dt0-sign", dict(t0=1.0, t1=0.0, dt0=0.1), "raises"),
        ("zero-length-interval", dict(t0=0.5, t1=0.5), "ok"),
        (
            "infinite-t1-stops-at-max-steps",
            dict(t1=jnp.inf, max_steps=20, throw=False),
            "unsuccessful",
        ),
        ("integer-y0-under-grad", dict(y0=(1, 2)), "raises"),
        ("float32-y0-float64-args", dict(y0=np.array([1.0, 2.0], np.float32)), "ok"),
        ("dt0-none-with-constant-steps", dict(dt0=None), "raises"),
    ],
)
def test_same_outcome_as_recursive_checkpoint(row, kwargs, expected):
    outcome = _assert_same_outcome(**kwargs)
    if expected == "raises":
        assert isinstance(outcome, type)
    else:
        (grads, successful) = outcome
        finite = all(
            bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads)
        )
        assert successful == (expected != "unsuccessful")
        assert finite == (expected != "nan")


def test_integer_y0_solves():
    def solve(adjoint):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_decay),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            1.0,
            0.1,
            jnp.array([1, 2]),
            jnp.array(0.5),
            adjoint=adjoint,
        ).ys

    ours, ref = (
        solve(dr.ReversibleAdjoint()),
        solve(diffrax.RecursiveCheckpointAdjoint()),
    )
    assert jnp.issubdtype(ours.dtype, jnp.floating)
    assert np.array_equal(ours, ref)


def test_failed_adaptive_solve_without_throw():
    # The one difference: with `throw=False`, a solve that stops early (here: NaN
    # everywhere past t = 1.6) returns the solution so far. Its gradients are those of
    # that returned solution; RecursiveCheckpointAdjoint returns NaN instead, from the
    # rejected NaN steps it differentiates through.
    kwargs = dict(
        vector_field=_sqrt_decay, t1=5.0, stepsize_controller=_PID, throw=False
    )
    ref_grads, ref_ok = _gradient(diffrax.RecursiveCheckpointAdjoint(), **kwargs)
    grads, ok = _gradient(dr.ReversibleAdjoint(), **kwargs)
    assert not ok and not ref_ok
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))

    # Independent check of those gradients: finite differences of the returned solution.
    def returned(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_sqrt_decay),
            dr.Reversible(diffrax.Tsit5()),
            0.0,
            5.0,
            0.1,
            y0,
            jnp.array(0.5),
            stepsize_controller=_PID,
            throw=False,
        )
        return jnp.sum(sol.ys**2)

    y0, eps = jnp.array([1.0, 2.0]), 1e-6
    fd = (returned(y0.at[1].add(eps)) - returned(y0.at[1].add(-eps))) / (2 * eps)
    assert abs(float(grads[0][1]) - float(fd)) < 1e-4 * max(1.0, abs(float(fd)))
