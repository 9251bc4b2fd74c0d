"""One process of the data-parallel training test in `test_multiprocess.py`.

Run as a script, never imported for its side effects (pytest collects `tests/`):

    python tests/multiprocess_worker.py worker PROCESS_ID NUM_PROCESSES PORT OUT.npz
    python tests/multiprocess_worker.py reference OUT.npz

`worker` joins a JAX multi-controller runtime (one CPU device per process), takes one
training step on its share of the batch and saves the (replicated) gradient, the
updated parameters and the compiled HLO of the step. `reference` computes the same
step on the whole batch in one single-device process, with both adjoints."""

import sys

import numpy as np


GLOBAL_BATCH = 12  # A size no other array has, so it is recognisable in the HLO.
STATE_SIZE = 4
NUM_SAVES = 5
LEARNING_RATE = 0.1


def make_problem():
    """The model and the whole batch; every process builds the same ones."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    model_key, y0_key, target_key = jax.random.split(jax.random.PRNGKey(0), 3)
    model = eqx.nn.MLP(
        STATE_SIZE, STATE_SIZE, 16, 2, activation=jnp.tanh, key=model_key
    )
    y0s = jax.random.normal(y0_key, (GLOBAL_BATCH, STATE_SIZE), jnp.float32)
    targets = jax.random.normal(
        target_key, (GLOBAL_BATCH, NUM_SAVES, STATE_SIZE), jnp.float32
    )
    params, static = eqx.partition(model, eqx.is_array)
    return params, static, np.asarray(y0s), np.asarray(targets)


def make_train_step(static, adjoint):
    """`(params, y0s, targets) -> (loss, grads, new_params)`: one plain SGD step."""
    import diffrax
    import diffrax_reversible as dr
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def loss(params, y0s, targets):
        model = eqx.combine(params, static)

        def solve(y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, model: model(y)),
                dr.Reversible(diffrax.Tsit5()),
                0.0,
                1.0,
                1 / 50,
                y0,
                model,
                saveat=diffrax.SaveAt(ts=jnp.linspace(0.2, 1.0, NUM_SAVES)),
                adjoint=adjoint,
            ).ys

        return jnp.mean((jax.vmap(solve)(y0s) - targets) ** 2)

    def train_step(params, y0s, targets):
        value, grads = eqx.filter_value_and_grad(loss)(params, y0s, targets)
        new_params = jax.tree_util.tree_map(
            lambda p, g: p - LEARNING_RATE * g, params, grads
        )
        return value, grads, new_params

    return train_step


def flatten(tree):
    import jax

    # `device_get` of a fully replicated array reads the local copy; it would refuse
    # an array with shards only other processes hold.
    leaves = jax.tree_util.tree_leaves(jax.device_get(tree))
    return np.concatenate([np.ravel(leaf) for leaf in leaves])


def run_worker(process_id, num_processes, port, out):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=300,
    )
    import diffrax_reversible as dr
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.device_count() == num_processes, jax.devices()
    mesh = Mesh(jax.devices(), ("batch",))
    params, static, y0s, targets = make_problem()

    # Each process supplies only its own rows of the data; the parameters are
    # replicated (every process passes the same values).
    rows = GLOBAL_BATCH // num_processes
    mine = slice(process_id * rows, (process_id + 1) * rows)
    batch_sharding = NamedSharding(mesh, P("batch"))
    y0s = jax.make_array_from_process_local_data(batch_sharding, y0s[mine])
    targets = jax.make_array_from_process_local_data(batch_sharding, targets[mine])
    params = jax.device_put(params, NamedSharding(mesh, P()))
    assert y0s.shape == (GLOBAL_BATCH, STATE_SIZE)
    assert [s.data.shape for s in y0s.addressable_shards] == [(rows, STATE_SIZE)]

    step = jax.jit(make_train_step(static, dr.ReversibleAdjoint()))
    hlo = step.lower(params, y0s, targets).compile().as_text()
    value, grads, new_params = step(params, y0s, targets)
    for leaf in jax.tree_util.tree_leaves((value, grads, new_params)):
        assert leaf.sharding.is_fully_replicated, leaf.sharding
    np.savez(
        out,
        loss=np.asarray(jax.device_get(value)),
        grads=flatten(grads),
        new_params=flatten(new_params),
        hlo=np.array(hlo),
    )
    jax.distributed.shutdown()


def run_reference(out):
    import diffrax
    import diffrax_reversible as dr
    import jax

    params, static, y0s, targets = make_problem()
    results = {}
    for name, adjoint in [
        ("checkpoint", diffrax.RecursiveCheckpointAdjoint()),
        ("reversible", dr.ReversibleAdjoint()),
    ]:
        step = jax.jit(make_train_step(static, adjoint))
        value, grads, new_params = step(params, y0s, targets)
        results[f"{name}_loss"] = np.asarray(value)
        results[f"{name}_grads"] = flatten(grads)
        results[f"{name}_new_params"] = flatten(new_params)
    np.savez(out, **results)


def main(argv):
    if argv[0] == "worker":
        process_id, num_processes, port = map(int, argv[1:4])
        run_worker(process_id, num_processes, port, argv[4])
    elif argv[0] == "reference":
        run_reference(argv[1])
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
