"""xfstests' fsstress and fsx through a hubfs mount, next to the same runs on the native disk.

* ``fsstress -p P -n N -s SEED -d DIR``: P processes each making N random operations (creates,
  writes, renames, links, truncates, xattrs, splice, copy_file_range...) with the same seed on
  native and on the mount, so both make the same work; times and the ratio hubfs/native.
  A run still going after ``--timeout-s`` is killed and reported as "did not finish in X s".
* ``fsx -N OPS`` (mmap reads and writes included, fsx's default): one file hammered with
  random writes, truncates and reads, each read checked against fsx's own copy; pass/fail and
  time, on the mount and on native.
* then ``hubfs umount`` and ``hubfs verify``.

No registry ships fsstress or fsx, and CI cannot fetch them: build them by hand (see
``BUILD_HELP``) and point ``HUBFS_XFSTESTS_BIN`` at them (default ``/opt/xfstests/bin``).

    PYTHONPATH=$PWD .venv/bin/python bench/fsstress.py -n 500
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import HubfsMount, Measurement, filesystem_of, machine_facts, write_result

log = logging.getLogger("bench.fsstress")

BIN_ENV = "HUBFS_XFSTESTS_BIN"
DEFAULT_BIN = Path("/opt/xfstests/bin")
BUILD_HELP = f"""\
fsstress and fsx come from xfstests, which no package registry ships. Build them by hand:
  apt-get install -y autoconf automake libtool libaio-dev xfslibs-dev uuid-dev liburcu-dev \\
      libattr1-dev libacl1-dev libgdbm-dev
  git clone https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git /opt/xfstests-src
      (or a copy of github.com/kdave/xfstests)
  cd /opt/xfstests-src && make configure && ./configure && make -C lib && make -C ltp fsx fsstress
  mkdir -p {DEFAULT_BIN} && cp ltp/fsx ltp/fsstress {DEFAULT_BIN}/
