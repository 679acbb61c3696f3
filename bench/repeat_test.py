"""Run one test many times in fresh pytest processes and count its failures (a flake meter).

A rare race shows up as one failure in tens of runs; a fix is believable when the count stays
at zero over many. Each run is its own ``pytest`` process (a fresh mount, fresh imports), one
after another so runs do not load each other. The first lines of each failure are kept.

    PYTHONPATH=$PWD .venv/bin/python bench/repeat_test.py -n 20
    PYTHONPATH=$PWD .venv/bin/python bench/repeat_test.py -n 5 \\
        tests/test_writeback_stress.py::test_close_rename_open_read_never_sees_a_partial_file
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TEST = "tests/test_write_front.py::test_sequential_write_keeps_staging_small"
ROOT = Path(__file__).resolve().parent.parent


def run_once(test: str, timeout_s: float, extra: list[str]) -> tuple[str, float, str]:
    """(outcome, seconds, the failure's summary line or what went wrong)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               test, *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, f"did not finish in {timeout_s:.0f} s"
    seconds = time.perf_counter() - start
    out = done.stdout + done.stderr
    if done.returncode == 0:
        return "pass", seconds, ""
    lines = [line for line in out.splitlines() if re.match(r"^(E |FAILED|ERROR)", line)]
    return "fail", seconds, " | ".join(lines[:4])[:600]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test", nargs="?", default=DEFAULT_TEST, help="a pytest node id")
    parser.add_argument("-n", "--runs", type=int, default=20)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    outcomes: dict[str, int] = {}
    for run in range(1, args.runs + 1):
        outcome, seconds, detail = run_once(args.test, args.timeout_s, args.pytest_args)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        print(f"run {run:3d}/{args.runs}: {outcome:7s} {seconds:6.1f} s"
              + (f"  {detail}" if detail else ""), flush=True)
        if outcome != "pass" and args.stop_on_failure:
            break
    runs = sum(outcomes.values())
    failed = runs - outcomes.get("pass", 0)
    print(f"{args.test}: {failed} of {runs} runs failed "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
