"""Runs the five experiments of the paper one after the other, in `--quick` (the
default) or `--full` mode; each prints its tables and writes its JSON to `results/`.

    python benchmarks/paper/run_all.py            # all five, --quick
    python benchmarks/paper/run_all.py --full     # the paper's lengths (days)
"""

import subprocess
import sys
import time
from pathlib import Path


EXPERIMENTS = (
    "runtime_complexity.py",
    "white_dwarf.py",
    "coupled_oscillators.py",
    "double_pendulum.py",
    "convergence.py",
)


def main():
    mode = "--full" if "--full" in sys.argv[1:] else "--quick"
    here = Path(__file__).parent
    total = time.perf_counter()
    for script in EXPERIMENTS:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(here / script), mode], check=True)
        print(f"\n[{script} {mode}: {time.perf_counter() - start:.0f} s]\n", flush=True)
    print(f"[all five {mode}: {time.perf_counter() - total:.0f} s]")


if __name__ == "__main__":
    main()
