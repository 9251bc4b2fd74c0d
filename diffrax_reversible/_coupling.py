"""The coupling `λ` of the reversible scheme: chosen per step from the local decay of
the dynamics, and watched for the instability of its parasitic mode (the gap between
the two states growing)."""

import warnings

import diffrax
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, PyTree

from ._custom_types import Args, RealScalarLike, Y


# The automatic coupling's range: at most the fixed default (so neutral and oscillatory
# dynamics are unchanged), and at least a value below which reconstructing even one
# step loses more digits (`-log10 λ`) than it is worth.
AUTO_COUPLING_MAX = 0.999
AUTO_COUPLING_MIN = 0.01


def auto_coupling(decay: ArrayLike) -> ArrayLike:
    """The automatic coupling for a step along which the dynamics decay by `e^{-decay}`
    (`decay = a h` for a local decay rate `a` and step `h`): `λ = e^{-2 decay}`, clipped
    to `[AUTO_COUPLING_MIN, AUTO_COUPLING_MAX]`. Then the parasitic mode of the coupled
    scheme, whose eigenvalue is about `λ e^{decay}`, decays as fast as the physical one.
    """
    decay = jnp.asarray(decay)
    return jnp.clip(jnp.exp(-2 * decay), AUTO_COUPLING_MIN, AUTO_COUPLING_MAX)


def _sum_of_products(xs: Y, ys: Y) -> ArrayLike:
    # In the default float type, so that leaves of several dtypes can be added.
    dtype = jnp.result_type(float)
    products = [
        jnp.sum(x * y).astype(dtype)
        for x, y in zip(jtu.tree_leaves(xs), jtu.tree_leaves(ys))
    ]
    return sum(products, start=jnp.zeros((), dtype))


def local_decay(
    terms: PyTree[diffrax.AbstractTerm],
    t0: RealScalarLike,
    t1: RealScalarLike,
    x0: Y,
    args: Args,
    direction: Y | None,
    control: PyTree | None = None,
) -> ArrayLike:
    """An estimate of `a h`, the decay over the step `t0 -> t1` of the most damped
    dynamics at `x0`: minus the Rayleigh quotient `<v, J v> / <v, v>` of the Jacobian
    `J` of the step's increment `x -> f(t0, x, args) (t1 - t0)` (the whole term, so
    also a diffusion or a control), along `v = direction`, or along the increment
    itself when `direction` is `None`. Negative where the dynamics grow along `v`;
    zero on rotations, and where `v` vanishes.

    A base solver's error estimate makes a good `direction`: it is dominated by the
    fastest modes the step resolves, which are the ones the coupled scheme's parasitic
    mode grows along.
    """
    if control is None:
        control = terms.contr(t0, t1)

    def increment(x):
        return terms.vf_prod(t0, x, args, control)

    if direction is None:
        direction, linear_increment = jax.linearize(increment, x0)
        direction_change = linear_increment(direction)
    else:
        _, direction_change = jax.jvp(increment, (x0,), (direction,))
    norm = _sum_of_products(direction, direction)
    quotient = _sum_of_products(direction, direction_change) / jnp.where(
        norm > 0, norm, 1
    )
    return jnp.where(norm > 0, -quotient, 0)


def solution_growth(x0: Y, x1: Y) -> ArrayLike:
    """`log(|x1| / |x0|)`, the growth of the solution over a step (zero where either
    vanishes)."""
    norm0 = _sum_of_products(x0, x0)
    norm1 = _sum_of_products(x1, x1)
    valid = (norm0 > 0) & (norm1 > 0)
    ratio = jnp.where(valid, norm1, 1) / jnp.where(valid, norm0, 1)
    return 0.5 * jnp.log(ratio)


def _max_abs(x: Y) -> list[ArrayLike]:
    dtype = jnp.result_type(float)
    return [
        jnp.max(jnp.abs(leaf), initial=0).astype(dtype) for leaf in jtu.tree_leaves(x)
    ]


def gap_is_unstable(
    gap0: Y,
    gap1: Y,
    y0: Y,
    y1: Y,
    increment: Y,
    peak: list[ArrayLike],
    tol: float,
    noisy: bool = False,
) -> ArrayLike:
    """Whether the two states of the coupled scheme are drifting apart: for some leaf of
    the state, the gap `max|y - z|` grew in this step (from a nonzero one: a single
    large step is not a drift), and exceeds both `tol` times the solution's scale in
    this step (`max|y|` at either end, or the increment where the solution crosses
    zero), and `PEAK_TOL` times the largest `max|y|` so far (`peak`). With `noisy` (an
    SDE), the solution's scale is at least `peak`: a path crosses zero in every
    component at once at random, where the gap, the accumulated error of a first-order
    base, does not vanish (`Reversible(SEA())` at `dt = 1/8` on an Ornstein--Uhlenbeck
    process: a gap of 7% of the peak, at 77% of the local scale). A parasitic mode grows
    geometrically and passes `tol` times the peak a few steps later.

    Both `y` and `z` approximate the solution, so in a healthy solve the gap stays at
    the level of the accumulated error of the base solver; when the coupling does not
    damp the parasitic mode it grows geometrically, past the solution. The second test
    spares a solution that decayed below an adaptive solve's `atol`, where the gap sits
    at the level of `atol`."""
    out = jnp.zeros((), bool)
    leaves = zip(
        _max_abs(gap0),
        _max_abs(gap1),
        _max_abs(y0),
        _max_abs(y1),
        _max_abs(increment),
        peak,
    )
    for g0, g1, a, b, c, p in leaves:
        scale = jnp.maximum(jnp.maximum(a, b), c)
        if noisy:
            scale = jnp.maximum(scale, p)
        growing = (g1 > g0) & (g0 > 0)
        out = out | (growing & (g1 > tol * scale) & (g1 > PEAK_TOL * p))
    return out


