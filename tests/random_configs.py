"""Randomized differential test of `ReversibleAdjoint` against Diffrax's
`RecursiveCheckpointAdjoint` (issue 19).

A seeded generator draws a configuration (solver, coupling, ODE/SDE/CDE, controller,
`SaveAt` mix, event, `vmap`, pytree state, time direction, what is differentiated),
builds a small, well-conditioned problem from it, and evaluates one scalar loss (sum of
squares of everything saved, the saved times, and `sol.evaluate` at a few points if
dense) and its gradient with `ReversibleAdjoint()` and with
`RecursiveCheckpointAdjoint()` on the same solver, in float64. Each case is classified:

- `agree`: loss and every gradient leaf agree to `TOL` (relative);
- `refused`: a `ValueError` at trace time with `ReversibleAdjoint` whose message names
  `ReversibleAdjoint` or `Reversible`;
- `defect`: anything else (another exception, an uninformative `ValueError`, different
  numbers);
- `reference_failed`: `RecursiveCheckpointAdjoint` itself failed (not a defect).

Adaptive SDEs are the exception: each adjoint is compared with
`RecursiveCheckpointAdjoint` on the same solve stepping (`StepTo`) to the accepted step
times of that adjoint's own solve (saved by an extra `SubSaveAt(steps=True)` left out
of the loss), and the direct comparison is recorded too. Step times recorded by a
separate forward solve are not good enough: an adaptive SDE solve amplifies round-off
in its step times (~10x a step, through the Brownian increments in the error
estimate), so a differently compiled program steps differently (1e-17 growing to 5e-7
over 18 steps was measured), and its gradients differ by ~1e-5.

Case `index` of `seed` depends on `(seed, index)` only, so any case replays alone:

    python -m tests.random_configs --cases 500 --seed 1234        # long profile
    python -m tests.random_configs --seed 1234 --case 17          # replay one case
    python -m tests.random_configs --config '{"seed": 1234, ...}' # replay a config

`tests/test_randomized.py` runs a fast profile (fixed seed) and a CI profile
(`-m slow`, `DIFFRAX_REVERSIBLE_RANDOM_CASES`, `DIFFRAX_REVERSIBLE_RANDOM_SEED`).
"""

import argparse
import collections
import dataclasses
import json
import logging
import re
import sys
import time
import traceback
from typing import Any

import diffrax
import diffrax_reversible as dr
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx


# Both adjoints differentiate the same discrete solve in float64: they differ by the
# round-off of the backward reconstruction only (observed ~1e-14 in the other tests).
TOL = 1e-8
# A gradient leaf is compared relative to its own size, but not below this fraction of
# the largest gradient (a leaf that is zero in exact arithmetic is round-off).
LEAF_FLOOR = 1e-4
MAX_STEPS = 256
# Compile time is most of a case's time: LLVM's optimisations cost ~30% of it and make
# no difference to what is compared (both adjoints are compiled alike).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

REVERSIBLE_BASES = (
    "Euler",
    "Heun",
    "Midpoint",
    "Ralston",
    "Bosh3",
    "Tsit5",
    "Dopri5",
    "Dopri8",
    "EulerHeun",
)
NATIVE_SOLVERS = ("ReversibleHeun", "LeapfrogMidpoint", "SemiImplicitEuler")
# Bases with an error estimate, so usable with an adaptive controller.
ADAPTIVE = ("Heun", "Midpoint", "Ralston", "Bosh3", "Tsit5", "Dopri5", "Dopri8")
ADAPTIVE_NATIVE = ("ReversibleHeun",)
SDE_BASES = ("Heun", "Midpoint", "Ralston", "EulerHeun")
COUPLINGS = (0.999, 0.9, 0.5, "auto")
_RTOLS = {
    "Heun": (1e-2, 3e-3, 1e-3),
    "Midpoint": (1e-2, 3e-3, 1e-3),
    "Ralston": (1e-2, 3e-3, 1e-3),
    "ReversibleHeun": (1e-2, 3e-3, 1e-3),
    "Bosh3": (3e-3, 1e-3, 1e-4),
    "Tsit5": (1e-3, 1e-4, 1e-5),
    "Dopri5": (1e-3, 1e-4, 1e-5),
    "Dopri8": (1e-4, 1e-6),
}
OUTCOMES = ("agree", "refused", "defect", "reference_failed")
# Differentiated inputs that are times.
TIME_INPUTS = {"t1", "saveat_ts", "stepto_ts"}


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    index: int
    problem: str  # "ode", "sde", "cde"
    solver: str  # a base wrapped by `Reversible`, or one of NATIVE_SOLVERS
    coupling: Any  # float, "auto", or None (native solvers)
    noise: str | None  # sde: "matrix" (m channels) or "diagonal"
    noise_channels: int
    interpolation: str | None  # cde: "cubic" or "linear"
    closure: bool  # the vector field a lambda closing over the model, not a Module
    state: str  # "array", "dict", "tuple", "qp" (SemiImplicitEuler)
    dim: int
    reverse_time: bool
    t_end: float  # |t1 - t0|
    controller: str  # "constant", "step_to", "pid", "clip"
    num_steps: int  # constant / step_to
    step_to_uniform: bool
    step_to_from_t1: bool  # StepTo(ts=jnp.linspace(t0, t1, n + 1)) with t1 traced
    rtol: float
    pid_limits: bool  # dtmin, dtmax, factormax
    clip_step_ts: bool
    clip_jump_ts: bool
    # "t0", "t1", "ts", "steps", "steps=n", "fn", "dense", "subs"
    saveat: tuple[str, ...]
    event: str | None  # "real", "boolean", "several"
    root_finder: str | None  # "newton", "bisection"
    batch: int  # 0: no vmap
    wrt: tuple[str, ...]  # "mlp", "y0", "args", "t1", "saveat_ts", "stepto_ts", "data"
    key: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        fields = json.loads(text)
        for name in ("saveat", "wrt"):
            fields[name] = tuple(fields[name])
        return cls(**fields)

    def solver_name(self) -> str:
        if self.solver in NATIVE_SOLVERS:
            return self.solver
        return f"Reversible({self.solver})"

    def controller_name(self) -> str:
        if self.controller == "clip":
            clips = (("step", self.clip_step_ts), ("jump", self.clip_jump_ts))
            parts = [name for name, on in clips if on]
            return "clip(" + "+".join(parts) + ")"
        if self.controller == "step_to" and self.step_to_from_t1:
            return "step_to(linspace(t0,t1))"
        return self.controller

    def problem_name(self) -> str:
        if self.problem == "sde":
            return f"sde/{self.noise}"
        if self.problem == "cde":
            return f"cde/{self.interpolation}"
        return "ode"

    def describe(self) -> str:
        event = "none" if self.event is None else f"{self.event}/{self.root_finder}"
        return (
            f"{self.solver_name()} coupling={self.coupling} {self.problem_name()} "
            f"field={'closure' if self.closure else 'module'} "
            f"state={self.state}[{self.dim}] controller={self.controller_name()} "
            f"n={self.num_steps} rtol={self.rtol} saveat={'+'.join(self.saveat)} "
            f"event={event} batch={self.batch} wrt={'+'.join(self.wrt)} "
            f"{'t1<t0' if self.reverse_time else 't0<t1'} T={self.t_end}"
        )

    def replay_command(self) -> str:
        return f"python -m tests.random_configs --seed {self.seed} --case {self.index}"

    def complexity(self) -> float:
        """How much is going on, to pick the simplest example of a defect."""
        return (
            len(self.saveat)
            + len(self.wrt)
            + 2 * (self.event is not None)
            + 2 * (self.batch > 0)
            + (self.state not in ("array", "qp"))
            + (self.controller == "clip")
            + self.reverse_time
            + self.num_steps / 100
        )


