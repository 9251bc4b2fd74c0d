"""Guidance for a given problem, before a solve: the stiffest modes of its Jacobian (by
Arnoldi), and from them the coupling, the largest stable step and the checkpoints that
the reversible scheme needs."""

import math
from typing import Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import (
    Array,
    Float,
    PRNGKeyArray,
    PyTree,
    Shaped,
)

from ._coupling import auto_coupling
from ._custom_types import Args, RealScalarLike, Y
from ._diffrax_internals import is_sde
from ._solver import Reversible
from ._stability import (
    as_reversible,
    matrix_eigenvalues,
    stability_function,
    step_matrix_from,
)


# Eigenvalues of a problem's Jacobian, by Arnoldi's method on Jacobian-vector products


def _drift(terms: diffrax.AbstractTerm) -> diffrax.AbstractTerm:
    # The stability of the scheme is governed by the drift; a Brownian increment's
    # contribution to the Jacobian is random, of size `1/√h`, and not a decay rate.
    if not is_sde(terms):
        return terms
    if isinstance(terms, diffrax.MultiTerm):
        drifts = [term for term in terms.terms if not is_sde(term)]
        if len(drifts) == 1:
            return drifts[0]
        if len(drifts) > 1:
            return diffrax.MultiTerm(*drifts)
    raise ValueError(
        "`check_stability(terms, ...)` linearises the drift of an SDE, and found none "
        "in `terms`: every term is driven by Brownian motion. Pass the SDE as "
        "`diffrax.MultiTerm(diffrax.ODETerm(drift), diffusion_term)`, or the drift's "
        "`diffrax.ODETerm` alone."
    )


def _increment_function(terms, solver, t0, dt0, args):
    """`x -> ` the increment of `x` over a step `dt0` from `t0`, to first order: the
    vector field times the control, whose Jacobian has the eigenvalues `dt0 a`."""
    if isinstance(terms, diffrax.AbstractTerm):
        terms = _drift(terms)
        control = terms.contr(t0, t0 + dt0)
        return lambda x: terms.vf_prod(t0, x, args, control)
    if is_sde(terms):
        raise ValueError(
            "`check_stability(terms, ...)` does not support SDEs given as a pytree of "
            "terms other than a `diffrax.MultiTerm`: pass the drift's terms alone."
        )

    # A pytree of terms, such as `diffrax.SemiImplicitEuler`'s pair: only the solver
    # knows how they make up the vector field.
    def increment(x):
        vf = solver.func(terms, t0, x, args)
        return jtu.tree_map(lambda v: jnp.asarray(dt0, v.dtype) * v, vf)

    return increment


def _check_increment_structure(increment, y0):
    out = jax.eval_shape(increment, y0)
    same = jtu.tree_structure(out) == jtu.tree_structure(y0) and all(
        a.shape == b.shape for a, b in zip(jtu.tree_leaves(out), jtu.tree_leaves(y0))
    )
    if not same:
        raise ValueError(
            "`check_stability(terms, solver, ...)` needs the vector field to have the "
            "structure of `y0`, and here it does not (as for a `diffrax.MultiTerm` "
            "that the solver does not sum, or a control term whose vector field is a "
            "matrix). Pass the ODE's vector field as a `diffrax.ODETerm` instead."
        )


def _hessenberg(matvec, starts: Shaped[Array, "krylov+1 size"]):
    """Arnoldi's method with full (twice repeated) Gram--Schmidt reorthogonalisation,
    from `starts[0]`: the `m x m` Hessenberg matrix, `m = len(starts) - 1`, whose
    eigenvalues (the Ritz values) estimate the operator's. When the Krylov space
    becomes invariant, the process restarts from the next of `starts`, made orthogonal
    to the space built (with a zero subdiagonal entry), so that every Ritz value is an
    eigenvalue of the operator restricted to the space built; with `m` the size of the
    state they are all of the operator's eigenvalues."""
    m = starts.shape[0] - 1
    dtype = starts.dtype
    eps = jnp.finfo(dtype).eps

    def orthogonalise(basis, w):
        h1 = basis.conj() @ w
        w = w - basis.T @ h1
        h2 = basis.conj() @ w
        return w - basis.T @ h2, h1 + h2

    def normalise(w, norm):
        return w / jnp.where(norm > 0, norm, 1).astype(dtype)

    basis = jnp.zeros_like(starts)
    basis = basis.at[0].set(normalise(starts[0], jnp.linalg.norm(starts[0])))
    hessenberg = jnp.zeros((m + 1, m), dtype)

    def body(j, carry):
        basis, hessenberg = carry
        image = matvec(basis[j])
        w, h = orthogonalise(basis, image)
        norm = jnp.linalg.norm(w)
        invariant = norm <= 100 * eps * jnp.linalg.norm(image)
        restart, _ = orthogonalise(basis, starts[j + 1])
        following = jnp.where(
            invariant,
            normalise(restart, jnp.linalg.norm(restart)),
            normalise(w, norm),
        )
        h = h.at[j + 1].set(jnp.where(invariant, 0, norm).astype(dtype))
        return basis.at[j + 1].set(following), hessenberg.at[:, j].set(h)

    _, hessenberg = jax.lax.fori_loop(0, m, body, (basis, hessenberg))
    return hessenberg[:m, :m]


