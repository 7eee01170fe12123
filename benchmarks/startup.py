"""Start-up time of the commands that need no model: ``denseclip --help``, ``CMD --help``,
``presets`` and ``download --list``, each in a fresh interpreter, wall clock, median of a
few runs; ``flops`` of a tiny preset (which imports torch) for comparison.

    python benchmarks/startup.py [--repeats 5]

Prints one line per command and the CPU it ran on. Nothing here is asserted: the tests
check that these commands import no torch (tests/cli/test_startup.py), not how fast they
are.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
COMMANDS = [["--help"], ["train", "--help"], ["predict", "--help"], ["presets"],
            ["presets", "--json"], ["download", "--list"], ["plot", "--help"],
            ["flops", "tiny_denseclip_res"]]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and the cores usable."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} core(s)"


def time_command(argv: list[str], repeats: int, env: dict[str, str]) -> list[float]:
    """Wall-clock seconds of ``python -m denseclip ARGV``, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "denseclip", *argv], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "DENSECLIP_CACHE": cache, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        print(f"CPU: {cpu_name()}; Python {platform.python_version()}; median of "
              f"{args.repeats} runs, wall clock, each in a fresh interpreter")
        for argv in COMMANDS:
            times = time_command(argv, args.repeats, env)
            print(f"  denseclip {' '.join(argv):<28} {statistics.median(times):6.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