_AUTO_AVAILABLE = None


def auto_coupling_available() -> bool:
    """Whether `Reversible(..., coupling_parameter="auto")` constructs here."""
    global _AUTO_AVAILABLE
    if _AUTO_AVAILABLE is None:
        try:
            dr.Reversible(diffrax.Heun(), coupling_parameter="auto")  # pyright: ignore
        except Exception:
            _AUTO_AVAILABLE = False
        else:
            _AUTO_AVAILABLE = True
    return _AUTO_AVAILABLE


def _pick(rng, options: dict):
    names = list(options)
    weights = np.array([options[name] for name in names], dtype=float)
    return names[rng.choice(len(names), p=weights / weights.sum())]


def draw_config(seed: int, index: int) -> Config:
    """The configuration of case `index` of `seed` (independent of the other cases)."""
    rng = np.random.default_rng([seed, index])
    problem = _pick(rng, {"ode": 0.55, "sde": 0.25, "cde": 0.2})
    if problem == "ode":
        solver = _pick(
            rng,
            {
                "Euler": 0.08,
                "Heun": 0.08,
                "Midpoint": 0.07,
                "Ralston": 0.07,
                "Bosh3": 0.08,
                "Tsit5": 0.13,
                "Dopri5": 0.09,
                "Dopri8": 0.03,
                "ReversibleHeun": 0.1,
                "LeapfrogMidpoint": 0.07,
                "SemiImplicitEuler": 0.12,
            },
        )
    elif problem == "sde":
        solver = _pick(
            rng,
            {
                "Heun": 0.25,
                "Midpoint": 0.18,
                "Ralston": 0.17,
                "EulerHeun": 0.15,
                "ReversibleHeun": 0.17,
                "Euler": 0.04,  # an Itô base: rejected
            },
        )
    else:
        solver = _pick(
            rng,
            {
                "Euler": 0.08,
                "Heun": 0.12,
                "Midpoint": 0.08,
                "Ralston": 0.08,
                "Bosh3": 0.1,
                "Tsit5": 0.2,
                "Dopri5": 0.1,
                "ReversibleHeun": 0.14,
                "LeapfrogMidpoint": 0.1,
            },
        )
    # Drawn for every solver, so that the rest of the draw does not depend on it.
    coupling = COUPLINGS[rng.choice(len(COUPLINGS), p=[0.4, 0.25, 0.15, 0.2])]
    if solver in NATIVE_SOLVERS:
        coupling = None
    elif coupling == "auto" and not auto_coupling_available():
        coupling = 0.999
    noise = None
    noise_channels = 0
    interpolation = None
    if problem == "sde":
        noise = _pick(rng, {"matrix": 0.7, "diagonal": 0.3})
        noise_channels = int(rng.integers(1, 3))
    elif problem == "cde":
        interpolation = _pick(rng, {"cubic": 0.6, "linear": 0.4})
    if solver == "SemiImplicitEuler":
        state = "qp"
        dim = int(rng.choice([2, 4]))
    else:
        dim = int(rng.integers(2, 5))
        if problem == "cde" or noise == "diagonal":
            state = "array"
        else:
            state = _pick(rng, {"array": 0.6, "dict": 0.2, "tuple": 0.2})
    closure = bool(rng.random() < 0.4)
    reverse_time = bool(rng.random() < 0.25)
    t_end = float(np.round(rng.uniform(1.0, 2.0), 2))

    adaptive = solver in ADAPTIVE or solver in ADAPTIVE_NATIVE
    if adaptive:
        controller = _pick(
            rng, {"constant": 0.25, "step_to": 0.2, "pid": 0.35, "clip": 0.2}
        )
    else:
        controller = _pick(rng, {"constant": 0.55, "step_to": 0.45})
    # Round-off in the reconstruction grows like λ^{-N}: keep N small for λ = 0.5.
    max_n = 16 if coupling == 0.5 else 60
    num_steps = int(rng.integers(8, max_n + 1))
    step_to_uniform = bool(rng.random() < 0.5)
    # Tolerances for which each base takes ~10-60 steps on these problems.
    rtols = _RTOLS.get(solver, (1e-3,))
    rtol = float(rtols[0] if coupling == 0.5 else rng.choice(rtols))
    pid_limits = bool(rng.random() < 0.3)
    clip = [(True, False), (False, True), (True, True)][rng.integers(3)]
    clip_step_ts, clip_jump_ts = clip if controller == "clip" else (False, False)

    saveat = []
    if rng.random() < 0.3:
        saveat.append("t0")
    if rng.random() < 0.6:
        saveat.append("t1")
    if rng.random() < 0.5:
        saveat.append("ts")
    if rng.random() < 0.3:
        saveat.append("steps" if rng.random() < 0.5 else f"steps={rng.integers(2, 4)}")
    if rng.random() < 0.25:
        saveat.append("fn")
    if rng.random() < 0.2:
        saveat.append("dense")
    if rng.random() < 0.15:
        saveat.append("subs")
    if not any(k in saveat for k in ("t0", "t1", "ts", "dense")) and not any(
        k.startswith("steps") for k in saveat
    ):
        saveat.insert(0, "t1")

    event = None
    root_finder = None
    if rng.random() < 0.15:
        event = _pick(rng, {"real": 0.5, "boolean": 0.3, "several": 0.2})
        if event == "boolean":
            root_finder = _pick(rng, {None: 0.7, "newton": 0.3})
        elif event == "several":
            # `optx.Bisection` takes one real `cond_fn` only (Diffrax then fails).
            root_finder = _pick(rng, {None: 0.4, "newton": 0.6})
        else:
            root_finder = _pick(rng, {None: 0.3, "newton": 0.4, "bisection": 0.3})

    batch = int(rng.choice([2, 3])) if rng.random() < 0.2 else 0

    wrt = []
    if rng.random() < 0.5:
        wrt.append("mlp")
    if rng.random() < 0.5:
        wrt.append("y0")
    if rng.random() < 0.4:
        wrt.append("args")
    if rng.random() < (0.25 if controller in ("constant", "step_to") else 0.04):
        wrt.append("t1")  # with an adaptive controller: rejected
    if ("ts" in saveat or "subs" in saveat) and rng.random() < 0.35:
        wrt.append("saveat_ts")
    if controller == "step_to" and rng.random() < 0.1:
        wrt.append("stepto_ts")
    if problem == "cde" and rng.random() < 0.3:
        wrt.append("data")
    if not wrt:
        wrt.append("y0")
    step_to_from_t1 = (
        controller == "step_to"
        and "t1" in wrt
        and "stepto_ts" not in wrt
        and bool(rng.random() < 0.6)
    )
    if step_to_from_t1:
        step_to_uniform = True
    return Config(
        seed=seed,
        index=index,
        problem=problem,
        solver=solver,
        coupling=coupling,
        noise=noise,
        noise_channels=noise_channels,
        interpolation=interpolation,
        closure=closure,
        state=state,
        dim=dim,
        reverse_time=reverse_time,
        t_end=t_end,
        controller=controller,
        num_steps=num_steps,
        step_to_uniform=step_to_uniform,
        step_to_from_t1=step_to_from_t1,
        rtol=rtol,
        pid_limits=pid_limits,
        clip_step_ts=clip_step_ts,
        clip_jump_ts=clip_jump_ts,
        saveat=tuple(saveat),
        event=event,
        root_finder=root_finder,
        batch=batch,
        wrt=tuple(wrt),
        key=int(rng.integers(2**31)),
    )