@eqx.filter_jit
def _random_starts(key, shape, dtype):
    # Compiled on its own, so that it is compiled once per shape, not once per problem.
    return jr.normal(key, shape, dtype)


@eqx.filter_jit
def _jacobian_hessenberg(terms, solver, t0, dt0, y0, args, starts):
    flat_y0, unravel = ravel_pytree(y0)
    dtype = flat_y0.dtype
    real_dtype = jnp.finfo(dtype).dtype
    t0 = jnp.asarray(t0, real_dtype)
    dt0 = jnp.asarray(dt0, real_dtype)
    increment = _increment_function(terms, solver, t0, dt0, args)
    _check_increment_structure(increment, y0)

    def flat_increment(x):
        flat, _ = ravel_pytree(increment(unravel(x)))
        return flat.astype(dtype)

    _, linear = jax.linearize(flat_increment, flat_y0)
    return _hessenberg(linear, starts)


# Compiled on its own, once per Krylov dimension (LAPACK's `geev` is slow to compile).
_ritz_values = jax.jit(jnp.linalg.eigvals)


def _jacobian_step_eigenvalues(terms, solver, t0, dt0, y0, args, krylov_dim, key):
    """The Ritz values of the Jacobian of the step's increment (estimates of the
    values `z = dt0 a` for the Jacobian's eigenvalues `a`), and whether they are all
    of its eigenvalues."""
    flat_y0, _ = ravel_pytree(y0)
    size = flat_y0.size
    m = min(krylov_dim, size)
    starts = _random_starts(key, (m + 1, size), flat_y0.dtype)
    hessenberg = _jacobian_hessenberg(terms, solver, t0, dt0, y0, args, starts)
    return _ritz_values(hessenberg), m == size


def _as_state(y0: Y) -> Y:
    y0 = jtu.tree_map(jnp.asarray, y0)
    if not all(jnp.issubdtype(x.dtype, jnp.inexact) for x in jtu.tree_leaves(y0)):
        raise ValueError(
            "`check_stability(..., y0)` needs a floating-point (or complex) `y0`, as "
            "`diffrax.diffeqsolve` does."
        )
    return y0


def suggest_coupling(
    terms: PyTree[diffrax.AbstractTerm],
    solver: diffrax.AbstractSolver,
    t0: RealScalarLike,
    dt0: RealScalarLike,
    y0: Y,
    args: Args = None,
    *,
    krylov_dim: int = 32,
    key: PRNGKeyArray | None = None,
) -> Float[Array, ""]:
    """A coupling parameter for `Reversible(...)` on this problem, at step `dt0`: what
    `auto_coupling` gives for the mode that decays fastest over one step,
    `λ = clip(e^{-2 a dt0}, AUTO_COUPLING_MIN, AUTO_COUPLING_MAX)` with `a` minus the
    most negative real part of the eigenvalues of the vector field's Jacobian at `y0`.
    Then the parasitic mode of the scheme decays as fast as that mode does.

    The eigenvalues are estimated as in [`diffrax_reversible.check_stability`][].
    Unlike it, this is a pure JAX function: it may be called under `jax.jit`, and
    the result passed on as `Reversible(..., coupling_parameter=...)`.

    **Arguments:**

    - `terms`, `solver`, `t0`, `dt0`, `y0`, `args`: as for
        [`diffrax.diffeqsolve`][] and [`diffrax_reversible.check_stability`][]
        (`solver` only matters for a pytree of terms, through `solver.func`).
    - `krylov_dim`, `key`: as for [`diffrax_reversible.check_stability`][].

    **Returns:**

    The coupling, a scalar in the real floating-point dtype of `y0`.
    """
    y0 = _as_state(y0)
    key = jr.PRNGKey(0) if key is None else key
    z, _ = _jacobian_step_eigenvalues(terms, solver, t0, dt0, y0, args, krylov_dim, key)
    real = jnp.real(z)
    return auto_coupling(-jnp.min(real)).astype(real.dtype)


