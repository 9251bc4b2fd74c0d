"""Steps of stochastic Runge--Kutta base solvers (`diffrax.AbstractSRK`) in either
direction of time.

The coupled scheme takes every base step twice: `Φ_h` forwards and `Φ_{-h}` backwards.
A step with Lévy area over a reversed interval needs the right increments. Over a step
from `t0` to `t1`, with `h = t1 - t0` of either sign and `W_{t0,t1} = W(t1) - W(t0)`,
the Lévy areas of Diffrax's `VirtualBrownianTree`,

    H_{t0,t1} = (1/h) ∫_{t0}^{t1} B(u) du,
    K_{t0,t1} = (1/h²) ∫_{t0}^{t1} B(u) (h/2 - (u - t0)) du,
    B(u) = W_{t0,u} - (u - t0)/h W_{t0,t1},

are defined for `t1 < t0` as well: swapping the ends leaves the integrand of `H` (the
Brownian bridge) and the weight of `K` unchanged, and changes the sign of the integral,
of `h`, and of `W`. So over a reversed interval `W` and `K` change sign and `H` does
not: `H_{t1,t0} = H_{t0,t1}`.

Diffrax 0.7.2's SRK step is right when called with `t1 < t0` on a path evaluated over
`(t1, t0)`, which gives exactly these increments; but in `diffeqsolve`'s backward solves
the terms negate the whole increment, `H` included (diffrax issue #598), and the
upstream fix (PR #746, in no release) compensates inside the step by the sign of the
drift's control, which would then flip the `H` of a direct call. The step here does
not depend on either convention: it is a step *forward* in the reflected time
`s = sign(h) t`, in which no control is negative and every Diffrax version agrees.
"""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._custom_types import Args, DenseInfo, RealScalarLike, Y


def _scale(sign: Array, tree: PyTree) -> PyTree:
    # In each leaf's own dtype: float32 increments stay float32 under float64 times.
    return jtu.tree_map(lambda x: sign.astype(x.dtype) * x, tree)


class _ReflectedDrift(diffrax.AbstractTerm):
    """The drift, in the time `s = sign t`, driven by `ds > 0`: its own control over
    the step is `rate ds`."""

    term: diffrax.AbstractTerm
    sign: Array
    rate: Array

    def vf(self, t, y, args):
        return self.term.vf(self.sign * t, y, args)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return self.term.prod(vf, self.rate * control)


class _ReflectedDiffusion(diffrax.AbstractTerm):
    """The diffusion, in the time `s = sign t`, driven by the Brownian path in that
    time: over `s0 < s1`, the increment from `t = sign s0` to `t = sign s1`, with the
    Lévy areas of that oriented interval (see the module's docstring)."""

    term: diffrax.AbstractTerm
    sign: Array

    def vf(self, t, y, args):
        return self.term.vf(self.sign * t, y, args)

    def contr(self, t0, t1, **kwargs):
        forward = self.sign > 0
        # Evaluated over the interval forwards in the term's own time, where a path
        # gives `dt > 0` and the Lévy areas of the forward interval; a term that
        # negates the whole increment (diffeqsolve's wrapper in a backward solve)
        # gives `dt < 0` and a negated `H`.
        increment = self.term.contr(
            jnp.where(forward, t0, -t1), jnp.where(forward, t1, -t0), **kwargs
        )
        if not isinstance(increment, diffrax.AbstractBrownianIncrement):
            raise ValueError(
                "A stochastic Runge--Kutta base solver in `Reversible` needs a "
                "diffusion driven by a Brownian path (such as "
                "`diffrax.VirtualBrownianTree`), whose increments are "
                "`diffrax.AbstractBrownianIncrement`s; got "
                f"`{type(increment).__name__}`."
            )
        # `dt` is one scalar, or one per leaf of the path, all of one sign.
        dt_sign = jnp.sign(jtu.tree_leaves(increment.dt)[0])
        changes = {
            "dt": _scale(dt_sign, increment.dt),
            "W": _scale(self.sign, increment.W),
        }
        if isinstance(increment, diffrax.AbstractSpaceTimeLevyArea):
            changes["H"] = _scale(jnp.where(dt_sign < 0, -1.0, 1.0), increment.H)
        if isinstance(increment, diffrax.AbstractSpaceTimeTimeLevyArea):
            changes["K"] = _scale(self.sign, increment.K)
        return _replace(increment, changes)

    def prod(self, vf, control):
        return self.term.prod(vf, control)


def _replace(increment, changes: dict):
    names = tuple(changes)
    return eqx.tree_at(
        lambda inc: tuple(getattr(inc, name) for name in names),
        increment,
        tuple(changes[name] for name in names),
    )


def srk_step(
    solver: diffrax.AbstractSRK,
    terms: diffrax.MultiTerm,
    t0: RealScalarLike,
    t1: RealScalarLike,
    x0: Y,
    args: Args,
) -> tuple[Y, Y | None, DenseInfo, diffrax.RESULTS]:
    """One step of a stochastic Runge--Kutta solver from `t0` to `t1`, either way in
    time, as a step forward in the reflected time `s = sign(t1 - t0) t`.

    A forward step (`t0 < t1`) is Diffrax's own, bitwise.

    **Returns:**

    A 4-tuple of the end point, the error estimate, the dense information (the two
    ends: a linear interpolation, the same in either time) and the result.
    """
    time_dtype = jnp.result_type(t0, t1)
    sign = jnp.where(t1 < t0, -1, 1).astype(time_dtype)
    drift, diffusion = terms.terms
    # The drift's own control over the step, per unit of `ds = |t1 - t0|`: `±1` for
    # time, `-1` also in the internal time of `diffeqsolve`'s backward solves, whose
    # terms negate their controls.
    h = t1 - t0
    rate = drift.contr(t0, t1) / jnp.where(h == 0, 1, jnp.abs(h))
    reflected = diffrax.MultiTerm(
        _ReflectedDrift(drift, sign, rate), _ReflectedDiffusion(diffusion, sign)
    )
    s0, s1 = sign * t0, sign * t1
    solver_state = solver.init(reflected, s0, s1, x0, args)
    x1, error, dense_info, _, result = solver.step(
        reflected, s0, s1, x0, args, solver_state, made_jump=True
    )
    return x1, error, dense_info, result