_STAGES = {
    "Euler": 1,
    "Heun": 2,
    "Midpoint": 2,
    "Ralston": 2,
    "EulerHeun": 2,
    "Bosh3": 4,
    "Tsit5": 7,
    "Dopri5": 7,
    "Dopri8": 13,
    "ReversibleHeun": 2,
    "LeapfrogMidpoint": 1,
    "SemiImplicitEuler": 1,
}


def estimated_cost(config: Config) -> float:
    """Roughly the compile time of a case, in units of the cheapest ones (~4 s)."""
    cost = 1 + _STAGES[config.solver] / 7
    if config.state in ("dict", "tuple"):
        cost *= 1.3
    cost += 0.3 * ("subs" in config.saveat) + 0.2 * ("dense" in config.saveat)
    cost += 0.3 * (config.event is not None) + 0.2 * (config.batch > 0)
    if config.problem == "sde" and config.controller in ("pid", "clip"):
        # One or two `StepTo` references per batch element besides.
        cost *= 2 + max(config.batch, 1)
    return cost


def cheap_cases(seed: int, num_cases: int, max_cost: float) -> list[int]:
    """The first `num_cases` case indices of `seed` of estimated cost <= `max_cost`."""
    indices = []
    index = 0
    while len(indices) < num_cases:
        if estimated_cost(draw_config(seed, index)) <= max_cost:
            indices.append(index)
        index += 1
    return indices


def documented_rejection(config: Config) -> str | None:
    """Why the support table (docs/supported.md) says `ReversibleAdjoint` rejects
    `config` (None: supported)."""
    if config.problem == "sde" and config.solver == "Euler":
        return "Itô base for an SDE"
    if "t1" in config.wrt and config.controller in ("pid", "clip"):
        return "time gradients with an adaptive controller"
    if config.solver == "ReversibleHeun" and config.clip_jump_ts:
        return "ReversibleHeun with jump_ts"
    # `subs` always has a `SubSaveAt(steps=2)`.
    steps = any(k.startswith("steps") for k in config.saveat) or "subs" in config.saveat
    if config.root_finder is not None and (steps or "dense" in config.saveat):
        return "event root_finder with SaveAt(steps/dense)"
    return None


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def _flatten(y):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jtu.tree_leaves(y)])


def _unflatten(x, like):
    leaves, treedef = jtu.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(x[start : start + leaf.size].reshape(leaf.shape))
        start += leaf.size
    return jtu.tree_unflatten(treedef, out)


def _structure(config: Config, x: np.ndarray):
    """A flat state `x` as the configured pytree."""
    x = jnp.asarray(x)
    k = config.dim // 2
    if config.state == "dict":
        return {"a": x[:k], "b": x[k:]}
    if config.state in ("tuple", "qp"):
        return (x[:k], x[k:])
    return x


class _Field(eqx.Module):
    """ODE vector field / SDE drift: mild damping plus a tanh MLP, any pytree state."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        x = _flatten(y)
        dx = -args["damping"] * x + args["scale"] * self.mlp(x) + 0.3 * jnp.sin(t)
        return _unflatten(dx, y)


class _Diffusion(eqx.Module):
    """Per state leaf of shape (k,), a (k, m) matrix depending on the state."""

    c0: Any
    c1: Any

    def __call__(self, t, y, args):
        return jtu.tree_map(
            lambda leaf, c0, c1: args["sigma"] * (jnp.tanh(leaf)[:, None] * c1 + c0),
            y,
            self.c0,
            self.c1,
        )


class _DiagonalDiffusion(eqx.Module):
    def __call__(self, t, y, args):
        return lx.DiagonalLinearOperator(args["sigma"] * (0.3 + 0.2 * jnp.cos(y)))


class _CDEField(eqx.Module):
    mlp: eqx.nn.MLP
    channels: int

    def __call__(self, t, y, args):
        out = args["scale"] * self.mlp(y).reshape(y.shape[0], self.channels)
        # Damping along the first (time) channel.
        return out.at[:, 0].add(-args["damping"] * y)


class _Kick(eqx.Module):
    """SemiImplicitEuler's second term: sees `q` only, and does arithmetic on it."""

    mlp: eqx.nn.MLP

    def __call__(self, t, q, args):
        return -(args["damping"] ** 2 + 1.0) * q + 0.3 * self.mlp(q) + 0.2 * jnp.sin(t)


def _drift_of_momentum(t, p, args):
    # SemiImplicitEuler's first term: sees `p` only.
    return args["scale"] * p


