# Does Diffrax 0.7.2's SRK step, called directly with t1 < t0 (as Reversible does),
# undo a forward step to the base's local order? Additive-noise OU-like SDE.
import jax
jax.config.update("jax_enable_x64", True)
import diffrax, jax.numpy as jnp, jax.random as jr, numpy as np

def drift(t, y, args): return -0.7 * y + jnp.sin(t)
def diff(t, y, args): return jnp.array([[0.5, 0.1], [0.0, 0.3]]) * (1 + 0.2 * t)

def roundtrip(solver, h, key):
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=2**-14, shape=(2,), key=key,
                                     levy_area=diffrax.SpaceTimeLevyArea)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diff, bm))
    x0 = jnp.array([1.0, -0.5]); t0 = 0.25; t1 = t0 + h
    st = solver.init(terms, t0, t1, x0, None)
    x1, *_ = solver.step(terms, t0, t1, x0, None, st, made_jump=True)
    st = solver.init(terms, t1, t0, x1, None)
    xb, *_ = solver.step(terms, t1, t0, x1, None, st, made_jump=True)
    return float(jnp.linalg.norm(xb - x0))

for solver in [diffrax.Heun(), diffrax.ShARK(), diffrax.SRA1(), diffrax.SEA(),
               diffrax.SPaRK(), diffrax.GeneralShARK(), diffrax.SlowRK()]:
    hs = [2.0**-k for k in range(2, 8)]
    errs = [np.mean([roundtrip(solver, h, jr.key(i)) for i in range(20)]) for h in hs]
    slope = np.polyfit(np.log2(hs), np.log2(errs), 1)[0]
    print(type(solver).__name__, " ".join(f"{e:.1e}" for e in errs), f"slope {slope:.2f}")
