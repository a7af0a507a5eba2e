"""Settings: explicit data, read from the environment in `from_env`, never at import."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from asyncsat.dsn import as_uri, describe
from asyncsat.errors import ConfigError

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_home(environ: Mapping[str, str]) -> Path:
    """`$XDG_DATA_HOME/asyncsat`, else `~/.local/share/asyncsat`."""
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", str(Path.home()))) / ".local" / "share"
    return base / "asyncsat"


@dataclass(frozen=True)
class Settings:
    """Everything the CLI and the daemon need to know before they touch the database."""

    dsn: str | None = field(default=None, repr=False)
    """PostgreSQL DSN; None starts (or reuses) the embedded server under `home`."""
    dsn_password: str | None = field(default=None, repr=False)
    """The password read from `dsn_password_file`: already part of `dsn`, known to redact it."""
    home: Path = field(default_factory=lambda: default_home(os.environ))
    """State directory: the embedded database lives in `home/pg`."""
    dest: Path | None = None
    """Default destination of downloads; None means `home/downloads`."""
    log_format: str = "json"
    """`json` (one object per line) or `console`; `from_env` picks console on a terminal."""
    log_level: str = "info"
    """Lowest level that is logged."""
    chunk_size: int = 1 << 20
    """Bytes read from the network and written to disk at a time."""
    progress_interval: float = 1.0
    """Seconds between two progress updates of a running download in the database."""
    progress_log_interval: float = 30.0
    """Seconds between two `download progress` log lines of a running transfer (0: none);
    also how often `get --wait` prints its progress when it is not on a terminal."""
    shutdown_timeout: float = 8.0
    """Seconds granted to running transfers to stop cleanly on SIGTERM."""
    listener_ping: float = 10.0
    """Seconds of silence after which the LISTEN connection is checked."""
    lease_timeout: float = 30.0
    """Seconds a daemon's slots and downloads stay its own without a heartbeat: the
    downloads of a daemon that died are taken over by another after this long."""
    metrics_port: int | None = None
    """`asyncsat run` serves Prometheus metrics on this port (None: no metrics)."""
    metrics_host: str = "127.0.0.1"
    """The address the metrics are served on."""
    status_interval: float = 10.0
    """Seconds between two STATUS= lines (queue figures) sent to systemd."""
    keep_page_cache: bool = False
    """Leave downloaded files in the page cache; by default their pages are dropped once on
    disk (files an ingest host keeps would otherwise push out what it reads, PostgreSQL's
    data first, and make every new file wait for pages to be freed)."""

    @property
    def default_dest(self) -> Path:
        return self.dest if self.dest is not None else self.home / "downloads"

    @property
    def database(self) -> str:
        """Which database the settings lead to, for people (never with a password)."""
        if not self.dsn:
            return f"embedded PostgreSQL in {self.home / 'pg'}"
        return f"PostgreSQL {describe(self.dsn)}"

    def validate(self) -> Settings:
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if self.chunk_size < 4096:
            raise ConfigError("chunk_size must be at least 4096")
        if not 1.0 <= self.lease_timeout <= 86400:
            raise ConfigError("lease_timeout must be between 1 and 86400 seconds")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError(f"metrics_port must be a TCP port (1-65535), not "
                              f"{self.metrics_port}")
        if self.progress_interval <= 0:
            raise ConfigError("progress_interval must be more than 0 seconds")
        if self.progress_log_interval < 0:
            raise ConfigError("progress_log_interval must be 0 (no progress lines) or more")
        if not self.metrics_host.strip():
            raise ConfigError("metrics_host must be an address")
        if self.status_interval <= 0:
            raise ConfigError("status_interval must be positive")
        if self.listener_ping <= 0:  # (0 made the daemon reconnect to PostgreSQL in a loop)
            raise ConfigError("listener_ping must be more than 0 seconds")
        if self.shutdown_timeout < 0:
            raise ConfigError("shutdown_timeout must be 0 seconds or more")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, tty: bool = False,
                 **overrides: object) -> Settings:
        """Build settings from ASYNCSAT_CONFIG (TOML), then ASYNCSAT_* variables, then overrides.

        Overrides whose value is None are ignored. With no log format anywhere, the logs are
        for people on a terminal (`tty`: console) and JSON lines elsewhere (services, pipes).
        """
        values: dict[str, object] = {}
        config_path = environ.get("ASYNCSAT_CONFIG")
        if config_path:
            values.update(_read_toml(Path(config_path)))
        for key, var in (("dsn", "ASYNCSAT_DSN"), ("home", "ASYNCSAT_HOME"),
                         ("dest", "ASYNCSAT_DEST"),
                         ("dsn_password_file", "ASYNCSAT_DSN_PASSWORD_FILE")):
            if environ.get(var):
                values[key] = environ[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        defaults = cls(home=default_home(environ))
        dsn = _str(values, "dsn", defaults.dsn)
        if dsn:
            try:
                dsn = as_uri(dsn)
            except ValueError as exc:
                raise ConfigError(f"invalid dsn: {exc}") from None
        password = None
        password_file = _path(values, "dsn_password_file")
        if password_file is not None:
            dsn, password = _with_password(dsn, password_file)
        return cls(
            dsn=dsn,
            dsn_password=password,
            home=_path(values, "home") or defaults.home,
            dest=_path(values, "dest"),
            log_format=_str(values, "log_format", "console" if tty else "json") or "json",
            log_level=_str(values, "log_level", defaults.log_level) or "info",
            chunk_size=int(_num(values, "chunk_size", defaults.chunk_size)),
            progress_interval=_num(values, "progress_interval", defaults.progress_interval),
            progress_log_interval=_num(values, "progress_log_interval",
                                       defaults.progress_log_interval),
            shutdown_timeout=_num(values, "shutdown_timeout", defaults.shutdown_timeout),
            listener_ping=_num(values, "listener_ping", defaults.listener_ping),
            lease_timeout=_num(values, "lease_timeout", defaults.lease_timeout),
            metrics_port=_port(values, "metrics_port"),
            metrics_host=_str(values, "metrics_host", defaults.metrics_host) or "",
            status_interval=_num(values, "status_interval", defaults.status_interval),
            keep_page_cache=_bool(values, "keep_page_cache", defaults.keep_page_cache),
        ).validate()


def _with_password(dsn: str | None, path: Path) -> tuple[str, str]:
    """The DSN with the password read from `path` (its first line), and the password.

    The file is what systemd's LoadCredential= (or a container secret) provides, so that
    the password is in no environment variable and no world-readable file.
    """
    if not dsn:
        raise ConfigError("dsn_password_file needs a DSN (ASYNCSAT_DSN or --dsn)")
    parts = urlsplit(dsn)
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ConfigError("the DSN already holds a password: give it there or in "
                          "dsn_password_file, not both")
    try:
        with path.open(encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the DSN password file {path}: {reason}") from None
    if not password:
        raise ConfigError(f"the DSN password file {path} is empty")
    # appended, not rebuilt with urlunsplit, which drops the // of `postgresql:///db?host=`
    return f"{dsn}{'&' if '?' in dsn else '?'}password={quote(password, safe='')}", password


def _str(values: Mapping[str, object], key: str, default: str | None) -> str | None:
    value = values.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"setting {key} must be a string")
    return value


def _path(values: Mapping[str, object], key: str) -> Path | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str | Path):
        raise ConfigError(f"setting {key} must be a path")
    return Path(value).expanduser().absolute()


def _num(values: Mapping[str, object], key: str, default: float) -> float:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value):
        raise ConfigError(f"setting {key} must be a number")
    return float(value)


def _bool(values: Mapping[str, object], key: str, default: bool) -> bool:
    value = values.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"setting {key} must be true or false")
    return value


def _port(values: Mapping[str, object], key: str) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"setting {key} must be a whole number (a TCP port)")
    return value


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid config file {path}: {exc}") from None
    section = data.get("asyncsat", data)
    if not isinstance(section, dict):
        raise ConfigError(f"invalid config file {path}: [asyncsat] must be a table")
    known = set(Settings.__dataclass_fields__) - {"dsn_password"} | {"dsn_password_file"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown setting in {path}: {', '.join(unknown)}")
    return dict(section)
