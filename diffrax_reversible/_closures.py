"""Vector fields, `SaveAt` functions and event conditions that close over values being
differentiated (`ODETerm(lambda t, y, args: model(y))`) are turned into pytrees, whose
arrays are then explicit inputs of the custom VJP: it differentiates nothing else."""

import types
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.tree_util as jtu

from ._diffrax_internals import first_step_inputs
from ._misc import shape_structs
from ._outputs import is_subsaveat


def _closure_convert(fn, t0, y0, args):
    """A custom VJP differentiates only its explicit inputs. A function such as
    `lambda t, y, args: model(y)` closes over `model`; turning the closure into a pytree
    makes `model`'s arrays explicit inputs, so they get gradients."""
    if _is_closure(fn):
        return eqx.filter_closure_convert(fn, t0, y0, args)
    return fn


def _is_term_with_vector_field(x):
    return isinstance(x, (diffrax.ODETerm, diffrax.ControlTerm))


def _states_seen_by_vector_fields(terms, solver, init_state, args):
    """The state each vector field of `terms` is called with, as shape structures.

    Not always the whole `y`: `SemiImplicitEuler`, for example, calls each of its two
    terms with its part of the state. Found by tracing one step, with every vector
    field wrapped to record its input (`None` for a vector field that is not called).
    """
    terms_leaves, treedef = jtu.tree_flatten(terms, is_leaf=_is_term_with_vector_field)
    seen = [None] * len(terms_leaves)

    def recording(i, fn):
        def vector_field(t, y, args):
            if seen[i] is None:
                seen[i] = shape_structs(y)
            return fn(t, y, args)

        return vector_field

    recording_leaves = [
        eqx.tree_at(lambda x: x.vector_field, term, recording(i, term.vector_field))
        if _is_term_with_vector_field(term)
        else term
        for i, term in enumerate(terms_leaves)
    ]
    recording_terms = jtu.tree_unflatten(treedef, recording_leaves)
    t0, t1, y0, solver_state, made_jump = first_step_inputs(init_state)
    jax.eval_shape(
        lambda: solver.step(recording_terms, t0, t1, y0, args, solver_state, made_jump)
    )
    return jtu.tree_unflatten(treedef, seen)


def _is_closure(fn) -> bool:
    return isinstance(fn, types.FunctionType) and bool(fn.__closure__)


def closure_convert_vector_fields(terms, solver, init_state, args):
    term_leaves = jtu.tree_leaves(terms, is_leaf=_is_term_with_vector_field)
    if not any(
        _is_term_with_vector_field(term) and _is_closure(term.vector_field)
        for term in term_leaves
    ):
        return terms  # Nothing to convert: skip tracing a step.
    seen = _states_seen_by_vector_fields(terms, solver, init_state, args)
    t0, _, y0, _, _ = first_step_inputs(init_state)

    def convert(term, y):
        if not _is_term_with_vector_field(term):
            return term
        y = y0 if y is None else y
        vector_field = _closure_convert(term.vector_field, t0, y, args)
        return eqx.tree_at(lambda x: x.vector_field, term, vector_field)

    # `seen` has a leaf (a state, or `None`) where `terms` has a term.
    return jtu.tree_map(
        convert,
        terms,
        seen,
        is_leaf=_is_term_with_vector_field,
    )


def closure_convert_saveat_fns(saveat, t0, y0, args):
    # Diffrax wraps every user `fn` in a lambda over the direction of integration.
    def convert(sub):
        if not is_subsaveat(sub):
            return sub
        return eqx.tree_at(lambda s: s.fn, sub, _closure_convert(sub.fn, t0, y0, args))

    return jtu.tree_map(convert, saveat, is_leaf=is_subsaveat)


class _PositionalCondFn(eqx.Module):
    # Diffrax passes `t`, `y`, `args` by keyword in its root find; a closure-converted
    # function takes them by position.
    cond_fn: Callable

    def __call__(self, t, y, args, **kwargs):
        return self.cond_fn(t, y, args, **kwargs)


def closure_convert_event(event, example_args, cond_fn_kwargs):
    if event is None:
        return None

    def convert(cond_fn):
        if _is_closure(cond_fn):
            cond_fn = eqx.filter_closure_convert(
                cond_fn, *example_args, **cond_fn_kwargs
            )
            return _PositionalCondFn(cond_fn)
        return cond_fn

    cond_fn = jtu.tree_map(convert, event.cond_fn, is_leaf=callable)
    return eqx.tree_at(lambda e: e.cond_fn, event, cond_fn)
