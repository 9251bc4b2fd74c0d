import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from diffrax_reversible._misc import relative_error


# Explicit solvers that `Reversible` must support, with their ODE order.
all_base_solvers = (
    (diffrax.Euler(), 1),
    (diffrax.Heun(), 2),
    (diffrax.Midpoint(), 2),
    (diffrax.Ralston(), 2),
    (diffrax.Bosh3(), 3),
    (diffrax.Tsit5(), 5),
    (diffrax.Dopri5(), 5),
    (diffrax.Dopri8(), 8),
)
# The bases every default (fast) test run covers; the others run with `-m slow`.
fast_base_solvers = (diffrax.Euler, diffrax.Heun, diffrax.Tsit5)


def base_solver_params():
    """`all_base_solvers` as pytest params, the less common bases marked slow."""
    return [
        pytest.param(
            base,
            order,
            id=type(base).__name__,
            marks=() if isinstance(base, fast_base_solvers) else pytest.mark.slow,
        )
        for base, order in all_base_solvers
    ]


def rel_error(x, y):
    """The package's `relative_error` of pytree `x` against reference `y`, as a float;
    both must have inexact arrays, the same number of them."""
    x_leaves = jtu.tree_leaves(eqx.filter(x, eqx.is_inexact_array))
    y_leaves = jtu.tree_leaves(eqx.filter(y, eqx.is_inexact_array))
    assert len(x_leaves) == len(y_leaves) > 0
    return float(relative_error(x, y))


def grad_tol(dtype):
    # Both adjoints differentiate the same discrete solve: they differ only by the
    # round-off of the backward reconstruction, amplified by ~λ^{-N}.
    return 1e-8 if dtype == jnp.float64 else 1e-3


def tree_equal_bitwise(x, y):
    x_leaves, x_def = jtu.tree_flatten(x)
    y_leaves, y_def = jtu.tree_flatten(y)
    return x_def == y_def and all(
        a.dtype == b.dtype and a.shape == b.shape and bool(jnp.all(a == b))
        for a, b in zip(x_leaves, y_leaves)
    )


def decaying_oscillator(t, y, args):
    """A small nonlinear, non-autonomous vector field with parameters in `args`."""
    a, b = args
    y1, y2 = y[0], y[1]
    dy1 = -a * y1 + b * y2 + jnp.sin(t).astype(y.dtype)
    dy2 = -b * y1 - a * y2 * (1 + y1**2) / 2
    return jnp.stack([dy1, dy2])


def finite_sum_of_squares(tree):
    # Unfilled outputs (`SaveAt(steps=...)`, after an event) are `inf`.
    return sum(
        jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) ** 2) for x in jtu.tree_leaves(tree)
    )


def assert_grads_close(ours, ref, tol=1e-8):
    """Leaf by leaf: a small gradient (a time, say) is not drowned by a large one."""
    ours_leaves = jtu.tree_leaves(ours)
    ref_leaves = jtu.tree_leaves(ref)
    assert len(ours_leaves) == len(ref_leaves) > 0
    scale = max(float(jnp.max(jnp.abs(r))) for r in ref_leaves)
    assert scale > 0
    for a, b in zip(ours_leaves, ref_leaves):
        denominator = max(float(jnp.max(jnp.abs(b))), 1e-4 * scale)
        assert float(jnp.max(jnp.abs(a - b))) / denominator < tol


def check_against_recursive_checkpoint(loss, *inputs, tol=1e-8):
    """Differentiates `loss(adjoint, *inputs)` with respect to every input with
    `ReversibleAdjoint` and with `RecursiveCheckpointAdjoint`, asserts the two agree
    leaf by leaf, and returns ours."""
    argnums = tuple(range(len(inputs)))
    grad = lambda adjoint: jax.grad(lambda *x: loss(adjoint, *x), argnums)(*inputs)
    ref = grad(diffrax.RecursiveCheckpointAdjoint())
    ours = grad(dr.ReversibleAdjoint())
    assert_grads_close(ours, ref, tol)
    return ours
