import diffrax
import equinox as eqx
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
