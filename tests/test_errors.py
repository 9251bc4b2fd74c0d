import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest


def _solve(
    solver=None,
    adjoint=None,
    saveat=diffrax.SaveAt(t1=True),
    terms=None,
    **kwargs,
):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: -y) if terms is None else terms,
        dr.Reversible(diffrax.Tsit5()) if solver is None else solver,
        0.0,
        1.0,
        0.1,
        jnp.array([1.0]),
        saveat=saveat,
        adjoint=dr.ReversibleAdjoint() if adjoint is None else adjoint,
        **kwargs,
    )


def test_solver_not_reversible():
    with pytest.raises(ValueError, match=r"solver=Reversible\(Tsit5\(\)\)"):
        _solve(solver=diffrax.Tsit5())


@pytest.mark.parametrize(
    "base", [diffrax.Kvaerno5(), diffrax.ImplicitEuler(), diffrax.KenCarp4()]
)
def test_implicit_base(base):
    with pytest.raises(ValueError, match="implicit solver"):
        dr.Reversible(base)


@pytest.mark.parametrize(
    "base",
    [
        diffrax.ReversibleHeun(),
        diffrax.LeapfrogMidpoint(),
        dr.Reversible(diffrax.Tsit5()),
    ],
)
def test_stateful_base(base):
    # Natively reversible solvers are pointed to `ReversibleAdjoint` directly.
    match = "is not possible" if type(base) is dr.Reversible else "works directly with"
    with pytest.raises(ValueError, match=match):
        dr.Reversible(base)


@pytest.mark.parametrize("coupling", [0.0, -0.5, 1.5, jnp.array(2.0)])
def test_coupling_out_of_range(coupling):
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        dr.Reversible(diffrax.Tsit5(), coupling_parameter=coupling)


def test_coupling_of_one_is_allowed():
    sol = _solve(solver=dr.Reversible(diffrax.Tsit5(), coupling_parameter=1.0))
    assert jnp.allclose(sol.ys[-1], jnp.exp(-1.0), rtol=1e-6)


def test_max_steps_none():
    with pytest.raises(ValueError, match="max_steps=None"):
        _solve(max_steps=None)


def test_unsafe_brownian_path():
    brownian = diffrax.UnsafeBrownianPath(shape=(1,), key=jr.PRNGKey(0))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y),
        diffrax.ControlTerm(lambda t, y, args: 0.1 * y, brownian),
    )
    with pytest.raises(ValueError, match="VirtualBrownianTree"):
        _solve(terms=terms, solver=dr.Reversible(diffrax.Heun()))


@pytest.mark.parametrize("adjoint", [diffrax.DirectAdjoint(), diffrax.ForwardMode()])
def test_unsafe_brownian_path_under_other_adjoints(adjoint):
    # Diffrax's adjoints that accept `UnsafeBrownianPath` step `Reversible` with a
    # `scan_kind`, whose base steps evaluate the path backwards in time: NaN before.
    brownian = diffrax.UnsafeBrownianPath(shape=(1,), key=jr.PRNGKey(0))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y),
        diffrax.ControlTerm(lambda t, y, args: 0.1 * y, brownian),
    )
    with pytest.raises(
        ValueError, match="`Reversible\\(Heun\\(\\)\\)` does not support"
    ):
        diffrax.diffeqsolve(
            terms,
            dr.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.1,
            jnp.ones(1),
            adjoint=adjoint,
        )


def test_time_gradients_with_adaptive_steps_raise_clearly():
    def loss(t1):
        return jnp.sum(
            diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: -y),
                dr.Reversible(diffrax.Tsit5()),
                0.0,
                t1,
                0.1,
                jnp.array([1.0]),
                stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
                adjoint=dr.ReversibleAdjoint(),
            ).ys
        )

    with pytest.raises(ValueError, match="ConstantStepSize` and `StepTo` only"):
        jax.grad(loss)(1.0)


def test_controller_gradients_raise_clearly():
    # `StepTo(ts)` gradients are supported (tests/test_drop_in.py); other controllers'
    # arrays are refused while JAX traces the derivative, with a `ValueError`.
    def loss(step_ts):
        controller = diffrax.ClipStepSizeController(
            diffrax.PIDController(rtol=1e-3, atol=1e-6), step_ts=step_ts
        )
        return jnp.sum(
            diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: -y),
                dr.Reversible(diffrax.Tsit5()),
                0.0,
                1.0,
                0.1,
                jnp.array([1.0]),
                stepsize_controller=controller,
                adjoint=dr.ReversibleAdjoint(),
            ).ys
        )

    with pytest.raises(ValueError, match="step size controller other than `StepTo"):
        jax.grad(loss)(jnp.array([0.3, 0.6]))


def test_reversible_heun_with_jumps():
    controller = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=1e-3, atol=1e-3), jump_ts=[0.5]
    )
    with pytest.raises(ValueError, match="jump_ts"):
        _solve(solver=diffrax.ReversibleHeun(), stepsize_controller=controller)


def test_event_root_with_saved_steps():
    import optimistix as optx

    event = diffrax.Event(
        lambda t, y, args, **kwargs: y[0] - 0.5, root_finder=optx.Newton(1e-8, 1e-8)
    )
    with pytest.raises(ValueError, match="root_finder"):
        _solve(event=event, saveat=diffrax.SaveAt(steps=True))


@pytest.mark.parametrize(
    "base,match",
    [
        (diffrax.QUICSORT(0.1), "underdamped Langevin"),
        (diffrax.SemiImplicitEuler(), "works directly with"),
        (diffrax.Kvaerno5(), "implicit solver"),
    ],
)
def test_refused_bases_name_the_alternative(base, match):
    with pytest.raises(ValueError, match=match):
        dr.Reversible(base)


class _CrankNicolson(diffrax.AbstractSolver):
    # As in Diffrax's heat-equation example: implicit, but not an
    # `AbstractImplicitSolver`.
    term_structure = diffrax.ODETerm
    interpolation_cls = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        raise NotImplementedError

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def test_solver_not_known_to_be_explicit_is_refused():
    with pytest.raises(ValueError, match="not known to be one"):
        dr.Reversible(_CrankNicolson())
