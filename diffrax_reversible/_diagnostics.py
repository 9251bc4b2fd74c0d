"""How well the backward pass reconstructed the forward solve: measured where the true
state is known (the initial state, every checkpoint), reported to
`reconstruction_callback` and checked against `reconstruction_tol`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._misc import error_dtype, relative_error
from ._solver import Reversible


def _reconstructed(solver, y, solver_state):
    """The part of the state that the backward pass reconstructs: `(y, z)` for
    `Reversible`, whose solver state also carries diagnostics."""
    if type(solver) is Reversible:
        return y, solver_state.z
    return y, solver_state


def reconstruction_error(solver, state, known_state, y_final) -> Array:
    """The relative error of a reconstructed `(y, solver_state)` against the known
    one (scaled by the largest of the two and the final `y`)."""
    return relative_error(
        _reconstructed(solver, *state),
        _reconstructed(solver, *known_state),
        also_scale=y_final,
    )


def default_reconstruction_tol(dtype) -> float:
    """`ReversibleAdjoint`'s default `reconstruction_tol` for states of `dtype`: at most
    three quarters of the digits lost (float64: 1.2e-4; float32: 1.9e-2). The gradients
    are typically an order of magnitude more accurate than the reconstruction."""
    return float(jnp.finfo(dtype).eps) ** 0.25


def _least_precise_dtype(tree):
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    if not leaves:
        return error_dtype()
    return max((leaf.dtype for leaf in leaves), key=lambda d: jnp.finfo(d).eps)


# `eqx.error_if` takes static messages: one per order of magnitude of the error.
_ERROR_EXPONENTS = tuple(range(-12, 31))


def _reconstruction_messages(tol) -> list[str]:
    def message(exponent):
        if exponent == _ERROR_EXPONENTS[-1]:
            measured = f"at least 1e{exponent} (or not finite)"
        else:
            measured = f"about 1e{exponent}"
        return (
            "`ReversibleAdjoint`: the backward pass reconstructed the forward solve "
            f"with a relative error of {measured}, above "
            f"`reconstruction_tol={tol:.3g}`, so the gradients are not to be trusted. "
            "Undoing a solve amplifies round-off by the decay of the dynamics (and by "
            "the coupling, `λ^{-N}` over `N` steps). Consider "
            '`ReversibleAdjoint(checkpoint_every=...)` (e.g. 100, or `"auto"` with '
            "`Reversible(...)`), "
            "float64 instead of float32, or smaller steps on stiff or strongly "
            "decaying problems; `reconstruction_tol=None` turns the check off."
        )

    return [message(exponent) for exponent in _ERROR_EXPONENTS]


def _all_finite(tree) -> Array:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def report_reconstruction_error(
    adjoint, error: Array, grads: PyTree, y_like: PyTree, final_state: PyTree
) -> PyTree:
    """Passes `error` to `adjoint.reconstruction_callback`, and returns `grads` with a
    runtime error attached that fires when `error` exceeds the tolerance."""
    if adjoint.reconstruction_callback is not None:
        jax.debug.callback(adjoint.reconstruction_callback, error)
    tol = adjoint.reconstruction_tol
    check = True
    if tol == "auto":
        tol = default_reconstruction_tol(_least_precise_dtype(y_like))
        # A forward solve that went NaN (as Diffrax's adjoints, NaN gradients follow)
        # is not a failure of the reconstruction.
        check = _all_finite(final_state)
    if tol is not None:
        exponent = jnp.round(jnp.log10(jnp.where(jnp.isfinite(error), error, jnp.inf)))
        index = jnp.clip(exponent, _ERROR_EXPONENTS[0], _ERROR_EXPONENTS[-1])
        index = jnp.nan_to_num(index, nan=_ERROR_EXPONENTS[-1]).astype(jnp.int32)
        # `<=` rather than `>`: NaN (a reconstruction that blew up) fails too.
        grads = eqx.branched_error_if(
            grads,
            jnp.invert(error <= tol) & check,
            index - _ERROR_EXPONENTS[0],
            _reconstruction_messages(tol),
        )
    return grads