# The stability report


class StabilityReport(eqx.Module):
    """What [`diffrax_reversible.check_stability`][] found: the eigenvalues it
    estimated, a coupling, the stable step sizes, and whether the backward
    reconstruction of [`diffrax_reversible.ReversibleAdjoint`][] needs checkpoints.
    Every field is a Python scalar (or a NumPy array).

    **Attributes:**

    - `eigenvalues`: the estimates (Ritz values) of the eigenvalues of the vector
        field's Jacobian at `y0`, sorted by real part. All of them when the state has
        at most `krylov_dim` entries; otherwise the extreme ones are accurate (the
        most damped to about 1e-3 relative on a 10 000-point heat equation with the
        default `krylov_dim=32`), and those in between approximate.
    - `most_damped_eigenvalue`: the estimate with the most negative real part; minus
        its real part is the fastest decay rate `a`.
    - `largest_eigenvalue`: the estimate of largest modulus.
    - `dt0`: the step size analysed.
    - `suggested_coupling`: `auto_coupling(a dt0)`, as from
        [`diffrax_reversible.suggest_coupling`][].
    - `coupling`: the coupling analysed below: that of the `Reversible` solver passed
        in if it is a number, otherwise `coupling_parameter` if given, otherwise
        `suggested_coupling`.
    - `spectral_radius`: the largest spectral radius of the step matrix
        ([`diffrax_reversible.step_matrix`][]) over the estimated eigenvalues, at
        `dt0` and `coupling`.
    - `stable`: whether the step `dt0` is linearly stable with `coupling`: the
        spectral radius is at most `1 + tol` for every estimated eigenvalue (or, for a
        growing mode, at most its own growth `e^{Re z}` times `1 + tol`).
    - `max_stable_dt`: the largest step `h` such that every step in `(0, h]` is
        stable in that sense with `coupling` held fixed (`inf` if there is none:
        all eigenvalues zero). Near the edge of the base solver's stability interval
        no coupling is stable, and the fix is a smaller step.
    - `num_steps`: the number of steps of size `dt0` over `[t0, t1]`.
    - `reconstruction_growth`: the factor `G` by which the backward reconstruction
        grows round-off per step, relative to the solution (see
        [`diffrax_reversible.check_stability`][]).
    - `digits`: the decimal digits of `y0`'s dtype, `-log10(eps)`: 15.65 for
        float64, 6.92 for float32.
    - `digits_lost`: the estimated decimal digits that reconstructing the whole
        solve backwards loses, `N log10 G + log10 √N` for `N = num_steps`.
    - `reconstruction_error`: the estimated relative reconstruction error,
        `eps 10^digits_lost`: comparable with the value that
        `ReversibleAdjoint(reconstruction_callback=...)` reports, to an order of
        magnitude or two. Measured against it: notebook 05's `y' = -y` runs, 1.5 to 8
        times too high; its stiff example, 2e4 for 26 (3 of 20 digits lost too
        many); the README's float32 run, 6.5e-4 for 3.3e-3 (5 times too low).
    - `reconstruction_tol`: the largest acceptable `reconstruction_error`.
    - `needs_checkpoints`: whether `reconstruction_error > reconstruction_tol`.
    - `checkpoint_every`: then, the largest `k` for
        `ReversibleAdjoint(checkpoint_every=k)` whose `k` steps lose few enough
        digits; otherwise `None`. A value of 1 means that even single steps lose too
        much: make `dt0` smaller.
    - `float32_safe`: whether the same solve in float32 would reconstruct within
        tolerance without checkpoints (`reconstruction_tol` if given, otherwise
        `√eps` of float32, 3.5e-4).
    """

    eigenvalues: np.ndarray
    most_damped_eigenvalue: complex
    largest_eigenvalue: complex
    dt0: float
    suggested_coupling: float
    coupling: float
    spectral_radius: float
    stable: bool
    max_stable_dt: float
    num_steps: int
    reconstruction_growth: float
    digits: float
    digits_lost: float
    reconstruction_error: float
    reconstruction_tol: float
    needs_checkpoints: bool
    checkpoint_every: int | None
    float32_safe: bool