then run this again (or set {BIN_ENV} to the directory holding the two binaries)."""
TARGET_FSSTRESS_RATIO = 10.0  # issue 9


def find_tools() -> dict[str, Path] | None:
    where = Path(os.environ.get(BIN_ENV, DEFAULT_BIN))
    tools = {name: where / name for name in ("fsstress", "fsx")}
    if all(os.access(path, os.X_OK) for path in tools.values()):
        return tools
    return None


def run_bounded(cmd: list[str], timeout_s: float, cwd: Path | None = None
                ) -> tuple[float | None, int | None, str]:
    """(seconds or None when killed at ``timeout_s``, exit code, the output's last lines).
    The command runs in its own process group so that every child fsstress forks dies too."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        seconds: float | None = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        seconds = None
    tail = "\n".join(out.strip().splitlines()[-6:])
    return seconds, proc.returncode, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--ops", type=int, default=500,
                        help="fsstress operations per process (the issue's target is 5000)")
    parser.add_argument("-p", "--procs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fsx-ops", type=int, default=100_000, help="0 skips fsx")
    parser.add_argument("--fsx-args", default="", help="extra fsx arguments")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hubfs-bench-fsstress"))
    parser.add_argument("--mount-args", default="", help="extra `hubfs mount` arguments")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tools = find_tools()
    if tools is None:
        print(f"fsstress/fsx not found in {os.environ.get(BIN_ENV, DEFAULT_BIN)}.\n{BUILD_HELP}",
              file=sys.stderr)
        return 2

    work: Path = args.workdir
    native = work / "native"
    shutil.rmtree(native, ignore_errors=True)
    native.mkdir(parents=True)
    runs: dict[str, dict[str, Any]] = {}
    plan: list[tuple[str, list[str], str]] = [
        (f"fsstress -p {args.procs} -n {args.ops}",
         [str(tools["fsstress"]), "-p", str(args.procs), "-n", str(args.ops), "-s",
          str(args.seed), "-d", "{dir}/fsstress"], "ops"),
    ]
    if args.fsx_ops:
        plan.append((f"fsx -N {args.fsx_ops}",
                     [str(tools["fsx"]), "-q", "-N", str(args.fsx_ops), "-S", str(args.seed),
                      "-P", "{dir}", *args.fsx_args.split(), "{dir}/fsx.file"], "ops"))
    mount = HubfsMount(work / "store", work / "mnt", *args.mount_args.split())
    with mount:
        for name, template, _ in plan:
            for side, root in (("native", native), ("hubfs", mount.path)):
                cmd = [part.replace("{dir}", str(root)) for part in template]
                log.info("%s on %s: %s", name, side, " ".join(cmd))
                seconds, code, tail = run_bounded(cmd, args.timeout_s, cwd=work)
                passed = seconds is not None and code == 0
                runs[f"{name} {side}"] = {"seconds": seconds, "exit_code": code,
                                         "passed": passed, "output_tail": tail,
                                         "timeout_s": args.timeout_s}
                shown = (f"{seconds:.1f} s, exit {code}" if seconds is not None
                         else f"did not finish in {args.timeout_s:.0f} s (killed)")
                log.info("  -> %s%s", shown, "" if passed else f"\n{tail}")
    verify = mount.verify()
    problems = mount.log_problems()
    shutil.rmtree(native, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    measurements: list[Measurement] = []
    for name, _, unit in plan:
        ops = args.procs * args.ops if name.startswith("fsstress") else args.fsx_ops
        row: dict[str, Any] = {"name": name, "unit": unit, "ops": ops}
        for side in ("native", "hubfs"):
            run = runs[f"{name} {side}"]
            seconds = run["seconds"]
            row[f"{side}_s"] = None if seconds is None else round(seconds, 3)
            row[f"{side}_per_s"] = None if not seconds else round(ops / seconds, 1)
            row[f"{side}_passed"] = run["passed"]
            measurements.append(Measurement(f"{name} {side}", 0,
                                            [seconds if seconds is not None else float("inf")],
                                            run))
        row["ratio"] = (round(row["hubfs_s"] / row["native_s"], 2)
                        if row["hubfs_s"] and row["native_s"] else None)
        row["target_ratio"] = TARGET_FSSTRESS_RATIO if name.startswith("fsstress") else None
        rows.append(row)
    fs_type = filesystem_of(work)["type"]
    print(f"\nnative: {native} on {fs_type}; hubfs: {mount.path} (same disk)")
    for row in rows:
        def fmt(side: str, row: dict[str, Any] = row) -> str:
            s = row[f"{side}_s"]
            if s is None:
                return f"did not finish in {args.timeout_s:.0f} s"
            return f"{s:.1f} s ({row[f'{side}_per_s']:.0f} ops/s, " \
                   f"{'pass' if row[f'{side}_passed'] else 'FAIL'})"
        ratio = f"{row['ratio']:.1f}x" if row["ratio"] else "n/a"
        print(f"{row['name']:24s} native {fmt('native')}; hubfs {fmt('hubfs')}; ratio {ratio}"
              + (f" (target <= {row['target_ratio']:.0f}x)" if row["target_ratio"] else ""))
    print(f"hubfs umount {mount.umount_s or 0:.1f} s{' FAILED' if mount.umount_error else ''};"
          f" verify: {'clean' if verify['ok'] else 'PROBLEMS ' + ' | '.join(verify['output'])};"
          f" daemon log problems: {len(problems)}")
    for line in problems[:5]:
        print(f"  {line}")
    extra = {"versus_native": rows, "native_filesystem": fs_type, "runs": runs,
             "umount_s": round(mount.umount_s or 0, 3), "umount_error": mount.umount_error,
             "verify": verify, "daemon_log_problems": problems[:20],
             "tools": {k: str(v) for k, v in tools.items()}}
    path = write_result("fsstress", measurements, machine_facts(work), extra, args.json)
    print(f"results: {path}")
    subprocess.run([sys.executable, str(Path(__file__).with_name("plot.py")), str(path),
                    "-o", str(path.with_suffix(".png"))], check=False)
    ok = verify["ok"] and all(r["passed"] for r in runs.values()) and not mount.umount_error
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
