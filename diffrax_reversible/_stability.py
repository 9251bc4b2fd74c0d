"""Linear stability of the reversible scheme, from its step on `y' = a y`."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import (
    Array,
    ArrayLike,
    Bool,
    Complex,
    Float,
)

from ._coupling import auto_coupling
from ._solver import Reversible


# The test equation `y' = a y`


def _complex_multiplication(t, y, a):
    # `y' = a y` for complex `a` and `y`, as a real system on (Re y, Im y).
    del t
    return jnp.stack([a[0] * y[0] - a[1] * y[1], a[1] * y[0] + a[0] * y[1]])


def _scalar_stability_function(
    solver: diffrax.AbstractSolver, z: Complex[ArrayLike, ""]
) -> Complex[Array, ""]:
    a = jnp.stack([jnp.real(z), jnp.imag(z)])
    term = diffrax.ODETerm(_complex_multiplication)
    one = jnp.array([1.0, 0.0], dtype=a.dtype)
    t0 = jnp.zeros((), a.dtype)
    t1 = jnp.ones((), a.dtype)
    if isinstance(solver, Reversible):
        x1, _, _, _ = solver.base_step(term, t0, t1, one, a)
    else:
        # A fresh state and `made_jump=True`, as `Reversible.base_step` does: a
        # first-same-as-last solver then evaluates its first stage at `one`.
        state = solver.init(term, t0, t1, one, a)
        x1, _, _, _, _ = solver.step(term, t0, t1, one, a, state, made_jump=True)
    return jax.lax.complex(x1[0], x1[1])


def stability_function(
    solver: diffrax.AbstractSolver, z: Complex[ArrayLike, "*shape"]
) -> Complex[Array, "*shape"]:
    """The stability function `R(z)` of a one-step solver: one step of size `h` on
    `y' = a y` multiplies `y` by `R(h a)`. Evaluated by stepping the solver itself, so
    it is exact for any explicit solver.

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][], for the stability function of
        the solver it wraps; or a plain Diffrax solver (e.g. `diffrax.Tsit5()`), for its
        own. A plain solver is stepped once, on an `ODETerm`, from a fresh `init`
        state and with `made_jump=True` (as `Reversible` steps its base solver), so
        that a first-same-as-last solver evaluates its first stage afresh.
    - `z`: the values `h a` (complex; any shape).

    **Returns:**

    `R(z)`, with the shape of `z`.
    """
    z = _as_complex(z)
    return _flat_stability_function(solver, z.reshape(-1)).reshape(z.shape)


@eqx.filter_jit
def _flat_stability_function(solver, z):
    # Compiled, so that the solver's step is traced once per solver and shape.
    return jax.vmap(lambda z: _scalar_stability_function(solver, z))(z)


def _as_complex(z):
    z = jnp.asarray(z)
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
        return z
    real = (
        z.astype(jnp.result_type(float))
        if not jnp.issubdtype(z.dtype, jnp.floating)
        else z
    )
    return jax.lax.complex(real, jnp.zeros_like(real))


def as_reversible(solver: diffrax.AbstractSolver) -> Reversible:
    # A plain solver stands for `Reversible(solver)`, with `Reversible`'s default
    # coupling. `Reversible` raises for the solvers it cannot wrap.
    solver = solver if isinstance(solver, Reversible) else Reversible(solver)
    coupling = solver.coupling_parameter
    if isinstance(coupling, (int, float)):
        # As an array, so that the compiled helpers below are not compiled again for
        # every value (a Python number would be a static argument).
        solver = eqx.tree_at(
            lambda s: s.coupling_parameter, solver, jnp.asarray(float(coupling))
        )
    return solver


def _coupling_at(
    solver: Reversible, z: Complex[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """The coupling of one step on `y' = a y` with `z = h a`: `"auto"` estimates the
    decay over the step as `-Re z` (its Rayleigh quotient is exactly that on this
    equation) and the solution's growth as `log|R(z)|` (at least `-|Re z|`), as
    `Reversible` does, and takes `auto_coupling` of half their difference (about
    `-Re z`)."""
    real = jnp.real(z)
    coupling = solver.coupling_parameter
    if isinstance(coupling, str):  # `"auto"`: `Reversible` rejects any other string.
        growth = jnp.log(jnp.abs(stability_function(solver, z))).astype(real.dtype)
        growth = jnp.maximum(growth, -jnp.abs(real))  # As `Reversible` bounds it.
        return auto_coupling((-real - growth) / 2).astype(real.dtype)
    return jnp.broadcast_to(jnp.asarray(coupling, dtype=real.dtype), real.shape)


def step_matrix(
    solver: diffrax.AbstractSolver, z: Complex[ArrayLike, "*shape"]
) -> Complex[Array, "*shape 2 2"]:
    """The matrix `M(z)` of one reversible step on `y' = a y` with `z = h a`:
    `(y1, z1) = M (y0, z0)`. With `R` the base solver's stability function and `λ` the
    coupling,

        y1 = λ y0 + (R(z) - λ) z0
        z1 = (1 - R(-z)) y1 + z0

    Its determinant is `λ`; its eigenvalues are about `R(z)` (the solution) and
    `λ / R(z)` (the scheme's parasitic mode).

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][]. With
        `coupling_parameter="auto"`, the coupling at each `z` is
        `auto_coupling(-Re z)`: what the automatic coupling picks on this equation,
        whose decay over the step is `-Re z`. A plain Diffrax solver stands for
        `Reversible(solver)`, that is with `Reversible`'s default coupling
        (`"auto"`).
    - `z`: the values `h a` (complex; any shape).

    **Returns:**

    An array of shape `z.shape + (2, 2)`.
    """
    return _step_matrix(as_reversible(solver), _as_complex(z))


@eqx.filter_jit
def _step_matrix(solver: Reversible, z: Complex[Array, "*shape"]):
    forward, backward = stability_function(solver, jnp.stack([z, -z]))
    return step_matrix_from(forward, backward, _coupling_at(solver, z))


def step_matrix_from(forward, backward, coupling):
    """The step matrix from `R(z)`, `R(-z)` and the coupling at `z`."""
    coupling = coupling.astype(forward.dtype)
    row_y = jnp.stack([coupling, forward - coupling], axis=-1)
    back = (1 - backward)[..., None]
    row_z = back * row_y + jnp.stack(
        [jnp.zeros_like(forward), jnp.ones_like(forward)], axis=-1
    )
    return jnp.stack([row_y, row_z], axis=-2)


def matrix_eigenvalues(
    matrices: Complex[Array, "*shape 2 2"], coupling: Float[Array, "*shape"]
) -> Complex[Array, "*shape 2"]:
    """The eigenvalues of step matrices, in closed form: `(a + d)/2 ± √(((a - d)/2)²
    + b c)`, the larger in modulus first, and the other from the determinant, which
    is exactly the coupling. (No cancellation when the two are close, as at `z → 0`
    where they are 1 and `λ`; and no LAPACK call, which is slow to compile.)"""
    a, b = matrices[..., 0, 0], matrices[..., 0, 1]
    c, d = matrices[..., 1, 0], matrices[..., 1, 1]
    mean = (a + d) / 2
    root = jnp.sqrt(((a - d) / 2) ** 2 + b * c)
    # The sign that adds to `mean` rather than cancelling it.
    root = jnp.where(jnp.real(jnp.conj(mean) * root) >= 0, root, -root)
    larger = mean + root
    coupling = coupling.astype(larger.dtype)
    smaller = coupling / jnp.where(larger == 0, 1, larger)
    return jnp.stack([larger, smaller], axis=-1)


@eqx.filter_jit
def _stepmatrix_eigenvalues(solver: Reversible, z: Complex[Array, "*shape"]):
    return matrix_eigenvalues(_step_matrix(solver, z), _coupling_at(solver, z))


def spectral_radius(
    solver: diffrax.AbstractSolver, z: Complex[ArrayLike, "*shape"]
) -> Float[Array, "*shape"]:
    """The largest modulus of the eigenvalues of [`diffrax_reversible.step_matrix`][]:
    the factor by which the coupled scheme can grow a perturbation per step on
    `y' = a y`, `z = h a`. At most 1 means linearly stable.

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][], or a plain Diffrax solver,
        which stands for `Reversible(solver)` with the default coupling (as in
        [`diffrax_reversible.step_matrix`][]).
    - `z`: the values `h a` (complex; any shape).

    **Returns:**

    An array with the shape of `z`.
    """
    z = _as_complex(z)
    return jnp.max(jnp.abs(_stepmatrix_eigenvalues(as_reversible(solver), z)), axis=-1)


def is_linearly_stable(
    solver: diffrax.AbstractSolver,
    dt: float,
    eigenvalues: Complex[ArrayLike, "*shape"],
    tol: float = 1e-6,
) -> Bool[Array, "*shape"]:
    """Whether the reversible scheme is linearly stable with step size `dt` on a
    problem whose Jacobian has the given eigenvalues (spectral radius of the step
    matrix at most `1 + tol`, for each eigenvalue).

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][], or a plain Diffrax solver,
        which stands for `Reversible(solver)` with the default coupling (as in
        [`diffrax_reversible.step_matrix`][]).
    - `dt`: the step size.
    - `eigenvalues`: eigenvalues of the vector field's Jacobian (complex; any shape),
        e.g. `jnp.linalg.eigvals(jax.jacfwd(f)(y))`, or those that
        [`diffrax_reversible.check_stability`][] estimates.
    - `tol`: slack for the modulus-one eigenvalues of purely oscillatory problems.

    **Returns:**

    A boolean array with the shape of `eigenvalues`.
    """
    z = dt * _as_complex(eigenvalues)
    return spectral_radius(solver, z) <= 1 + tol