# The step sizes tried, to find the first unstable one: first a geometric grid of
# multiples of `1 / max|z|`, from far inside any explicit solver's stability region to
# far outside it (ratio 1.12 between points); then, in each further round, evenly
# spaced points across the bracket found, which shrinks it 126-fold (to 5e-10 relative
# after four rounds).
_GRID_SIZE = 128
_GRID_RANGE = (1e-4, 1e2)
_REFINEMENTS = 4


def _growth_limit(z, tol):
    # A mode that grows (Re z > 0) may grow by its own `e^{Re z}`: only growth beyond
    # the solution's is instability of the scheme.
    return (1 + tol) * jnp.maximum(1, jnp.exp(jnp.real(z)))


class _StepAnalysis(eqx.Module):
    # At `dt0`: the largest spectral radius of the step matrix; whether it is stable;
    # the largest amplification of round-off by an undone step; the base solver's
    # largest `|R(z)|`, by which the solution's scale changes per step.
    radius: Array
    stable: Array
    backward: Array
    solution: Array


@eqx.filter_jit
def _analyse(solver, z, counted, tol):
    """For the step matrices at `z = dt0 a` (one per estimated eigenvalue `a`), with a
    fixed coupling: a `_StepAnalysis` at `dt0` over the `z`s that are `counted`, and
    the largest multiple of `dt0` below which every step is stable.

    Padding `z` with zeros does not change the result (their eigenvalues are 1 and
    `λ`), and saves compiling again for every number of eigenvalues. The solver's step
    is traced once: each round evaluates its stability function on one batch of `z`s,
    a row per step size tried, plus a first row at `dt0`."""
    coupling = solver.coupling_parameter
    counted = counted[None]
    real_dtype = z.real.dtype
    largest = jnp.max(jnp.abs(z))
    grid = jnp.geomspace(*_GRID_RANGE, _GRID_SIZE, dtype=real_dtype)
    grid = grid / jnp.where(largest > 0, largest, 1)

    def evaluate(scales):
        scales = jnp.concatenate([jnp.ones((1,), real_dtype), scales])
        zs = scales[:, None].astype(z.dtype) * z[None]
        forward, backward = stability_function(solver, jnp.stack([zs, -zs]))
        couplings = jnp.broadcast_to(coupling, zs.shape)
        eigenvalues = matrix_eigenvalues(
            step_matrix_from(forward, backward, couplings), couplings
        )
        radii = jnp.max(jnp.abs(eigenvalues), axis=-1)
        unstable = jnp.any(radii > _growth_limit(zs, tol), axis=-1)
        # Undoing a step multiplies by `M^{-1}`, whose eigenvalues are the inverses of
        # `M`'s: `1 / R(z)` and about `R(z) / λ`.
        amplification = 1 / jnp.min(jnp.abs(eigenvalues), axis=-1)
        at_dt0 = _StepAnalysis(
            radius=jnp.max(jnp.where(counted, radii, 0)[0]),
            stable=~unstable[0],
            backward=jnp.max(jnp.where(counted, amplification, 0)[0]),
            solution=jnp.max(jnp.where(counted, jnp.abs(forward), 0)[0]),
        )
        return unstable[1:], at_dt0

    def round_(i, carry):
        low, high, at_dt0, found = carry
        # The first round scans `grid`; the next ones the bracket `[low, high]`, whose
        # `high` end is known to be unstable.
        scales = jnp.where(
            i == 0, grid, jnp.linspace(low, high, _GRID_SIZE, dtype=real_dtype)
        )
        unstable, new_at_dt0 = evaluate(scales)
        unstable = unstable.at[-1].set(unstable[-1] | (i > 0))
        first = jnp.argmax(unstable)
        low = jnp.where(first > 0, scales[jnp.maximum(first - 1, 0)], 0)
        at_dt0 = jtu.tree_map(lambda a, b: jnp.where(i == 0, b, a), at_dt0, new_at_dt0)
        found = jnp.where(i == 0, jnp.any(unstable), found)
        return low, scales[first], at_dt0, found

    zero = jnp.zeros((), real_dtype)
    empty = _StepAnalysis(zero, jnp.array(False), zero, zero)
    low, _, at_dt0, found = jax.lax.fori_loop(
        0, 1 + _REFINEMENTS, round_, (zero, zero, empty, jnp.array(False))
    )
    max_scale = jnp.where(found & (largest > 0), low, jnp.inf)
    return at_dt0, max_scale


