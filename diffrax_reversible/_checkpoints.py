"""Stored states that the backward reconstruction restarts from:
`ReversibleAdjoint(checkpoint_every=k)` stores `(y, solver_state)` at the start of every
`k`-th accepted step; `checkpoint_every="auto"` wherever the round-off amplification
accumulated since the last stored state would cost more digits than the dtype can
spare."""

import math
from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._diffrax_internals import current_state, num_accepted_steps


CheckpointEvery = int | Literal["auto"] | None

# With `checkpoint_every="auto"`: the reconstruction between two stored states may
# amplify round-off by at most `eps^{-LOG_BUDGET}`, i.e. lose this fraction of the
# digits; the error then stays below the default `reconstruction_tol` (`eps^{1/4}`,
# three quarters of the digits) with room for the estimate's inaccuracy.
LOG_BUDGET = 0.5

MAX_CHECKPOINTS_MESSAGE = (
    '`ReversibleAdjoint(checkpoint_every="auto")` needed more than `max_checkpoints` '
    "stored states: the dynamics destroy more information than that many "
    "checkpoints can hold. Increase `ReversibleAdjoint(max_checkpoints=...)`, or use "
    "float64, whose round-off leaves more digits to spend between checkpoints."
)


class Checkpoints(eqx.Module):
    """The stored states, and (with `"auto"`) where they were taken."""

    states: PyTree[Array]
    # With `"auto"`: the accepted-step index of each stored state (-1: unused), how
    # many are stored, the accumulated log-amplification and the step index at the
    # last one, and whether a state was due when the buffer was full.
    steps: Array | None
    count: Array | None
    last_log_growth: Array | None
    last_step: Array | None
    overflowed: Array | None


def _log_budget(like) -> float:
    dtypes = [leaf.dtype for leaf in jtu.tree_leaves(like)]
    eps = max(float(jnp.finfo(dtype).eps) for dtype in dtypes)
    return LOG_BUDGET * -math.log(eps)


def init_checkpoints(
    every: CheckpointEvery, max_checkpoints: int, max_steps: int, state: Any
) -> Checkpoints | None:
    """Empty buffers for the stored states of a solve; `state` is Diffrax's initial
    loop state."""
    if every is None:
        return None
    num = max_checkpoints if every == "auto" else max_steps // every + 1
    states = jtu.tree_map(
        lambda x: jnp.zeros((num,) + x.shape, x.dtype), current_state(state)
    )
    if every != "auto":
        return Checkpoints(states, None, None, None, None, None)
    return Checkpoints(
        states=states,
        steps=jnp.full(num, -1, jnp.int32),
        count=jnp.zeros((), jnp.int32),
        last_log_growth=jnp.zeros((), jnp.result_type(float)),
        last_step=jnp.zeros((), jnp.int32),
        overflowed=jnp.zeros((), bool),
    )


def record_checkpoint(
    checkpoints: Checkpoints, every: CheckpointEvery, state: Any
) -> Checkpoints:
    """Stores the state at the start of the attempted step, if one is due there. Called
    on every attempt: a rejected step is followed by an attempt with the same index."""
    index = num_accepted_steps(state)
    y, solver_state = current_state(state)
    if every == "auto":
        log_growth = solver_state.log_growth
        due_by_growth = log_growth - checkpoints.last_log_growth > _log_budget(y)
        due = due_by_growth & (index != checkpoints.last_step)
        slot = checkpoints.count
        fits = slot < checkpoints.steps.shape[0]
        write = due & fits
    else:
        slot = index // every
        write = index % every == 0

    def store(value, buffer):
        return eqxi.buffer_at_set(buffer, slot, value, pred=write)

    # Values first: inside the loop the buffers are wrappers, not arrays.
    states = jtu.tree_map(store, (y, solver_state), checkpoints.states)
    if every != "auto":
        return eqx.tree_at(lambda c: c.states, checkpoints, states)
    return Checkpoints(
        states=states,
        steps=_set_where(checkpoints.steps, slot, index, write),
        count=checkpoints.count + write.astype(jnp.int32),
        last_log_growth=jnp.where(write, log_growth, checkpoints.last_log_growth),
        last_step=jnp.where(write, index, checkpoints.last_step),
        overflowed=checkpoints.overflowed | (due & ~fits),
    )


def _set_where(array, index, value, pred):
    index = jnp.minimum(index, array.shape[0] - 1)
    return array.at[index].set(jnp.where(pred, value, array[index]))


def check_overflow(checkpoints: Checkpoints | None, tree: PyTree) -> PyTree:
    if checkpoints is None or checkpoints.overflowed is None:
        return tree
    return eqx.error_if(tree, checkpoints.overflowed, MAX_CHECKPOINTS_MESSAGE)


def first_pointer(checkpoints: Checkpoints | None) -> Array:
    """Where the backward pass starts in the buffer of `"auto"` checkpoints."""
    if checkpoints is None or checkpoints.count is None:
        return jnp.zeros((), jnp.int32)
    return checkpoints.count - 1


def stored_state_at(
    checkpoints: Checkpoints, every: CheckpointEvery, k: Array, pointer: Array
) -> tuple[Array, PyTree[Array], Array]:
    """Whether a state was stored at the start of step `k`, that state, and the
    pointer for the next (earlier) step."""
    if every == "auto":
        slot = jnp.maximum(pointer, 0)
        due = (pointer >= 0) & (checkpoints.steps[slot] == k)
        pointer = pointer - due.astype(pointer.dtype)
    else:
        slot = k // every
        due = k % every == 0
    stored = jtu.tree_map(lambda c: c[slot], checkpoints.states)
    return due, stored, pointer