class Case:
    """Everything needed to solve `config`'s problem with a given adjoint."""

    def __init__(self, config: Config):
        self.config = c = config
        rng = np.random.default_rng(c.key)
        key = jax.random.PRNGKey(c.key)
        mlp_key, brownian_key = jax.random.split(key)
        T = c.t_end
        self.t0, self.t1 = (T, 0.0) if c.reverse_time else (0.0, T)
        self.direction = -1.0 if c.reverse_time else 1.0

        # The state.
        y0 = rng.uniform(-1.0, 1.0, size=c.dim)
        y0[0] = abs(y0[0]) + 0.5  # so the events (first component falls) can fire
        self.event_level = 0.5 * float(y0[0])
        if c.batch:
            y0s = y0 + 0.2 * rng.normal(size=(c.batch, c.dim))
            y0s[:, 0] = np.abs(y0s[:, 0]) + 0.3
            y0_value = jax.vmap(lambda x: _structure(c, x))(jnp.asarray(y0s))
        else:
            y0_value = _structure(c, y0)

        # The vector field.
        if c.solver == "SemiImplicitEuler":
            k = c.dim // 2
            mlp = eqx.nn.MLP(k, k, 8, 1, activation=jnp.tanh, key=mlp_key)
        elif c.problem == "cde":
            self.channels = 2 if rng.random() < 0.5 else 3
            mlp = eqx.nn.MLP(
                c.dim,
                c.dim * self.channels,
                8,
                1,
                activation=jnp.tanh,
                final_activation=jnp.tanh,
                key=mlp_key,
            )
        else:
            mlp = eqx.nn.MLP(
                c.dim,
                c.dim,
                8,
                1,
                activation=jnp.tanh,
                final_activation=jnp.tanh,
                key=mlp_key,
            )
        mlp_arrays, self.mlp_static = eqx.partition(mlp, eqx.is_inexact_array)
        args = {
            # Mild: with a fixed coupling λ near 1, the scheme's parasitic mode grows
            # like λ e^{a h} a step on a decay rate a (and `Reversible` then raises).
            "damping": jnp.asarray(rng.uniform(0.1, 0.5)),
            "scale": jnp.asarray(rng.uniform(0.5, 1.0)),
            "sigma": jnp.asarray(rng.uniform(0.2, 0.6)),
        }

        # SDE: Brownian motion on exactly [min(t0, t1), max(t0, t1)].
        if c.problem == "sde":
            shape_of = lambda m: jax.ShapeDtypeStruct((m,), jnp.float64)
            single = _structure(c, y0)
            if c.noise == "diagonal":
                shape = shape_of(c.dim)
                self.diffusion = _DiagonalDiffusion()
            else:
                m = c.noise_channels
                shape = jtu.tree_map(lambda leaf: shape_of(m), single)
                c0 = jtu.tree_map(
                    lambda leaf: jnp.asarray(0.3 * rng.normal(size=(leaf.size, m))),
                    single,
                )
                c1 = jtu.tree_map(
                    lambda leaf: jnp.asarray(0.3 * rng.normal(size=(leaf.size, m))),
                    single,
                )
                self.diffusion = _Diffusion(c0, c1)
            self.brownian = diffrax.VirtualBrownianTree(
                min(self.t0, self.t1),
                max(self.t0, self.t1),
                tol=2**-10,
                shape=shape,
                key=brownian_key,
            )

        # CDE data: irregular times on [0, T], the first channel is time.
        data = None
        if c.problem == "cde":
            n = int(rng.integers(6, 13))
            ts = np.sort(rng.uniform(0.0, T, size=n))
            ts[0], ts[-1] = 0.0, T
            ts = np.unique(ts)
            signal = rng.normal(size=(len(ts), self.channels - 1))
            signal = 0.5 * np.cumsum(signal, axis=0) / np.sqrt(len(ts))
            data = jnp.asarray(np.concatenate([ts[:, None], signal], axis=1))
            self.data_ts = jnp.asarray(ts)

        # Times: SaveAt(ts), StepTo, dense evaluation, clip times.
        span = self.t1 - self.t0
        num_ts = int(rng.integers(2, 6))
        saveat_ts = self.t0 + span * np.sort(rng.uniform(0.05, 0.95, size=num_ts))
        n = c.num_steps
        if c.step_to_uniform:
            fractions = np.linspace(0.0, 1.0, n + 1)
        else:
            gaps = rng.uniform(0.5, 1.5, size=n)
            fractions = np.concatenate([[0.0], np.cumsum(gaps) / gaps.sum()])
            fractions[-1] = 1.0
        stepto_ts = self.t0 + span * fractions
        stepto_ts[0], stepto_ts[-1] = self.t0, self.t1
        self.dense_points = [self.t0 + span * f for f in (0.13, 0.5, 0.91)]
        self.step_ts = sorted([self.t0 + span * 0.3, self.t0 + span * 0.55])
        self.jump_ts = sorted([self.t0 + span * 0.4, self.t0 + span * 0.7])
        self.fn_weight = jnp.asarray(rng.normal(size=(c.dim, c.dim)))

        values = {
            "mlp": mlp_arrays,
            "y0": y0_value,
            "args": args,
            "t1": jnp.asarray(self.t1),
            "saveat_ts": jnp.asarray(saveat_ts),
            "stepto_ts": jnp.asarray(stepto_ts),
        }
        if data is not None:
            values["data"] = data
        # Adaptive SDEs: each solve also saves its accepted step times (not part of the
        # loss), for a `StepTo` reference on exactly those times; see `_run_case`.
        # Not with an event root finder, which `ReversibleAdjoint` rejects together
        # with `SaveAt(steps=...)`.
        self.record_steps = (
            c.problem == "sde"
            and c.controller in ("pid", "clip")
            and (c.event is None or c.root_finder is None)
        )
        self.diff = {k: v for k, v in values.items() if k in c.wrt}
        self.constants = {k: v for k, v in values.items() if k not in c.wrt}

    # Pieces -----------------------------------------------------------------------

    def solver(self):
        c = self.config
        if c.solver in NATIVE_SOLVERS:
            return getattr(diffrax, c.solver)()
        base = getattr(diffrax, c.solver)()
        return dr.Reversible(base, coupling_parameter=c.coupling)

    def terms(self, inputs):
        c = self.config
        mlp = eqx.combine(inputs["mlp"], self.mlp_static)

        def field(module):
            # A Module holds the model as leaves; a lambda closes over it (and Diffrax
            # closure-converts it).
            if c.closure:
                return lambda t, y, args: module(t, y, args)
            return module

        if c.solver == "SemiImplicitEuler":
            kick = field(_Kick(mlp))
            return (diffrax.ODETerm(_drift_of_momentum), diffrax.ODETerm(kick))
        if c.problem == "cde":
            xs = inputs["data"]
            if c.interpolation == "cubic":
                coeffs = diffrax.backward_hermite_coefficients(self.data_ts, xs)
                path = diffrax.CubicInterpolation(self.data_ts, coeffs)
            else:
                path = diffrax.LinearInterpolation(self.data_ts, xs)
            return diffrax.ControlTerm(field(_CDEField(mlp, self.channels)), path)
        drift = diffrax.ODETerm(field(_Field(mlp)))
        if c.problem == "sde":
            return diffrax.MultiTerm(
                drift, diffrax.ControlTerm(self.diffusion, self.brownian)
            )
        return drift

    def controller(self, inputs):
        c = self.config
        if c.controller == "constant":
            return diffrax.ConstantStepSize(), (self.t1 - self.t0) / c.num_steps
        if c.controller == "step_to":
            if c.step_to_from_t1:
                ts = jnp.linspace(self.t0, inputs["t1"], c.num_steps + 1)
            else:
                ts = inputs["stepto_ts"]
            return diffrax.StepTo(ts=ts), None
        if c.coupling == 0.5:
            # Round-off grows like 2^N: at most ~12 steps.
            pid = diffrax.PIDController(rtol=c.rtol, atol=c.rtol, dtmin=c.t_end / 12)
        elif c.pid_limits:
            pid = diffrax.PIDController(
                rtol=c.rtol,
                atol=c.rtol,
                dtmin=c.t_end / 200,
                dtmax=c.t_end / 4,
                factormax=3.0,
            )
        else:
            pid = diffrax.PIDController(rtol=c.rtol, atol=c.rtol)
        dt0 = (self.t1 - self.t0) / 20
        if c.controller == "pid":
            return pid, dt0
        return (
            diffrax.ClipStepSizeController(
                pid,
                step_ts=self.step_ts if c.clip_step_ts else None,
                jump_ts=self.jump_ts if c.clip_jump_ts else None,
            ),
            dt0,
        )

    def saveat(self, inputs, record_steps=False):
        saveat = self._saveat(inputs)
        if not record_steps:
            return saveat
        config = saveat.subs
        return diffrax.SaveAt(
            subs={"config": config, "steps": diffrax.SubSaveAt(steps=True)},
            dense=saveat.dense,
        )

    def _saveat(self, inputs):
        c = self.config
        kinds = c.saveat
        ts = inputs["saveat_ts"]
        steps = False
        for k in kinds:
            if k == "steps":
                steps = True
            elif k.startswith("steps="):
                steps = int(k.split("=")[1])
        weight = self.fn_weight
        fn = None
        if "fn" in kinds:
            fn = lambda t, y, args: jnp.tanh(weight @ _flatten(y)) * t * args["scale"]
        main = dict(
            t0="t0" in kinds,
            t1="t1" in kinds,
            ts=ts if "ts" in kinds else None,
            steps=steps,
        )
        dense = "dense" in kinds
        if "subs" not in kinds:
            if fn is not None:
                main["fn"] = fn
            return diffrax.SaveAt(dense=dense, **main)
        if not (main["t0"] or main["t1"] or main["ts"] is not None or main["steps"]):
            main["t1"] = True
        if fn is not None:
            main["fn"] = fn
        subs = {
            "main": diffrax.SubSaveAt(**main),
            "extra": [
                diffrax.SubSaveAt(ts=ts[:2]),
                diffrax.SubSaveAt(steps=2, fn=lambda t, y, args: _flatten(y)[0] * t),
                diffrax.SubSaveAt(t1=True, fn=lambda t, y, args: {"y": y, "t": t}),
            ],
        }
        return diffrax.SaveAt(subs=subs, dense=dense)

    def event(self):
        c = self.config
        if c.event is None:
            return None
        level = self.event_level
        if c.event == "real":
            cond = lambda t, y, args, **kwargs: _flatten(y)[0] - level
        elif c.event == "boolean":
            cond = lambda t, y, args, **kwargs: _flatten(y)[0] < level
        else:
            cond = [
                lambda t, y, args, **kwargs: _flatten(y)[-1] + 100.0,  # never fires
                lambda t, y, args, **kwargs: _flatten(y)[0] - level,
            ]
        root_finder = {
            None: None,
            "newton": optx.Newton(rtol=1e-10, atol=1e-10),
            "bisection": optx.Bisection(rtol=1e-10, atol=1e-10),
        }[c.root_finder]
        return diffrax.Event(cond, root_finder=root_finder)

    # Solves and losses ----------------------------------------------------------------

    def solve(self, inputs, y0, adjoint, *, controller=None, saveat=None, event=True):
        if controller is None:
            controller, dt0 = self.controller(inputs)
        else:
            dt0 = None
        return diffrax.diffeqsolve(
            self.terms(inputs),
            self.solver(),
            self.t0,
            inputs["t1"],
            dt0,
            y0,
            inputs["args"],
            saveat=self.saveat(inputs) if saveat is None else saveat,
            stepsize_controller=controller,
            event=self.event() if event else None,
            adjoint=adjoint,
            max_steps=MAX_STEPS,
        )

    def single_loss(self, inputs, y0, adjoint, controller=None):
        """The loss, and as auxiliary outputs the number of accepted steps and (if
        recorded) the accepted step ends."""
        record = self.record_steps and controller is None
        saveat = self.saveat(inputs, record_steps=record)
        sol = self.solve(inputs, y0, adjoint, controller=controller, saveat=saveat)
        ys, ts, step_ends = sol.ys, sol.ts, None
        if record:
            ys, ts, step_ends = ys["config"], ts["config"], ts["steps"]
        value = _finite_sum_of_squares(ys)
        for t in jtu.tree_leaves(ts):
            value = value + jnp.sum(jnp.sin(jnp.where(jnp.isfinite(t), t, 0.0)))
        if "dense" in self.config.saveat:
            for s in self.dense_points:
                value = value + _finite_sum_of_squares(sol.evaluate(s))
        return value, dict(steps=sol.stats["num_accepted_steps"], step_ends=step_ends)

    def loss(self, adjoint):
        """The loss as a function of the differentiated inputs and the others (dicts).

        The others are arguments too, not constants of the compiled program: XLA
        would fold constants with a different round-off, and the step times of an
        adaptive SDE solve (hence its Brownian increments, with their square-root
        modulus of continuity) are sensitive to it.
        """

        def loss(diff, constants):
            inputs = {**constants, **diff}
            y0 = inputs["y0"]
            if self.config.batch:
                single = lambda y0: self.single_loss(inputs, y0, adjoint)
                values, aux = jax.vmap(single)(y0)
                return jnp.sum(values), aux
            value, aux = self.single_loss(inputs, y0, adjoint)
            return value, jtu.tree_map(lambda x: x[None], aux)

        return loss


