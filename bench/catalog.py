"""Catalog benchmark: asyncsat `search --wait` against a plain aiohttp script, on a CDSE emulator.

    python bench/catalog.py --products 1000 --size-kb 64 --connections 4 --repeat 3

The CDSE emulator of the tests (tests/cdse.py) runs in a process of its own
(bench/serve_cdse.py) with one user allowed C downloads at once and N products of K KiB
(real zips, Online, with MD5 and BLAKE3 in the catalogue). Then, R times each:

- asyncsat, as a user runs it: the embedded PostgreSQL in a temp `--home` (or `--dsn`),
  `provider add --preset cdse --url ... --set token_url=... --set download_url=...` and
  `credential add --max-connections C --password-stdin` (not timed), then the timed
  `asyncsat search PROVIDER --collection SENTINEL-2 --dest DIR --wait`;
- aiohttp: bench/catalog_floor.py, a plain aiohttp script doing the same job with nothing
  else (password grant, catalogue paged by nextLink, C concurrent downloads to files): the
  floor;
- aiohttp-durable: the same with asyncsat's part file, fsync, rename and folder fsync;
- eodag, with `--eodag-python PY` (a Python with eodag): bench/catalog_eodag.py.

Each run's wall time, CPU (user+sys of its process tree, os.wait4) and peak RSS are
measured, every file's size and MD5 checked. Then, unless `--token-seconds 0`, the token
scenario: asyncsat alone for about a minute on throttled products against an emulator
whose access tokens live `--token-lifetime` seconds, counting the grants it asks for.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from run import (  # noqa: E402  (bench/run.py: the same measurements as the file benchmark)
    ROOT,
    FileSpec,
    Measured,
    Postgres,
    clean_env,
    code_version,
    measure,
    setup_failed,
    verify,
)

MiB = 1 << 20
TOOLS = ("asyncsat", "aiohttp", "aiohttp-durable", "eodag")
USER = "bench@example.eu"


# -- the emulator ---------------------------------------------------------------------------

class Emulator:
    """bench/serve_cdse.py in its own process: URLs, the products' manifest, counters."""

    def __init__(self, work: Path, *, products: int, size: int, connections: int,
                 rate: float | None = None, token_lifetime: float = 600,
                 refresh_lifetime: float = 3600) -> None:
        self.password = secrets.token_urlsafe(12)
        manifest = work / f"manifest-{secrets.token_hex(4)}.json"
        cmd = [sys.executable, str(BENCH / "serve_cdse.py"), "--products", str(products),
               "--size", str(size), "--max-downloads", str(connections), "--user", USER,
               f"--password={self.password}",  # (it may begin with "-": not an option)
               "--token-lifetime", str(token_lifetime),
               "--refresh-lifetime", str(refresh_lifetime), "--manifest", str(manifest)]
        if rate:
            cmd += ["--rate", str(rate)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=clean_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"bench: the CDSE emulator did not start "
                             f"(exit {self.proc.returncode})")
        info = json.loads(line)
        self.catalogue_url: str = info["catalogue_url"]
        self.token_url: str = info["token_url"]
        self.download_url: str = info["download_url"]
        self.token_lifetime, self.rate = token_lifetime, rate
        self.files = [FileSpec(name, size_md5[0], size_md5[1])
                      for name, size_md5 in json.loads(manifest.read_text()).items()]
        manifest.unlink()

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench: the CDSE emulator exited (code {self.proc.poll()})")
        data: dict[str, Any] = json.loads(line)
        return data

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset(self) -> None:
        self._ask("reset")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the emulator stops at the end of its stdin
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- results --------------------------------------------------------------------------------

@dataclass
class Result:
    """One timed run of one client over the whole catalogue."""

    scenario: str
    tool: str
    run: int
    files: int
    bytes: int
    wall: float
    cpu: float
    user: float
    sys: float
    maxrss_kib: int
    returncode: int
    verified: bool
    problem: str = ""
    peak_downloads: int = 0
    rejected: int = 0
    grants: dict[str, int] = field(default_factory=dict)
    grant_times: list[tuple[float, str]] = field(default_factory=list)
    download_tokens: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    emu_cpu: float = 0.0
    db_cpu: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    load: float = 0.0  # the machine's 1-minute load average when the run started

    @property
    def per_second(self) -> float:
        return self.files / self.wall if self.wall else 0.0

    @property
    def cpu_ms_per_product(self) -> float:
        return 1000 * self.cpu / self.files if self.files else 0.0

    @property
    def rss_mib(self) -> float:
        return self.maxrss_kib / 1024