def leaf_scales(x: Y) -> list[ArrayLike]:
    """`max|x|` for each leaf of `x`, in the default float type."""
    return _max_abs(x)


def with_gap_growth(base_error: Y | None, gap0: Y, gap1: Y) -> Y | None:
    """The base solver's error estimate, plus how much the gap `y - z` between the two
    states grew in this step (per leaf, along `gap1`). A healthy step only adds to the
    gap at the level of the local error; where the coupled scheme is unstable (too large
    a step on decaying dynamics) the gap grows geometrically, and the step size
    controller then rejects the step and shrinks it, as it would for the base error."""
    if base_error is None:
        return None

    def add_growth(error, g0, g1):
        norm0 = jnp.sqrt(jnp.sum(g0 * g0))
        norm1 = jnp.sqrt(jnp.sum(g1 * g1))
        growth = jnp.where(norm1 > norm0, 1 - norm0 / jnp.where(norm1 > 0, norm1, 1), 0)
        return jnp.abs(error) + growth * jnp.abs(g1)

    return jtu.tree_map(add_growth, base_error, gap0, gap1)


def reproducible(error: Y | None) -> Y | None:
    """The error estimate with the lower half of each mantissa cleared.

    It only steers the step size, and its last bits are round-off that differs between
    differently compiled programs evaluating the same step (XLA fuses and contracts
    multiply-adds per program). A backward pass that recomputes the forward solve
    (`diffrax.RecursiveCheckpointAdjoint`) would then choose steps a few ulps apart,
    and on an SDE a step time moved by `δ` moves a Brownian increment by about `√δ`:
    its gradient was 1e-3 to 4e-2 off that of the solve it differentiates.
    """
    if error is None:
        return None
    return jtu.tree_map(_clear_low_mantissa_bits, error)


def _clear_low_mantissa_bits(x):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        real = _clear_low_mantissa_bits(jnp.real(x))
        return lax.complex(real, _clear_low_mantissa_bits(jnp.imag(x)))
    if not jnp.issubdtype(dtype, jnp.floating):
        return x
    finfo = jnp.finfo(dtype)
    int_dtype = {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[finfo.bits]
    mask = jnp.asarray(~((1 << (finfo.nmant // 2)) - 1), int_dtype)
    bits = lax.bitcast_convert_type(x, int_dtype)
    return lax.bitcast_convert_type(bits & mask, dtype)


# See `gap_is_unstable`. In a healthy solve the gap is the accumulated difference of two
# solutions of the same order: 10% of the solution for Euler at `h ω = 0.17` (hence a
# looser bound for first-order bases), below 1e-3 for Heun and 1e-8 for Tsit5 there.
# A gap that sits at 10-20% of the solution already biases a nonlinear solve by far
# more (Diffrax's Kalman filter example: the covariance 4x too large).
PARASITIC_TOL = 0.1
FIRST_ORDER_TOL = 0.5
PEAK_TOL = 1e-3


UNSTABLE_COUPLING_MESSAGE = (
    "`Reversible`: the coupled scheme is unstable on this problem: its two states "
    "`y` and `z` drifted apart (its parasitic mode grew), so the solution is not to be "
    "trusted. This happens on strongly decaying (damped, stiff) dynamics. Consider "
    '`Reversible(..., coupling_parameter="auto")` (the default) instead of a fixed '
    "coupling, a smaller coupling parameter, or smaller steps (e.g. a smaller `dt0`, "
    "or `dtmax` on the step size controller). "
    "`diffrax_reversible.check_stability` suggests a coupling and a step size."
)


def _warn_unstable_coupling():
    warnings.warn(UNSTABLE_COUPLING_MESSAGE, RuntimeWarning, stacklevel=1)


def report_instability(unstable: ArrayLike) -> diffrax.RESULTS:
    """Diffrax can only carry its own messages: the step returns one of its failures,
    and a warning says what it means. `unvmap_any` makes the warning's condition
    unbatched, so that under `jax.vmap` it is not run on every step."""
    lax.cond(
        eqxi.unvmap_any(unstable),
        lambda: jax.debug.callback(_warn_unstable_coupling),
        lambda: None,
    )
    return diffrax.RESULTS.where(
        unstable, diffrax.RESULTS.nonlinear_divergence, diffrax.RESULTS.successful
    )