def _finite_sum_of_squares(tree):
    # Unfilled outputs (`SaveAt(steps=...)`, after an event) are `inf`.
    return sum(
        (
            jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) ** 2)
            for x in jtu.tree_leaves(tree)
        ),
        jnp.zeros(()),
    )


# --------------------------------------------------------------------------------------
# Running and classifying a case
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """`jax.value_and_grad` of a loss: the values, or where and how it failed."""

    name: str
    value: Any = None
    grad: Any = None
    steps: int = 0  # accepted steps (the most over a batch)
    step_ends: Any = None  # per batch element, if recorded
    phase: str | None = None  # "trace" or "run" if it failed
    error: BaseException | None = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def error_line(self) -> str:
        if self.error is None:
            return ""
        message = str(self.error)
        # Errors raised in callbacks (`eqx.error_if`) arrive wrapped in a
        # `JaxRuntimeError` whose first line says nothing: use the inner message.
        inner = re.search(r"(\w*RuntimeError): (.+)", message.split("Traceback", 1)[-1])
        if "CpuCallback error" in message and inner:
            return f"{type(self.error).__name__}({inner.group(1)}): {inner.group(2)}"
        lines = message.strip().splitlines() or [""]
        return f"{type(self.error).__name__}: {lines[0]}"


def _evaluate(name: str, loss, diff, constants) -> Run:
    """Value and gradient of `loss` at `diff`; trace errors are told apart from run
    errors (`lower` traces, including the custom VJP's forward and backward rules)."""
    return _evaluate_each([name], loss, diff, [constants])[0]


def _evaluate_each(names, loss, diff, constants_list) -> list[Run]:
    """`_evaluate` at each of `constants_list` (of one structure and shape), compiled
    once. Stops at the first failure, which is the last `Run`."""
    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    runs = []
    compiled = None
    for name, constants in zip(names, constants_list, strict=True):
        run = Run(name)
        runs.append(run)
        phase = "trace"
        try:
            if compiled is None:
                lowered = f.lower(diff, constants)
                phase = "run"
                compiled = lowered.compile(COMPILER_OPTIONS)
            phase = "run"
            (value, aux), grad = compiled(diff, constants)
            run.value, run.grad = jax.block_until_ready((value, grad))
            run.steps = int(np.max(aux["steps"]))
            if aux["step_ends"] is not None:
                run.step_ends = np.asarray(aux["step_ends"])
        except Exception as error:  # noqa: BLE001 (every failure is classified)
            run.phase, run.error = phase, error
            run.traceback = "".join(traceback.format_exception(error))
            break
    return runs


