"""The benchmarks stay runnable: each one, on a few tiny files, ends 0 and prints its
figures (a change of an API they call broke `bench/claims.py` once, unseen)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_the_claims_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "claims.py"), "--rows", "8000", "--providers",
         "2", "--daemons", "1", "2", "--seconds", "0.5"],
        capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8000 queued downloads over 2 providers" in result.stdout
    lines = [line.split() for line in result.stdout.splitlines()]
    figures = [cols for cols in lines if cols and cols[0] in ("1", "2") and len(cols) == 11]
    assert len(figures) == 4, result.stdout  # (handed over, given back) x (1, 2 daemons)
    assert all(int(cols[1]) > 0 for cols in figures), result.stdout  # rows done


def test_the_transfer_benchmark_runs_against_pyfloor(tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--scenario", "unthrottled",
         "--files", "3", "--size-mb", "0.05", "--connections", "2", "--repeat", "1",
         "--tools", "asyncsat,pyfloor", "--workdir", str(tmp_path / "work"),
         "--json", str(report)],
        capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "asyncsat wall / pyfloor wall" in result.stdout
    # (small files: the CPU of each tool's runs with the server's and PostgreSQL's)
    bound = next(line for line in result.stdout.splitlines() if line.startswith("CPU of a run"))
    assert re.search(r"asyncsat \d+\.\d\d s \(\d+%\), pyfloor \d+\.\d\d s", bound), bound
    runs = json.loads(report.read_text())["scenarios"][0]["results"]
    assert sorted((r["tool"], r["verified"]) for r in runs) == [
        ("asyncsat", True), ("pyfloor", True)]


def test_the_catalog_benchmark_runs(tmp_path: Path) -> None:
    report = tmp_path / "catalog.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "catalog.py"), "--products", "12",
         "--size-kb", "8", "--connections", "2", "--repeat", "1", "--tools",
         "asyncsat,aiohttp-durable", "--token-seconds", "0", "--workdir",
         str(tmp_path / "work"), "--json", str(report)],
        capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = json.loads(report.read_text())["results"]
    assert sorted((r["tool"], r["files"], r["verified"]) for r in runs) == [
        ("aiohttp-durable", 12, True), ("asyncsat", 12, True)]
