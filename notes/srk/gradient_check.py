# Prototype check (branch srk-bases): Reversible(SRK) gradients, ReversibleAdjoint vs RCA.
import sys; sys.path.insert(0, ".")
import jax
jax.config.update("jax_enable_x64", True)
import diffrax, jax.numpy as jnp, jax.random as jr, equinox as eqx
import diffrax_reversible as dr
print(dr.__file__)

def run(base, adaptive, noise):
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=2**-12, shape=(2,), key=jr.key(3),
                                     levy_area=diffrax.SpaceTimeLevyArea)
    def drift(t, y, a): return -a[0] * y + jnp.tanh(a[1] * y) + jnp.sin(t)
    if noise == "additive":
        def diff(t, y, a): return a[2] * jnp.array([[0.5, 0.1], [0.0, 0.3]]) * (1 + 0.2 * t)
    else:
        def diff(t, y, a): return a[2] * jnp.diag(jnp.cos(y))  # diagonal -> commutative
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diff, bm))
    ctrl = diffrax.PIDController(rtol=1e-4, atol=1e-4) if adaptive else diffrax.ConstantStepSize()
    def loss(args, y0, adjoint):
        sol = diffrax.diffeqsolve(terms, dr.Reversible(base), 0.0, 1.0, 0.05, y0, args,
                                  saveat=diffrax.SaveAt(ts=jnp.linspace(0, 1, 5)),
                                  stepsize_controller=ctrl, adjoint=adjoint, max_steps=400)
        return jnp.sum(sol.ys ** 2)
    args = jnp.array([0.7, 1.3, 0.9]); y0 = jnp.array([1.0, -0.5])
    g1 = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(args, y0, dr.ReversibleAdjoint())
    g2 = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(args, y0, diffrax.RecursiveCheckpointAdjoint())
    err = max(float(jnp.max(jnp.abs(a - b) / (jnp.abs(b) + 1e-12))) for a, b in zip(g1, g2))
    return err

for base, noises, adaptive in [(diffrax.ShARK(), ["additive"], [False, True]),
                               (diffrax.SRA1(), ["additive"], [False, True]),
                               (diffrax.SEA(), ["additive"], [False]),
                               (diffrax.SPaRK(), ["additive", "diagonal"], [False, True]),
                               (diffrax.GeneralShARK(), ["additive", "diagonal"], [False]),
                               (diffrax.SlowRK(), ["additive", "diagonal"], [False])]:
    for noise in noises:
        for ad in adaptive:
            try:
                print(type(base).__name__, noise, "adaptive" if ad else "constant", f"{run(base, ad, noise):.1e}", flush=True)
            except Exception as e:
                print(type(base).__name__, noise, ad, "ERROR", type(e).__name__, str(e)[:300], flush=True)