def _max_time_difference(a, b) -> float:
    if a.shape != b.shape:
        return np.inf
    finite = np.isfinite(a) & np.isfinite(b)
    if np.any(np.isfinite(a) != np.isfinite(b)):
        return np.inf
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))


def _step_to_reference(case: Case, step_ends: np.ndarray):
    """`RecursiveCheckpointAdjoint` on the same solve with `StepTo` on `[t0, *step
    ends]` (each batch element on its own: they take different steps). Returns the
    batched loss and gradient, or the failed `Run`."""
    config = case.config
    runs = []
    for i, row in enumerate(step_ends):
        ts = np.concatenate([[case.t0], row[np.isfinite(row)]])
        if ts[-1] != case.t1:  # stopped by an event: it fires in the same step
            ts = np.append(ts, case.t1)
        take = lambda tree, i=i: jtu.tree_map(lambda leaf: leaf[i], tree)
        if not config.batch:
            take = lambda tree: tree
        diff = {k: take(v) if k == "y0" else v for k, v in case.diff.items()}
        constants = {k: take(v) if k == "y0" else v for k, v in case.constants.items()}

        def loss(diff, constants, ts=ts):
            inputs = {**constants, **diff}
            value, aux = case.single_loss(
                inputs,
                inputs["y0"],
                diffrax.RecursiveCheckpointAdjoint(),
                controller=diffrax.StepTo(ts=jnp.asarray(ts)),
            )
            return value, jtu.tree_map(lambda x: x[None], aux)

        run = _evaluate(f"StepTo reference {i}", loss, diff, constants)
        if not run.ok:
            return run
        runs.append(run)
    return _combine_grads(runs, bool(config.batch))


def _unbatched_reference(case: Case):
    """`RecursiveCheckpointAdjoint` on each batch element without `vmap`, combined as
    the batched loss. Returns the loss and gradient, or the failed `Run`.

    Used where times are differentiated: Diffrax 0.7.2's `RecursiveCheckpointAdjoint`
    under `vmap` counts the `t` of `SaveAt(t1=True, fn=...)` twice in the `t1`
    gradient (`Heun`, `y' = -y`, `fn = y * t`: 0.5773 under `vmap`, 0.0180 without,
    and `DirectAdjoint` and finite differences give 0.0180 both ways).
    """

    def loss(diff, constants):
        inputs = {**constants, **diff}
        take = lambda leaf: leaf[constants["element"]]
        y0 = jtu.tree_map(take, inputs["y0"])
        value, aux = case.single_loss(inputs, y0, diffrax.RecursiveCheckpointAdjoint())
        return value, jtu.tree_map(lambda x: x[None], aux)

    elements = range(case.config.batch)
    runs = _evaluate_each(
        [f"unbatched reference {i}" for i in elements],
        loss,
        case.diff,
        [{**case.constants, "element": jnp.asarray(i)} for i in elements],
    )
    if not runs[-1].ok:
        return runs[-1]
    value = sum(r.value for r in runs)
    # Each element's `y0` gradient is in its own row; the other gradients are shared.
    grads = {
        name: jtu.tree_map(lambda *xs: sum(xs), *[r.grad[name] for r in runs])
        for name in runs[0].grad
    }
    return value, grads


def _combine_grads(runs: list[Run], batched_y0: bool) -> tuple[Any, Any]:
    """Per-batch-element runs as the batched loss: values and shared gradients summed,
    `y0` gradients stacked."""
    value = sum(r.value for r in runs)
    grads = {}
    for name in runs[0].grad:
        parts = [r.grad[name] for r in runs]
        if name == "y0" and batched_y0:
            grads[name] = jtu.tree_map(lambda *xs: jnp.stack(xs), *parts)
        else:
            grads[name] = jtu.tree_map(lambda *xs: sum(xs), *parts)
    return value, grads


def compare(value, grad, ref_value, ref_grad) -> tuple[bool, float, str]:
    """(agree, largest relative error, where it is): the loss, then leaf by leaf, each
    relative to its own size but not below `LEAF_FLOOR` of the largest gradient."""
    ref_value = float(ref_value)
    value_error = abs(float(value) - ref_value) / max(abs(ref_value), 1e-300)
    if not np.isfinite(value_error):
        value_error = 0.0 if np.isnan(float(value)) and np.isnan(ref_value) else np.inf
    worst, where = value_error, "loss"
    paths = jtu.tree_leaves_with_path(ref_grad)
    leaves = jtu.tree_leaves(grad)
    if len(leaves) != len(paths):
        return False, np.inf, "gradient structure"
    size = lambda x: float(np.max(np.abs(np.nan_to_num(x)), initial=0.0))
    scale = max((size(b) for _, b in paths), default=0.0)
    for (path, b), a in zip(paths, leaves):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False, np.inf, f"shape of {jtu.keystr(path)}"
        same_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(same_nan, 0.0, np.abs(a - b))
        if np.any(np.isnan(diff)):
            error = np.inf
        else:
            denom = max(size(b), LEAF_FLOOR * scale, 1e-300)
            error = float(np.max(diff, initial=0.0)) / denom
        if error > worst:
            worst, where = error, f"grad{jtu.keystr(path)}"
    return bool(worst <= TOL), worst, where


_NAMES_US = re.compile(r"\bReversible(Adjoint)?\b")
_PACKAGE_FRAME = r'File "[^"]*diffrax_reversible/(\w+\.py)", line (\d+), in (\w+)'


@dataclasses.dataclass
class Result:
    config: Config
    outcome: str
    detail: str
    signature: str = ""  # defects only: what tells one defect from another
    comparisons: dict = dataclasses.field(default_factory=dict)
    traceback: str = ""
    seconds: float = 0.0

    def report(self) -> str:
        c = self.config
        lines = [
            f"case {c.index} of seed {c.seed}: {self.outcome}: {self.detail}",
            f"  config: {c.describe()}",
            f"  replay: {c.replay_command()}",
            "  replay (exact config): python -m tests.random_configs --config "
            f"'{c.to_json()}'",
        ]
        for name, (agree, error, where) in self.comparisons.items():
            lines.append(
                f"  {name}: {'agree' if agree else 'DIFFER'} "
                f"(max rel. error {error:.3g} at {where})"
            )
        rejection = documented_rejection(c)
        if rejection is not None:
            lines.append(f"  support table: rejected ({rejection})")
        if self.traceback:
            frames = re.findall(_PACKAGE_FRAME, self.traceback)
            if frames:
                where = ", ".join(f"{f}:{n} ({fn})" for f, n, fn in frames[-3:])
                lines.append(f"  innermost diffrax_reversible frames: {where}")
            tail = self.traceback.strip().splitlines()[-8:]
            lines.append("  traceback (last lines):")
            lines.extend("    " + line for line in tail)
        return "\n".join(lines)


def _signature(run: Run) -> str:
    line = run.error_line()
    line = re.sub(r"0x[0-9a-f]+", "#", line)
    line = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", line)
    return f"{run.phase}: {line[:160]}"


def _is_refusal(run: Run) -> bool:
    return (
        run.phase == "trace"
        and isinstance(run.error, ValueError)
        and bool(_NAMES_US.search(str(run.error)))
    )


