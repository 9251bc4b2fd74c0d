from typing import Any

import jax.tree_util as jtu
from jaxtyping import PyTree


def is_none(x: Any) -> bool:
    return x is None


def tree_add(*trees: PyTree) -> PyTree:
    """Leafwise sum of pytrees of one structure; `None` subtrees (no differentiable
    leaves) stay `None`."""
    return jtu.tree_map(lambda *xs: sum(xs[1:], start=xs[0]), *trees)
