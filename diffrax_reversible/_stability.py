"""Linear stability of the reversible scheme, from its step on `y' = a y`."""

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Complex, Float

from ._solver import Reversible


def _complex_multiplication(t, y, a):
    # `y' = a y` for complex `a` and `y`, as a real system on (Re y, Im y).
    del t
    return jnp.stack([a[0] * y[0] - a[1] * y[1], a[1] * y[0] + a[0] * y[1]])


def _scalar_stability_function(
    solver: Reversible, z: Complex[ArrayLike, ""]
) -> Complex[Array, ""]:
    a = jnp.stack([jnp.real(z), jnp.imag(z)])
    term = diffrax.ODETerm(_complex_multiplication)
    one = jnp.array([1.0, 0.0], dtype=a.dtype)
    x1, _, _, _ = solver.base_step(term, jnp.zeros((), a.dtype), 1.0, one, a)
    return jax.lax.complex(x1[0], x1[1])


def stability_function(
    solver: Reversible, z: Complex[ArrayLike, "*shape"]
) -> Complex[Array, "*shape"]:
    """The stability function `R(z)` of the wrapped base solver: one step of size `h` on
    `y' = a y` multiplies `y` by `R(h a)`. Evaluated by stepping the base solver itself,
    so it is exact for any explicit base.

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][].
    - `z`: the values `h a` (complex; any shape).

    **Returns:**

    `R(z)`, with the shape of `z`.
    """
    z = _as_complex(z)
    flat = jax.vmap(lambda z: _scalar_stability_function(solver, z))(z.reshape(-1))
    return flat.reshape(z.shape)


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


def step_matrix(
    solver: Reversible, z: Complex[ArrayLike, "*shape"]
) -> Complex[Array, "*shape 2 2"]:
    """The matrix `M(z)` of one reversible step on `y' = a y` with `z = h a`:
    `(y1, z1) = M (y0, z0)`. With `R` the base solver's stability function and `λ` the
    coupling,

        y1 = λ y0 + (R(z) - λ) z0
        z1 = (1 - R(-z)) y1 + z0

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][].
    - `z`: the values `h a` (complex; any shape).

    **Returns:**

    An array of shape `z.shape + (2, 2)`.
    """
    z = _as_complex(z)
    forward = stability_function(solver, z)
    backward = stability_function(solver, -z)
    coupling = jnp.asarray(solver.coupling_parameter, dtype=forward.dtype)
    row_y = jnp.stack([coupling * jnp.ones_like(forward), forward - coupling], axis=-1)
    back = (1 - backward)[..., None]
    row_z = back * row_y + jnp.stack(
        [jnp.zeros_like(forward), jnp.ones_like(forward)], axis=-1
    )
    return jnp.stack([row_y, row_z], axis=-2)


def spectral_radius(
    solver: Reversible, z: Complex[ArrayLike, "*shape"]
) -> Float[Array, "*shape"]:
    """The largest modulus of the eigenvalues of [`diffrax_reversible.step_matrix`][]:
    the factor by which the coupled scheme can grow a perturbation per step on
    `y' = a y`, `z = h a`. At most 1 means linearly stable.

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][].
    - `z`: the values `h a` (complex; any shape).

    **Returns:**

    An array with the shape of `z`.
    """
    matrices = step_matrix(solver, z)
    eigenvalues = jnp.linalg.eigvals(matrices.reshape(-1, 2, 2))
    return jnp.max(jnp.abs(eigenvalues), axis=-1).reshape(jnp.shape(z))


def is_linearly_stable(
    solver: Reversible,
    dt: float,
    eigenvalues: Complex[ArrayLike, "*shape"],
    tol: float = 1e-6,
) -> Bool[Array, "*shape"]:
    """Whether the reversible scheme is linearly stable with step size `dt` on a
    problem whose Jacobian has the given eigenvalues (spectral radius of the step
    matrix at most `1 + tol`, for each eigenvalue).

    **Arguments:**

    - `solver`: a [`diffrax_reversible.Reversible`][].
    - `dt`: the step size.
    - `eigenvalues`: eigenvalues of the vector field's Jacobian (complex; any shape),
        e.g. `jnp.linalg.eigvals(jax.jacfwd(f)(y))`.
    - `tol`: slack for the modulus-one eigenvalues of purely oscillatory problems.

    **Returns:**

    A boolean array with the shape of `eigenvalues`.
    """
    z = dt * _as_complex(eigenvalues)
    return spectral_radius(solver, z) <= 1 + tol