def _grants(stats: dict[str, Any]) -> dict[str, int]:
    """Grants by type (password, refresh_token) of the one user."""
    return {key.split()[-1]: n for key, n in stats["grants"].items()}


def phases(log: Path, started: float) -> dict[str, float]:
    """Seconds from spawning asyncsat to milestones of its JSON log (where the time goes)."""
    marks: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
            when = datetime.fromisoformat(str(entry["timestamp"])).timestamp() - started
        except (ValueError, KeyError):
            continue
        event = entry.get("event")
        if event == "daemon started":
            marks.setdefault("daemon started", when)
        elif event == "download running":
            marks.setdefault("first download running", when)
        elif event == "download done":
            marks.setdefault("first download done", when)
            marks["last download done"] = when
        elif event == "daemon stopped":
            marks["daemon stopped"] = when
    return {k: round(v, 3) for k, v in marks.items()}


# -- the clients ----------------------------------------------------------------------------

class Bench:
    """One benchmark session: work directory, asyncsat home, options."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.home = work / "home"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = Postgres(self.home)
        self.providers = 0

    def asyncsat(self, *argv: str) -> list[str]:
        db = ["--dsn", self.args.dsn] if self.args.dsn else []
        return [sys.executable, "-m", "asyncsat", *db, "--home", str(self.home),
                "--log-format", "json", *argv]

    def _setup_run(self, argv: list[str], stdin: str = "") -> None:
        log = self.logs / "asyncsat-setup.log"
        with log.open("ab") as out:
            done = subprocess.run(self.asyncsat(*argv), input=stdin.encode(), stdout=out,
                                  stderr=subprocess.STDOUT, env=clean_env(), timeout=120)
        if done.returncode:
            raise setup_failed(" ".join(argv[:2]), log)

    def setup(self) -> None:
        """Create the schema and start the database before anything is timed."""
        self._setup_run(["init"])

    def add_provider(self, emu: Emulator) -> str:
        """A CDSE provider on the emulator, with the user's credential (not timed).

        asyncsat fetches a catalog product once per provider (and allows one provider per
        URL), so every run gets its provider, removed after the run (`remove_provider`).
        """
        self.providers += 1
        name = f"cdse-bench-{os.getpid()}-{self.providers}"
        self._setup_run(["provider", "add", name, "--preset", "cdse", "--url",
                         emu.catalogue_url, "--set", f"token_url={emu.token_url}",
                         "--set", f"download_url={emu.download_url}",
                         "--set", f"page_size={self.args.page_size}"])
        self._setup_run(["credential", "add", name, "--user", USER, "--max-connections",
                         str(self.args.connections), "--password-stdin"], emu.password)
        return name

    def remove_provider(self, name: str) -> None:
        self._setup_run(["provider", "remove", name, "--force"])

    def command(self, tool: str, emu: Emulator, out: Path, label: str,
                provider: str) -> tuple[list[str], str]:
        """The timed command line and what goes to its standard input."""
        if tool == "asyncsat":
            cmd = self.asyncsat("search", provider, "--collection", "SENTINEL-2", "--dest",
                                str(out), "--wait")
            if self.args.cprofile:
                prof = self.logs / f"asyncsat-{label}.prof"
                cmd[1:3] = ["-m", "cProfile", "-o", str(prof), "-m", "asyncsat.cli"]
            return cmd, ""
        if tool == "eodag":
            return [self.args.eodag_python, str(BENCH / "catalog_eodag.py"), "--catalogue",
                    emu.catalogue_url, "--token-url", emu.token_url, "--download-url",
                    emu.download_url, "--user", USER, "--dest", str(out), "--connections",
                    str(self.args.connections), "--page-size", str(self.args.page_size),
                    "--cfg-dir", str(self.work / "eodag-cfg")], emu.password + "\n"
        return [sys.executable, str(BENCH / "catalog_floor.py"), "--catalogue",
                emu.catalogue_url, "--token-url", emu.token_url, "--download-url",
                emu.download_url, "--user", USER, "--dest", str(out), "--connections",
                str(self.args.connections), "--page-size", str(self.args.page_size),
                "--loop", self.args.floor_loop,
                *(["--durable"] if tool == "aiohttp-durable" else [])], emu.password + "\n"

    def run_tool(self, tool: str, emu: Emulator, *, scenario: str, run: int) -> Result:
        out = self.work / "out" / tool
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        label = f"{scenario}-{run}"
        provider = self.add_provider(emu) if tool == "asyncsat" else ""
        cmd, stdin = self.command(tool, emu, out, label, provider)
        log = self.logs / f"{tool}-{label}.log"
        os.sync()  # earlier runs' dirty pages must not be written back during this one
        emu.reset()
        db0, emu0, load = self.pg.cpu(), emu.stats()["cpu_seconds"], os.getloadavg()[0]
        started = time.time()
        m = measure_stdin(cmd, log, self.args.timeout, stdin)
        time.sleep(0.3)  # let the closed backends exit before reading the database's CPU
        stats, db1 = emu.stats(), self.pg.cpu()
        problem = check(tool, emu.files, out) if m.returncode == 0 else \
            f"exit code {m.returncode}"
        shutil.rmtree(out, ignore_errors=True)
        if provider:
            self.remove_provider(provider)
        result = Result(
            scenario=scenario, tool=tool, run=run, files=len(emu.files),
            bytes=sum(f.size for f in emu.files), wall=m.wall, cpu=m.cpu, user=m.user,
            sys=m.sys, maxrss_kib=m.maxrss_kib, returncode=m.returncode, verified=not problem,
            problem=problem, peak_downloads=max(stats["peak"].values(), default=0),
            rejected=sum(stats["rejected"].values()), grants=_grants(stats),
            grant_times=[(t, g) for t, g in stats["grant_times"]],
            download_tokens=stats["download_tokens"], requests=stats["requests"],
            emu_cpu=stats["cpu_seconds"] - emu0,
            db_cpu=db1 - db0 if tool == "asyncsat" and db0 is not None and db1 is not None
            else None,
            phases=phases(log, started) if tool == "asyncsat" else {}, load=load,
        )
        print(f"bench: {scenario} run {run} {tool:<8} {result.wall:7.2f} s "
              f"{result.per_second:7.1f} products/s cpu {result.cpu:6.2f} s "
              f"{'ok' if result.verified else 'FAILED: ' + problem}", file=sys.stderr,
              flush=True)
        return result


def check(tool: str, files: Sequence[FileSpec], out: Path) -> str:
    """run.verify: every file with its size and MD5, nothing else (eodag's way: see below)."""
    if tool == "eodag":
        # eodag names a file after the product's Name without ".SAFE", and keeps a record
        # of what it downloaded in DEST/.downloaded/ (one empty file per product)
        shutil.rmtree(out / ".downloaded", ignore_errors=True)
        files = [FileSpec(f.name.replace(".SAFE.zip", ".zip"), f.size, f.md5) for f in files]
    return verify(files, out)


def measure_stdin(cmd: list[str], log: Path, timeout: float, stdin: str) -> Measured:
    """run.measure, with `stdin` fed from a file (the password: never on a command line)."""
    if not stdin:
        return measure(cmd, log, timeout)
    secret = log.with_suffix(".in")
    secret.touch(mode=0o600)
    secret.write_text(stdin)
    try:  # sh execs the command: the same process, measured the same way
        return measure(["sh", "-c", 'exec "$@" <"$0"', str(secret), *cmd], log, timeout)
    finally:
        secret.unlink()


# -- scenarios ------------------------------------------------------------------------------

def run_catalog(bench: Bench) -> list[Result]:
    a = bench.args
    emu = Emulator(bench.work, products=a.products, size=a.size_kb * 1024,
                   connections=a.connections)
    results: list[Result] = []
    try:
        for run in range(1, a.repeat + 1):
            for tool in a.tools:
                results.append(bench.run_tool(tool, emu, scenario="catalog", run=run))
    finally:
        emu.close()
    return results


def run_tokens(bench: Bench) -> tuple[Result, dict[str, Any]]:
    """asyncsat for about `--token-seconds` on throttled products, with short-lived tokens."""
    a = bench.args
    size = a.size_kb * 1024
    count = max(a.connections, round(a.connections * a.token_seconds / a.token_file_seconds))
    emu = Emulator(bench.work, products=count, size=size, connections=a.connections,
                   rate=size / a.token_file_seconds, token_lifetime=a.token_lifetime,
                   refresh_lifetime=a.refresh_lifetime)
    try:
        result = bench.run_tool("asyncsat", emu, scenario="tokens", run=1)
    finally:
        emu.close()
    figures = token_figures(result, a.token_lifetime)
    figures.update(rate=size / a.token_file_seconds, file_seconds=a.token_file_seconds,
                   refresh_lifetime_s=a.refresh_lifetime)
    return result, figures


def renewal(lifetime: float) -> float:
    """When asyncsat renews a token of `lifetime` seconds (asyncsat/auth/oauth.py's rule)."""
    return lifetime - min(60.0, lifetime / 5)


def token_figures(r: Result, lifetime: float) -> dict[str, Any]:
    """Grants by type, their spacing in steady state, per token lifetime and per hour."""
    times = [t for t, _g in r.grant_times]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    span = (r.phases.get("last download done") or r.wall) - (times[0] if times else 0.0)
    interval = statistics.median(gaps) if gaps else None
    return {
        "files": r.files, "grants": r.grants, "grant_times": r.grant_times,
        "download_tokens": r.download_tokens, "span_s": span, "lifetime_s": lifetime,
        "grants_per_file": len(times) / r.files if r.files else None,
        "run_grants_per_lifetime": len(times) / (span / lifetime) if span > 0 else None,
        "median_interval_s": interval,
        "steady_grants_per_lifetime": lifetime / interval if interval else None,
        "rule_interval_s": renewal(lifetime),
        "cdse_interval_s": renewal(600.0), "cdse_grants_per_hour": 3600 / renewal(600.0),
        "scaled_grants_per_hour": 3600 / (interval / lifetime * 600.0) if interval else None,
    }


# -- report ---------------------------------------------------------------------------------

def header() -> str:
    return (f"{'tool':<16}{'run':>4}{'wall s':>8}{'prod/s':>8}{'MiB/s':>7}{'CPU s':>7}"
            f"{'user':>6}{'sys':>6}{'CPU ms/prod':>12}{'RSS MiB':>8}{'ok':>4}{'peak':>5}"
            f"{'429s':>5}{'grants':>7}{'db CPU s':>9}{'emu CPU s':>10}{'load':>6}")


def row(r: Result) -> str:
    db = f"{r.db_cpu:9.2f}" if r.db_cpu is not None else f"{'-':>9}"
    grants = "+".join(str(r.grants.get(g, 0)) for g in ("password", "refresh_token"))
    return (f"{r.tool:<16}{r.run:>4}{r.wall:8.2f}{r.per_second:8.1f}"
            f"{r.bytes / MiB / r.wall:7.1f}{r.cpu:7.2f}{r.user:6.2f}{r.sys:6.2f}"
            f"{r.cpu_ms_per_product:12.2f}{r.rss_mib:8.1f}{'yes' if r.verified else 'NO':>4}"
            f"{r.peak_downloads:>5}{r.rejected:>5}{grants:>7}{db}{r.emu_cpu:10.2f}{r.load:6.2f}")


def _median(results: Sequence[Result], tool: str, attr: str) -> float | None:
    values = [float(getattr(r, attr)) for r in results if r.tool == tool and r.verified]
    return statistics.median(values) if values else None


def report_catalog(results: Sequence[Result], args: argparse.Namespace) -> str:
    tools = [t for t in TOOLS if any(r.tool == t for r in results)]
    lines = [f"== catalog: {args.products} products x {args.size_kb} KiB, "
             f"C={args.connections} downloads at once, {args.repeat} run(s) per client",
             header(), *map(row, results), "medians of the verified runs:",
             f"{'':<16}" + "".join(f"{t:>17}" for t in tools)
             + "".join(f"{'asyncsat / ' + t:>28}" for t in tools[1:] if tools[0] == "asyncsat")]
    for label, attr in (("wall s", "wall"), ("products/s", "per_second"), ("CPU s", "cpu"),
                        ("CPU ms/product", "cpu_ms_per_product"), ("peak RSS MiB", "rss_mib"),
                        ("db CPU s", "db_cpu"), ("emulator CPU s", "emu_cpu")):
        values = [_median([r for r in results if getattr(r, attr) is not None], t, attr)
                  for t in tools]
        cells = [f"{v:17.2f}" if v is not None else f"{'-':>17}" for v in values]
        ratios = [f"{values[0] / v:28.2f}" if values[0] is not None and v else f"{'':>28}"
                  for v in values[1:]] if tools[0] == "asyncsat" else []
        lines.append(f"{label:<16}" + "".join(cells) + "".join(ratios))
    busy = [r.emu_cpu / r.wall for r in results if r.wall]
    if busy:
        lines.append(f"emulator CPU: {max(busy):.0%} of one core at most during a run "
                     f"(median {statistics.median(busy):.0%})")
    marks = [r.phases for r in results if r.tool == "asyncsat" and r.phases]
    if marks:
        keys = [k for k in ("daemon started", "first download running", "first download done",
                            "last download done", "daemon stopped") if all(k in m for m in marks)]
        lines.append("asyncsat milestones, seconds after spawning (median): " + ", ".join(
            f"{k} {statistics.median(m[k] for m in marks):.2f}" for k in keys))
    return "\n".join(lines)


def report_tokens(r: Result, f: dict[str, Any]) -> str:
    grants = ", ".join(f"{g} {n}" for g, n in sorted(f["grants"].items())) or "none"
    times = " ".join(f"{t:.1f}{'p' if g == 'password' else 'r'}" for t, g in f["grant_times"])
    interval, lifetime = f["median_interval_s"], f["lifetime_s"]
    lines = [
        f"== tokens: {r.files} products x {r.bytes // r.files // 1024} KiB at "
        f"{f['rate']:.0f} B/s each ({f['file_seconds']:g} s a file), access tokens of "
        f"{lifetime:g} s, refresh tokens of {f['refresh_lifetime_s']:g} s",
        header(), row(r),
        f"grants: {grants} for {r.files} files ({f['grants_per_file'] or 0:.3f} per file); "
        f"{f['download_tokens']} distinct token(s) on the download requests",
        f"grant times (s after the run began; p password, r refresh): {times}",
    ]
    if interval:
        lines += [
            f"steady state: one grant every {interval:.2f} s (median), "
            f"{f['steady_grants_per_lifetime']:.2f} per token lifetime "
            f"(asyncsat's rule: renew at lifetime - min(60 s, lifetime / 5) = "
            f"{f['rule_interval_s']:g} s, when a request next needs the token)",
            f"whole run: {f['run_grants_per_lifetime']:.2f} grants per token lifetime over "
            f"{f['span_s']:.1f} s, the password grant included",
            f"CDSE's 600 s tokens, by the rule: one grant every {f['cdse_interval_s']:g} s, "
            f"{f['cdse_grants_per_hour']:.2f} per account per hour in steady state, plus one "
            f"password grant per daemon (or `--wait` process) start; scaling the measured "
            f"interval linearly instead: {f['scaled_grants_per_hour']:.2f} per hour",
        ]
    else:
        lines.append("steady state: fewer than two grants (make --token-seconds longer)")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark asyncsat's catalog searches against a plain aiohttp script.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--products", type=int, default=1000, help="N: products in the catalogue")
    p.add_argument("--size-kb", type=int, default=64, help="K: size of each product, KiB")
    p.add_argument("--connections", type=int, default=4,
                   help="C: downloads of the user at once (emulator cap, credential, semaphore)")
    p.add_argument("--repeat", type=int, default=3, help="runs per client (tables use medians)")
    p.add_argument("--tools", default=None,
                   help="comma-separated subset of " + ",".join(TOOLS) + " (default: all; "
                        "eodag only with --eodag-python)")
    p.add_argument("--eodag-python", help="a Python with eodag installed: measure eodag too")
    p.add_argument("--page-size", type=int, default=100,
                   help="products per catalogue page, both clients (the cdse preset has 100, "
                        "which asyncsat cannot read yet: see bench/README.md)")
    p.add_argument("--floor-loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="the aiohttp script's event loop (asyncsat runs on uvloop)")
    p.add_argument("--token-seconds", type=float, default=60,
                   help="length of the token scenario (0: skip it)")
    p.add_argument("--token-lifetime", type=float, default=10,
                   help="token scenario: access token lifetime, seconds")
    p.add_argument("--refresh-lifetime", type=float, default=60,
                   help="token scenario: refresh token lifetime, seconds")
    p.add_argument("--token-file-seconds", type=float, default=1,
                   help="token scenario: seconds each product takes (its rate)")
    p.add_argument("--dsn", help="PostgreSQL for asyncsat (default: embedded, in a temp home)")
    p.add_argument("--workdir", type=Path, help="where files go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) at the end")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per client run")
    p.add_argument("--json", type=Path, help="results file (default: bench/results/*.json)")
    p.add_argument("--cprofile", action="store_true",
                   help="run asyncsat under cProfile (slower!); .prof files in the logs dir")
    args = p.parse_args(argv)
    if args.tools is None:
        args.tools = ",".join(t for t in TOOLS if t != "eodag" or args.eodag_python)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown or not args.tools:
        p.error(f"unknown tools: {', '.join(unknown)}" if unknown else "no tool")
    if "eodag" in args.tools and not args.eodag_python:
        p.error("eodag needs --eodag-python")
    if min(args.products, args.connections, args.repeat, args.size_kb) < 1:
        p.error("--products, --connections, --repeat and --size-kb must be positive")
    return args


def versions(args: argparse.Namespace) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    if args.eodag_python:
        with contextlib.suppress(OSError):
            found["eodag"] = subprocess.run(
                [args.eodag_python, "-c", "import eodag; print(eodag.__version__)"],
                capture_output=True, text=True).stdout.strip()
    for module in ("aiohttp", "uvloop", "asyncpg"):
        with contextlib.suppress(ImportError, AttributeError):
            found[module] = str(__import__(module).__version__)
    probe = subprocess.run([sys.executable, "-m", "asyncsat", "--version"], capture_output=True,
                           text=True, env=clean_env(), cwd=ROOT)
    found["asyncsat"] = probe.stdout.strip()
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="asyncsat-catalog-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    code = code_version()
    print(f"bench: asyncsat from {code['asyncsat']}, commit {code['commit'] or '?'}"
          + (" (asyncsat/ has uncommitted changes)" if code["dirty"] else ""),
          file=sys.stderr, flush=True)
    results: list[Result] = []
    tokens: tuple[Result, dict[str, Any]] | None = None
    try:
        if "asyncsat" in args.tools:
            bench.setup()
        results = run_catalog(bench)
        print(report_catalog(results, args) + "\n", flush=True)
        if args.token_seconds > 0 and "asyncsat" in args.tools:
            tokens = run_tokens(bench)
            print(report_tokens(*tokens) + "\n", flush=True)
    finally:
        if not args.dsn:
            bench.pg.stop()
        if args.keep:
            print(f"bench: work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    save(args, results, tokens, argv, code)
    ok = all(r.verified for r in results) and (tokens is None or tokens[0].verified)
    return 0 if ok else 1


def save(args: argparse.Namespace, results: Sequence[Result],
         tokens: tuple[Result, dict[str, Any]] | None, argv: Sequence[str] | None,
         code: dict[str, Any]) -> None:
    path = args.json or BENCH / "results" / time.strftime("catalog-%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(), "code": code, "versions": versions(args),
        "database": "dsn" if args.dsn else "embedded (--home in the work dir)",
        "results": [_dump(r) for r in results],
        "tokens": {"result": _dump(tokens[0]), **tokens[1]} if tokens else None,
    }
    path.write_text(json.dumps(data, indent=1))
    print(f"bench: results written to {path}", file=sys.stderr)


def _dump(r: Result) -> dict[str, Any]:
    return {**asdict(r), "per_second": r.per_second,
            "cpu_ms_per_product": r.cpu_ms_per_product, "rss_mib": r.rss_mib}


if __name__ == "__main__":
    sys.exit(main())