def _reference_failed(config: Config, what: str, run: Run) -> Result:
    detail = f"{what}: {run.error_line()}"
    return Result(config, "reference_failed", detail, traceback=run.traceback)


def run_case(config: Config) -> Result:
    assert jax.config.jax_enable_x64, "the randomized test runs in float64"
    start = time.perf_counter()
    try:
        result = _run_case(config)
    finally:
        jax.clear_caches()
    result.seconds = time.perf_counter() - start
    return result


def _run_case(config: Config) -> Result:
    try:
        case = Case(config)
    except Exception as error:  # noqa: BLE001
        run = Run("setup", phase="setup", error=error)
        run.traceback = "".join(traceback.format_exception(error))
        return Result(
            config,
            "defect",
            "building the problem failed: " + run.error_line(),
            _signature(run),
            traceback=run.traceback,
        )
    ours = _evaluate(
        "ReversibleAdjoint",
        case.loss(dr.ReversibleAdjoint()),
        case.diff,
        case.constants,
    )
    if not ours.ok and _is_refusal(ours):
        return Result(config, "refused", ours.error_line())
    rca = _evaluate(
        "RecursiveCheckpointAdjoint",
        case.loss(diffrax.RecursiveCheckpointAdjoint()),
        case.diff,
        case.constants,
    )
    if not rca.ok:
        detail = f"reference: {rca.error_line()}"
        if not ours.ok:
            detail += f"; ours ({ours.phase}): {ours.error_line()}"
        return Result(config, "reference_failed", detail, traceback=rca.traceback)
    if not ours.ok:
        if isinstance(ours.error, ValueError) and ours.phase == "trace":
            detail = "ValueError not naming Reversible(Adjoint): "
        else:
            detail = f"{ours.phase}-time exception: "
        return Result(
            config,
            "defect",
            detail + ours.error_line(),
            _signature(ours),
            traceback=ours.traceback,
        )

    comparisons = {
        "ReversibleAdjoint vs RecursiveCheckpointAdjoint": compare(
            ours.value, ours.grad, rca.value, rca.grad
        )
    }
    notes = []
    if case.record_steps:
        # Adaptive SDE: compare each adjoint with RecursiveCheckpointAdjoint stepping
        # (`StepTo`) to the accepted step times of its own solve. Not with each other:
        # an adaptive SDE solve's step times amplify round-off (~10x a step here,
        # through the Brownian increments in the error estimate), so two compiled
        # programs may step differently (measured: 1e-17 growing to 5e-7 in 18 steps).
        primary = [
            "ReversibleAdjoint vs StepTo(its accepted times) reference",
            "RecursiveCheckpointAdjoint vs StepTo(its accepted times) reference",
        ]
        same_times = np.array_equal(ours.step_ends, rca.step_ends)
        notes.append(
            "both adjoints took the same step times"
            if same_times
            else "the adjoints took different step times (max difference "
            f"{_max_time_difference(ours.step_ends, rca.step_ends):.2g})"
        )
        references = {}
        for name, run in zip(primary, (ours, rca)):
            key = (run.step_ends.shape, run.step_ends.tobytes())
            if key not in references:
                reference = _step_to_reference(case, run.step_ends)
                if isinstance(reference, Run):
                    return _reference_failed(config, "StepTo reference", reference)
                references[key] = reference
            ref_value, ref_grad = references[key]
            comparisons[name] = compare(run.value, run.grad, ref_value, ref_grad)
    elif config.batch and set(config.wrt) & TIME_INPUTS:
        reference = _unbatched_reference(case)
        if isinstance(reference, Run):
            return _reference_failed(config, "unbatched reference", reference)
        name = "ReversibleAdjoint vs RecursiveCheckpointAdjoint without vmap"
        comparisons[name] = compare(ours.value, ours.grad, *reference)
        primary = [name]
        batched = compare(rca.value, rca.grad, *reference)
        if not batched[0]:
            notes.append(
                "RecursiveCheckpointAdjoint under vmap differs from itself without "
                f"(rel. error {batched[1]:.2g} at {batched[2]}; a Diffrax defect)"
            )
    else:
        primary = ["ReversibleAdjoint vs RecursiveCheckpointAdjoint"]
        if config.problem == "sde" and config.controller in ("pid", "clip"):
            notes.append("no StepTo reference (event root finder)")
    differing = [name for name in primary if not comparisons[name][0]]
    if not differing:
        worst = max(comparisons[name][1] for name in primary)
        detail = "; ".join([f"max rel. error {worst:.2g}, {ours.steps} steps", *notes])
        return Result(config, "agree", detail, comparisons=comparisons)
    name = differing[0]
    _, error, where = comparisons[name]
    kind = "loss" if where == "loss" else "gradient"
    detail = f"{name}: {kind} differs (rel. error {error:.3g} at {where}); "
    detail += "; ".join([f"{ours.steps} steps", *notes])
    signature = f"mismatch: {' & '.join(differing)} ({kind})"
    if differing[0].startswith("ReversibleAdjoint"):
        # Was it the reconstruction (round-off amplified by ~λ^{-N})? Measured on a
        # second run, so that the first one tests the adjoint without the callback.
        errors = []
        record = lambda e: errors.append(float(np.nanmax(np.asarray(e))))
        adjoint = dr.ReversibleAdjoint(reconstruction_callback=record)
        rerun = _evaluate(
            "ReversibleAdjoint (diagnosis)",
            case.loss(adjoint),
            case.diff,
            case.constants,
        )
        if rerun.ok and errors:
            reconstruction = max(errors)
            detail += f", reconstruction error {reconstruction:.2g}"
            if not reconstruction < 1e-10:
                signature += " with reconstruction error >= 1e-10"
            if name == "ReversibleAdjoint vs RecursiveCheckpointAdjoint" and (
                kind == "gradient"
            ):
                verdict = _round_off_verdict(case, ours, rca, reconstruction)
                if verdict is not None:
                    return Result(config, "agree", verdict, comparisons=comparisons)
    return Result(config, "defect", detail, signature, comparisons=comparisons)


ROUND_OFF_FACTOR = 10.0


def _round_off_verdict(case: Case, ours: Run, rca: Run, reconstruction: float):
    """Whether a gradient mismatch is round-off in a gradient that cancels (a sum of
    terms far larger than itself): then Diffrax's two exact adjoints of the same
    discrete solve, `RecursiveCheckpointAdjoint` and `DirectAdjoint`, disagree by a
    comparable amount. Ours may differ from RCA by `ROUND_OFF_FACTOR` times their
    disagreement, scaled by our reconstruction error in units of `eps` (the round-off
    it adds to every state). Returns the detail of an agreement, or `None`."""
    direct = _evaluate(
        "DirectAdjoint (referee)",
        case.loss(diffrax.DirectAdjoint()),
        case.diff,
        case.constants,
    )
    if not direct.ok:
        return None
    eps = float(np.finfo(np.float64).eps)
    factor = ROUND_OFF_FACTOR * (1.0 + reconstruction / eps)
    paths = jtu.tree_leaves_with_path(rca.grad)
    worst = None
    for (path, b), a, c in zip(
        paths, jtu.tree_leaves(ours.grad), jtu.tree_leaves(direct.grad)
    ):
        a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return None
        ours_off = float(np.max(np.abs(a - b), initial=0.0))
        noise = float(np.max(np.abs(c - b), initial=0.0))
        size = float(np.max(np.abs(b), initial=0.0))
        if ours_off > factor * noise + TOL * size:
            return None
        if worst is None or ours_off / max(size, 1e-300) > worst[0]:
            worst = (ours_off / max(size, 1e-300), jtu.keystr(path), size, noise)
    if worst is None:
        return None
    error, where, size, noise = worst
    return (
        f"round-off: grad{where} cancels to {size:.2g}; ours is {error:.2g} off "
        f"RecursiveCheckpointAdjoint, which is {noise:.2g} off DirectAdjoint "
        f"(allowed: {factor:.3g}x that); reconstruction error {reconstruction:.2g}"
    )


