from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def is_none(x: Any) -> bool:
    return x is None


def finds_event_root(event) -> bool:
    """Whether `event` is a terminating event whose time a root finder locates."""
    return event is not None and event.root_finder is not None


def tree_add(*trees: PyTree) -> PyTree:
    """Leafwise sum of pytrees of one structure; `None` subtrees (no differentiable
    leaves) stay `None`."""
    return jtu.tree_map(lambda *xs: sum(xs[1:], start=xs[0]), *trees)


def zeros_like_diff(tree: PyTree) -> PyTree:
    """Zeros in place of the inexact arrays of `tree` (its differentiable leaves)."""
    return jtu.tree_map(jnp.zeros_like, eqx.filter(tree, eqx.is_inexact_array))


def where_tree(pred: Array, tree: PyTree) -> PyTree:
    """`tree` where `pred`, zeros elsewhere."""
    return jtu.tree_map(lambda x: jnp.where(pred, x, jnp.zeros_like(x)), tree)


def shape_structs(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def error_dtype():
    """The dtype errors are measured in: float64 where JAX has it enabled."""
    return jnp.result_type(float)


def _max_magnitude(tree: PyTree) -> Array:
    dtype = error_dtype()
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.stack(
        [jnp.zeros((), dtype)] + [jnp.max(jnp.abs(b)).astype(dtype) for b in leaves]
    ).max()


def _max_difference(a, b) -> Array:
    common = jnp.promote_types(a.dtype, b.dtype)
    difference = jnp.max(jnp.abs(a.astype(common) - b.astype(common)))
    return difference.astype(error_dtype())


def relative_error(x: PyTree, reference: PyTree, also_scale: PyTree = None) -> Array:
    """Largest elementwise difference of two pytrees of one structure, relative to the
    largest magnitude of `reference` (or of `also_scale` where that is larger: a solve
    that starts at zero is measured against the size it grew to). Zero if there are no
    inexact arrays; NaN if `x` is not finite. Traceable; leaves of different
    precisions are compared in the more precise one.

    The one definition of "relative error" in the project: the reconstruction check,
    the demo, the benchmarks and the tests all use it.
    """
    x_leaves = jtu.tree_leaves(eqx.filter(x, eqx.is_inexact_array))
    ref_leaves = jtu.tree_leaves(eqx.filter(reference, eqx.is_inexact_array))
    if not ref_leaves:
        return jnp.zeros((), error_dtype())
    difference = jnp.stack(
        [_max_difference(a, b) for a, b in zip(x_leaves, ref_leaves, strict=True)]
    ).max()
    scale = jnp.maximum(_max_magnitude(reference), _max_magnitude(also_scale))
    return difference / jnp.maximum(scale, jnp.finfo(error_dtype()).tiny)
