"""`Reversible(SRK)` under Diffrax 0.7.2's SRK step and under the upstream fix of
backward SRK solves (diffrax issue #598, PR #746, in no release yet), side by side.

    git clone https://github.com/sammccallum/diffrax /tmp/fork
    git -C /tmp/fork show 8dd65bb:diffrax/_solver/srk.py > /tmp/srk_fixed.py
    python benchmarks/srk_diffrax_versions.py /tmp/srk_fixed.py

Loads the fixed `srk.py` as a module, swaps `diffrax.AbstractSRK.step` for its step,
and prints the largest difference of the saved solutions between the two, for each SRK
base, solving forwards (0 -> 1) and backwards (1 -> 0) in time, with `Reversible(base)`
and with the base alone. Measured with Diffrax 0.7.2: `Reversible(base)` 0 (bitwise
the same) in every case; the base alone 0 forwards and 1.1 backwards (the bug).
"""

import importlib.util
import sys

import diffrax
import diffrax_reversible as dr
import jax
import jax.numpy as jnp
import jax.random as jr


jax.config.update("jax_enable_x64", True)

spec = importlib.util.spec_from_file_location("diffrax._solver.srk_fixed", sys.argv[1])
fixed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixed)
original_step = diffrax.AbstractSRK.step


def solve(solver, t0, t1, key):
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=2**-12, shape=(2,), key=key, levy_area=diffrax.SpaceTimeLevyArea
    )
    drift = lambda t, y, args: -0.7 * y + jnp.tanh(1.3 * y) + jnp.sin(t)
    diffusion = lambda t, y, args: jnp.array([[0.5, 0.1], [0.0, 0.3]]) * (1 + 0.2 * t)
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm)
    )
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        t0,
        t1,
        (t1 - t0) / 16,
        jnp.array([1.0, -0.5]),
        saveat=diffrax.SaveAt(ts=jnp.linspace(t0, t1, 5)),
    )
    return sol.ys


for name in ["ShARK", "SRA1", "SEA", "SPaRK", "GeneralShARK", "SlowRK"]:
    base = getattr(diffrax, name)()
    for t0, t1 in [(0.0, 1.0), (1.0, 0.0)]:
        out = {}
        for version, step in [
            ("0.7.2", original_step),
            ("#746", fixed.AbstractSRK.step),
        ]:
            diffrax.AbstractSRK.step = step
            out[version, "reversible"] = solve(dr.Reversible(base), t0, t1, jr.key(1))
            out[version, "base"] = solve(base, t0, t1, jr.key(1))
        diffrax.AbstractSRK.step = original_step
        diff = lambda kind: float(
            jnp.max(jnp.abs(out["0.7.2", kind] - out["#746", kind]))
        )
        print(
            f"{name:13s} t {t0:.0f}->{t1:.0f}: |0.7.2 - #746| "
            f"Reversible(base) {diff('reversible'):.1e}, base alone {diff('base'):.1e}"
        )