# --------------------------------------------------------------------------------------
# Many cases: summary tables
# --------------------------------------------------------------------------------------


def features(config: Config) -> dict[str, list[str]]:
    """The values of each summarised feature for `config` (a case counts once under each
    `SaveAt` kind and differentiated quantity it has)."""
    event = "none" if config.event is None else f"{config.event}/{config.root_finder}"
    return {
        "solver": [config.solver_name()],
        "coupling": [str(config.coupling)],
        "problem": [config.problem_name()],
        "controller": [config.controller_name()],
        "saveat kind": list(config.saveat),
        "event": [event],
        "vmap": ["vmap" if config.batch else "no vmap"],
        "pytree": [config.state],
        "vector field": ["closure" if config.closure else "module"],
        "time direction": ["t1<t0" if config.reverse_time else "t0<t1"],
        "differentiated": list(config.wrt),
    }


def summary(results: list[Result]) -> str:
    lines = []
    totals = collections.Counter(r.outcome for r in results)
    seconds = [r.seconds for r in results]
    lines.append(
        f"{len(results)} cases: "
        + ", ".join(f"{o} {totals[o]}" for o in OUTCOMES)
        + (
            f"; {np.mean(seconds):.1f} s per case (median {np.median(seconds):.1f}, "
            f"max {np.max(seconds):.1f})"
            if results
            else ""
        )
    )
    table = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter)
    )
    for r in results:
        for feature, values in features(r.config).items():
            for value in values:
                table[feature][value][r.outcome] += 1
    for feature, rows in table.items():
        lines.append("")
        lines.append(f"| {feature} | " + " | ".join(OUTCOMES) + " |")
        lines.append("|---" * (len(OUTCOMES) + 1) + "|")
        for value in sorted(rows, key=lambda v: -sum(rows[v].values())):
            counts = rows[value]
            cells = " | ".join(str(counts[o]) for o in OUTCOMES)
            lines.append(f"| {value} | {cells} |")

    defects = collections.defaultdict(list)
    for r in results:
        if r.outcome == "defect":
            defects[r.signature].append(r)
    lines.append("")
    lines.append(f"{len(defects)} distinct defect signatures:")
    for signature, group in sorted(defects.items(), key=lambda kv: -len(kv[1])):
        simplest = min(group, key=lambda r: r.config.complexity())
        solvers = collections.Counter(r.config.solver_name() for r in group)
        lines.append("")
        lines.append(f"## {signature}  ({len(group)} cases)")
        lines.append(f"  cases: {', '.join(str(r.config.index) for r in group)}")
        lines.append(f"  solvers: {dict(solvers)}")
        lines.extend("  " + line for line in simplest.report().splitlines())

    unexpected = [
        r
        for r in results
        if r.outcome == "refused" and documented_rejection(r.config) is None
    ]
    if unexpected:
        lines.append("")
        lines.append(
            f"{len(unexpected)} refusals of configurations the support table supports:"
        )
        for r in unexpected:
            lines.append(
                f"  case {r.config.index}: {r.detail}  [{r.config.describe()}]"
            )
    not_rejected = [
        r
        for r in results
        if r.outcome == "agree" and documented_rejection(r.config) is not None
    ]
    if not_rejected:
        lines.append("")
        lines.append(
            f"{len(not_rejected)} cases the support table rejects, that agree:"
        )
        for r in not_rejected:
            lines.append(
                f"  case {r.config.index}: {documented_rejection(r.config)}  "
                f"[{r.config.describe()}]"
            )
    return "\n".join(lines)


def _configure_jax():
    # Errors raised in callbacks are also logged by JAX, as noise beside our report.
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
    # As tests/conftest.py.
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.random_configs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=None, help="default: from the time")
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--case", type=int, default=None, help="replay one case")
    parser.add_argument("--config", default=None, help="replay a configuration (JSON)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quiet", action="store_true", help="no line per case")
    parser.add_argument(
        "--summarize",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only print the summary of results written by --json (several: merged)",
    )
    options = parser.parse_args(argv)
    if options.summarize is not None:
        results = [r for path in options.summarize for r in _read_json(path)]
        print(summary(results))
        return int(any(r.outcome == "defect" for r in results))
    _configure_jax()

    if options.config is not None:
        configs = [Config.from_json(options.config)]
    else:
        seed = options.seed
        if seed is None:
            seed = time.time_ns() % 2**31
        print(f"seed {seed}", flush=True)
        if options.case is not None:
            configs = [draw_config(seed, options.case)]
        else:
            configs = (
                draw_config(seed, i)
                for i in range(options.start, options.start + options.cases)
            )
    single = options.config is not None or options.case is not None
    results = []
    started = time.perf_counter()
    for config in configs:
        if (
            options.max_minutes is not None
            and time.perf_counter() - started > 60 * options.max_minutes
        ):
            print(f"stopping: --max-minutes {options.max_minutes} reached", flush=True)
            break
        result = run_case(config)
        results.append(result)
        if single:
            print(result.report())
            if result.traceback and result.outcome != "agree":
                print("full traceback:")
                print(result.traceback)
        elif not options.quiet:
            print(
                f"[{config.index:4d}] {result.outcome:16s} {result.seconds:5.1f}s "
                f"{config.describe()} :: {result.detail}",
                flush=True,
            )
        if options.json is not None:
            _write_json(options.json, results)
    if not single:
        print()
        print(summary(results))
    return int(any(r.outcome == "defect" for r in results))


def _read_json(path) -> list[Result]:
    with open(path) as f:
        rows = json.load(f)
    results = []
    for row in rows:
        config = row["config"]
        for name in ("saveat", "wrt"):
            config[name] = tuple(config[name])
        results.append(
            Result(
                Config(**config),
                row["outcome"],
                row["detail"],
                row["signature"],
                {k: tuple(v) for k, v in row["comparisons"].items()},
                row["traceback"],
                row["seconds"],
            )
        )
    return results


def _write_json(path, results):
    rows = [
        dict(
            config=dataclasses.asdict(r.config),
            outcome=r.outcome,
            detail=r.detail,
            signature=r.signature,
            comparisons={
                k: [bool(a), float(e), w] for k, (a, e, w) in r.comparisons.items()
            },
            traceback=r.traceback,
            seconds=r.seconds,
        )
        for r in results
    ]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