def _digits_lost(steps: int, log_growth: float) -> float:
    # Round-off made in every step, amplified by the steps after it (back to `t0`) and
    # adding up like a random walk.
    if steps == 0:
        return 0.0
    return steps * log_growth + 0.5 * math.log10(steps)


def check_stability(
    terms: PyTree[diffrax.AbstractTerm],
    solver: diffrax.AbstractSolver,
    t0: RealScalarLike,
    t1: RealScalarLike,
    dt0: RealScalarLike,
    y0: Y,
    args: Args = None,
    *,
    coupling_parameter: RealScalarLike | Literal["auto"] | None = None,
    reconstruction_tol: float | None = None,
    krylov_dim: int = 32,
    tol: float = 1e-6,
    key: PRNGKeyArray | None = None,
) -> StabilityReport:
    """Checks, before a solve, whether `Reversible(...)` with step `dt0` is stable on
    this problem, which coupling to use, and whether
    [`diffrax_reversible.ReversibleAdjoint`][] will need checkpoints over `[t0, t1]`.
    Takes the arguments of [`diffrax.diffeqsolve`][], in its order.

    It linearises the problem at `(t0, y0)`, `y' ≈ J y`, and estimates the extreme
    eigenvalues `a` of `J` by Arnoldi's method on Jacobian-vector products
    (`jax.linearize` of the step's increment; the Jacobian is never formed, so states
    of any size are fine: the cost is `krylov_dim` JVPs and memory for
    `krylov_dim + 1` states). Each mode then behaves like `y' = a y`, whose reversible
    step is the 2x2 matrix `M(dt0 a)` of [`diffrax_reversible.step_matrix`][]:

    - **forward stability** is the spectral radius of `M(dt0 a)` (at most 1);
    - **the backward reconstruction** multiplies round-off by `M^{-1}` per step: by
        about `max(1/|R|, |R|/λ)` per mode, where `R = R(dt0 a)` is the base
        solver's stability function. That is `e^{a dt0}` on a mode decaying at rate
        `a` (undoing the decay, which any backward reconstruction does), and `1/λ` on
        neutral and oscillatory modes. Relative to the solution, whose scale changes
        by the largest `|R|` per step, the growth per step is `G = max(1, g |R|_max)`
        with `g` the largest amplification. When the state has more entries than
        `krylov_dim`, the modes that the estimate may miss are assumed neutral, which
        errs on the safe side (`G ≥ 1/λ`).

    The result is an estimate of orders of magnitude for the linearised problem at
    `y0`: if the dynamics change along the solution (a nonlinear vector field), check
    again at later states too; and watch
    `ReversibleAdjoint(reconstruction_callback=...)`, which measures the actual
    reconstruction error.

    This is a plain (eager) Python function, not to be called under `jax.jit`: it
    returns Python numbers, such as the `int` that
    `ReversibleAdjoint(checkpoint_every=...)` needs. Its pieces are compiled, so it
    takes about a second, once per problem. For a jit-compatible coupling, see
    [`diffrax_reversible.suggest_coupling`][].

    **Arguments:**

    - `terms`: the terms of the differential equation, as for
        [`diffrax.diffeqsolve`][]: a [`diffrax.ODETerm`][], any other
        [`diffrax.AbstractTerm`][] (a CDE's control is taken over the first step);
        for an SDE, the terms not driven by Brownian motion (its drift) are used. A
        pytree of terms (such as `diffrax.SemiImplicitEuler`'s pair) is evaluated with
        `solver.func`.
    - `solver`: a [`diffrax_reversible.Reversible`][], or the plain explicit solver
        to be wrapped in one.
    - `t0`, `t1`: the interval of the solve.
    - `dt0`: the step size (with an adaptive step size controller, a typical step).
    - `y0`: the initial state (any pytree of floating-point arrays).
    - `args`: as for [`diffrax.diffeqsolve`][].
    - `coupling_parameter`: the coupling to analyse. Defaults to that of `solver` if
        it is a `Reversible` with a numeric coupling, and otherwise to the suggested
        coupling. `"auto"` also means the suggested coupling: what the automatic
        coupling aims for when its per-step estimate finds the most damped mode.
    - `reconstruction_tol`: the largest acceptable relative reconstruction error.
        Defaults to `√eps` of `y0`'s dtype (1.5e-8 in float64, 3.5e-4 in float32):
        half the digits kept.
    - `krylov_dim`: the number of Arnoldi steps (Jacobian-vector products). States
        with at most this many entries get exact eigenvalues.
    - `tol`: the slack on a spectral radius of 1, as in
        [`diffrax_reversible.is_linearly_stable`][].
    - `key`: the random key of Arnoldi's start vector. Defaults to
        `jax.random.PRNGKey(0)`.

    **Returns:**

    A [`diffrax_reversible.StabilityReport`][].
    """
    y0 = _as_state(y0)
    key = jr.PRNGKey(0) if key is None else key
    dt0 = float(dt0)
    if dt0 == 0 or not math.isfinite(dt0):
        raise ValueError(
            f"`check_stability(..., dt0={dt0})` needs a finite, nonzero step size."
        )
    if reconstruction_tol is not None and not reconstruction_tol > 0:
        raise ValueError(
            f"`check_stability(..., reconstruction_tol={reconstruction_tol})` must be "
            "positive."
        )
    base = as_reversible(solver).solver  # Raises for solvers `Reversible` can't wrap.
    z, resolved = _jacobian_step_eigenvalues(
        terms, solver, jnp.asarray(t0), jnp.asarray(dt0), y0, args, krylov_dim, key
    )
    z = np.asarray(z)
    eigenvalues = z / dt0
    eigenvalues = eigenvalues[np.argsort(eigenvalues.real, kind="stable")]
    most_damped = complex(eigenvalues[np.argmin(eigenvalues.real)])
    largest = complex(eigenvalues[np.argmax(np.abs(eigenvalues))])
    suggested = float(auto_coupling(-np.min(z.real)))

    if coupling_parameter is None:
        own = solver.coupling_parameter if isinstance(solver, Reversible) else "auto"
    else:
        own = coupling_parameter
    coupling = suggested if isinstance(own, str) else float(own)
    # Modes that the Krylov space may not have resolved are assumed neutral: a `z = 0`,
    # counted only then. The zeros also pad `z` to a multiple of 64 entries.
    size = 64 * (z.size // 64 + 1)
    counted = np.arange(size) < (z.size + (not resolved))
    padded = jnp.asarray(np.concatenate([z, np.zeros(size - z.size, z.dtype)]))
    coupled = Reversible(base, coupling_parameter=jnp.asarray(coupling, z.real.dtype))
    at_dt0, max_scale = _analyse(coupled, padded, jnp.asarray(counted), tol)
    radius, stable = at_dt0.radius, at_dt0.stable
    backward, solution = at_dt0.backward, at_dt0.solution

    num_steps = math.ceil(abs(float(t1) - float(t0)) / abs(dt0) * (1 - 1e-12))
    growth = max(1.0, float(backward) * float(solution))
    log_growth = math.log10(growth)
    digits_lost = _digits_lost(num_steps, log_growth)
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    digits = -math.log10(float(jnp.finfo(dtype).eps))
    if reconstruction_tol is None:
        tol_digits = digits / 2
    else:
        tol_digits = digits + math.log10(reconstruction_tol)
    error_digits = digits_lost - digits
    needs_checkpoints = digits_lost > tol_digits

    checkpoint_every = None
    if needs_checkpoints:
        # The largest `k` whose `k` steps lose at most `tol_digits`.
        low, high = 1, num_steps
        while low < high:
            middle = (low + high + 1) // 2
            if _digits_lost(middle, log_growth) <= tol_digits:
                low = middle
            else:
                high = middle - 1
        checkpoint_every = low

    float32_digits = -math.log10(float(jnp.finfo(jnp.float32).eps))
    if reconstruction_tol is None:
        float32_tol_digits = float32_digits / 2
    else:
        float32_tol_digits = float32_digits + math.log10(reconstruction_tol)

    return StabilityReport(
        eigenvalues=eigenvalues,
        most_damped_eigenvalue=most_damped,
        largest_eigenvalue=largest,
        dt0=dt0,
        suggested_coupling=suggested,
        coupling=coupling,
        spectral_radius=float(radius),
        stable=bool(stable),
        max_stable_dt=float(max_scale) * abs(dt0),
        num_steps=num_steps,
        reconstruction_growth=growth,
        digits=digits,
        digits_lost=digits_lost,
        reconstruction_error=10.0**error_digits if error_digits < 300 else math.inf,
        reconstruction_tol=10.0 ** (tol_digits - digits),
        needs_checkpoints=needs_checkpoints,
        checkpoint_every=checkpoint_every,
        float32_safe=digits_lost <= float32_tol_digits,
    )
