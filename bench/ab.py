"""Interleaved A/B of asyncsat checkouts on many small files (`get --wait`, as bench/run.py).

On this project's VM the same commit's many-small-files run varies by a third from one
bench invocation to the next (the host, the disk); a change of a few percent shows only
when two checkouts run in turns against the same server, each in a home of its own (a
schema change stays in its home). Besides the wall time it prints the asyncsat process's
CPU and context switches (a count that varies little: it shows the hand-offs between the
event loop's thread and the writer threads), and the CPU used meanwhile by everything else
(PostgreSQL and the file server, mostly).

    .venv/bin/python bench/ab.py /path/to/checkout-a /path/to/checkout-b --repeat 4

Each tree is put first on PYTHONPATH of its `python -m asyncsat` (sys.executable: a venv
with asyncsat's dependencies). The output folders are kept until the end (deleting many
files slows the file creations of the next half minute on ext4: see README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _busy() -> float:
    """CPU seconds used so far by the whole machine (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trees", nargs="+", type=Path, help="asyncsat checkouts to compare")
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--kb", type=int, default=64, help="size of each file, KiB")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--repeat", type=int, default=4, help="runs per tree, in turns")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="asyncsat-ab-"))
    files = work / "files"
    files.mkdir()
    for i in range(args.files):
        (files / f"small_{i:05d}.bin").write_bytes(os.urandom(args.kb * 1024))
    server = subprocess.Popen(
        [sys.executable, str(BENCH / "serve.py"), str(files), "--max-per-user",
         str(args.connections), "--chunk", str(1 << 20)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdin is not None
    port = json.loads(server.stdout.readline())["port"]
    base = f"http://127.0.0.1:{port}/files/"
    urls = [f"{base}small_{i:05d}.bin" for i in range(args.files)]
    results: dict[Path, list[tuple[float, float, float, int]]] = {t: [] for t in args.trees}
    try:
        def asyncsat(tree: Path, home: Path, *argv: str) -> list[str]:
            # (-P: `-m` would put the current folder first on sys.path, before PYTHONPATH,
            # and run the checkout the bench was started from for every tree)
            return [sys.executable, "-P", "-m", "asyncsat", "--home", str(home), *argv]

        def env(tree: Path) -> dict[str, str]:
            return {**os.environ, "PYTHONPATH": str(tree.resolve())}

        homes = {t: work / f"home-{n}" for n, t in enumerate(args.trees)}
        for tree in args.trees:  # (which code each tree runs: its own, or the bench is void)
            found = subprocess.run(
                [sys.executable, "-P", "-c", "import asyncsat; print(asyncsat.__file__)"],
                env=env(tree), check=True, capture_output=True, text=True).stdout.strip()
            if not Path(found).resolve().is_relative_to(tree.resolve()):
                raise SystemExit(f"ab: {tree} runs {found}, not its own asyncsat")
        for tree, home in homes.items():
            subprocess.run(asyncsat(tree, home, "init"), env=env(tree), check=True,
                           capture_output=True)
        run = 0
        for r in range(args.repeat):
            for tree in args.trees if r % 2 == 0 else args.trees[::-1]:
                run += 1
                provider, out = f"ab-{run}", work / f"out-{run}"
                subprocess.run(asyncsat(tree, homes[tree], "provider", "add", provider,
                                        "--protocol", "http", "--url", base, "--set",
                                        f"max_connections={args.connections}"),
                               env=env(tree), check=True, capture_output=True)
                subprocess.run(["sync"], check=True)
                time.sleep(1)
                before, busy = resource.getrusage(resource.RUSAGE_CHILDREN), _busy()
                start = time.perf_counter()
                done = subprocess.run(
                    asyncsat(tree, homes[tree], "get", *urls, "--provider", provider,
                             "--dest", str(out), "--wait"),
                    env=env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - start
                after, busy = resource.getrusage(resource.RUSAGE_CHILDREN), _busy() - busy
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                switches = (after.ru_nvcsw - before.ru_nvcsw) + \
                    (after.ru_nivcsw - before.ru_nivcsw)
                got = sum(1 for _ in out.rglob("*.bin"))
                if done.returncode or got != args.files:
                    raise SystemExit(f"ab: {tree}: exit {done.returncode}, {got} files")
                results[tree].append((wall, cpu, busy - cpu, switches))
                print(f"{tree}: run {r + 1}: wall {wall:.2f} s, CPU {cpu:.2f} s, others' "
                      f"CPU {busy - cpu:.2f} s, {switches} context switches", flush=True)
                subprocess.run(asyncsat(tree, homes[tree], "provider", "remove", provider,
                                        "--force"), env=env(tree), capture_output=True)
    finally:
        server.stdin.close()
        server.wait()
    print(f"medians of {args.repeat} runs, {args.files} x {args.kb} KiB, "
          f"{args.connections} connections:")
    for tree, rows in results.items():
        wall, cpu, others, switches = (statistics.median(c) for c in zip(*rows, strict=True))
        print(f"  {tree}: wall {wall:.2f} s (fastest {min(r[0] for r in rows):.2f}), "
              f"CPU {cpu:.2f} s, others' CPU {others:.2f} s, {switches:.0f} context switches")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
