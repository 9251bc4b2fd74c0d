"""Data-parallel training across two processes of JAX's multi-controller runtime.

Two workers (`multiprocess_worker.py`, one CPU device each, gloo collectives) each hold
half the batch and take one jitted SGD step with `ReversibleAdjoint`; a third,
single-device process takes the same step on the whole batch with both adjoints."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from . import multiprocess_worker as worker


WORKER = Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
# Seconds, for all three processes together: ~1 min alone, 3 min on 2 busy cores.
TIMEOUT = 600
# float32 round-off: the sharded sum over the batch is ordered differently, and the
# reversible backward pass reconstructs the states. Measured ~1e-7.
RTOL = 1e-5
COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
    r"collective-broadcast|send|recv)(?:-start)?\("
)


def free_port():
    # Port 0: the OS picks one no other test (pytest-xdist) is using right now.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One CPU device per process, float32: flags meant for the caller do not apply.
    for name in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_ENABLE_X64"):
        env.pop(name, None)
    return env


def launch(name, args, directory):
    with open(directory / f"{name}.out", "w") as out:
        with open(directory / f"{name}.err", "w") as err:
            return subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                env=worker_env(),
                stdout=out,
                stderr=err,
                cwd=directory,
            )


def logs(processes, directory):
    return "\n".join(
        f"--- {name} (exit code {process.returncode}) stderr:\n"
        + (directory / f"{name}.err").read_text()[-5000:]
        for name, process in processes.items()
    )


def wait_for_all(processes, directory, timeout):
    """Waits for every process; if one fails, or time runs out, ends the others (a
    worker whose peer died would otherwise wait in a collective until its own
    timeout) and fails with everyone's stderr."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in processes.values()]
            if any(code not in (None, 0) for code in codes):
                problem = "a process failed"
                break
            if all(code == 0 for code in codes):
                return
            if time.monotonic() > deadline:
                problem = f"timed out after {timeout} s"
                break
            time.sleep(0.5)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    pytest.fail(f"{problem} (exit code -9: killed here)\n" + logs(processes, directory))


def relative_error(x, reference):
    # As `diffrax_reversible._misc.relative_error`: max difference / max magnitude.
    return float(np.max(np.abs(x - reference)) / np.max(np.abs(reference)))


def collectives(hlo):
    return {match.group(1) for match in COLLECTIVE.finditer(hlo)}


def shapes_with_leading_dim(hlo, size):
    return re.findall(rf"\b[a-z]+\d*\[{size}[,\]][\d,]*\]", hlo)


@pytest.mark.slow
def test_two_process_data_parallel_training(tmp_path):
    port = free_port()
    processes = {
        f"worker{i}": launch(
            f"worker{i}",
            ["worker", str(i), str(NUM_PROCESSES), str(port), f"worker{i}.npz"],
            tmp_path,
        )
        for i in range(NUM_PROCESSES)
    }
    processes["reference"] = launch("reference", ["reference", "ref.npz"], tmp_path)
    wait_for_all(processes, tmp_path, TIMEOUT)

    workers = [np.load(tmp_path / f"worker{i}.npz") for i in range(NUM_PROCESSES)]
    reference = np.load(tmp_path / "ref.npz")
    # The gradient is replicated: both processes hold the all-reduced one.
    assert relative_error(workers[1]["grads"], workers[0]["grads"]) <= RTOL
    for adjoint in ("checkpoint", "reversible"):
        for name in ("loss", "grads", "new_params"):
            error = relative_error(workers[0][name], reference[f"{adjoint}_{name}"])
            assert error <= RTOL, (adjoint, name, error)

    # The backward pass stays sharded: the per-device program holds only its half of
    # the batch, and the only collectives are all-reduces (of the parameter
    # gradients and the loss, and of scalar loop/error predicates), none of which
    # moves a batch of states.
    hlo = str(workers[0]["hlo"])
    rows = worker.GLOBAL_BATCH // NUM_PROCESSES
    assert shapes_with_leading_dim(hlo, rows), "per-device batch not found in HLO"
    assert not shapes_with_leading_dim(hlo, worker.GLOBAL_BATCH)
    assert collectives(hlo) == {"all-reduce"}, collectives(hlo)
    for line in hlo.splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            result_type = line.split(" = ", 1)[1].split(" all-reduce", 1)[0]
            assert not shapes_with_leading_dim(result_type, rows), line
