"""The command line: parse, build Settings, call the daemon or one database command.

Exit codes: 0 success, 2 bad usage or input (one line on stderr, nothing written),
1 any other failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, get_args

import uvloop

from asyncsat import __version__, warmup
from asyncsat.config import LOG_FORMATS, LOG_LEVELS, Settings
from asyncsat.errors import AsyncsatError, UsageError
from asyncsat.logs import Redactor, configure
from asyncsat.models import PROTOCOLS, Status
from asyncsat.presets import PRESETS
from asyncsat.render import STATUS_PAGE


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


BIGINT_MAX = 2**63 - 1
"""The largest id or count the database holds (bigint); a larger one is bad input."""
INT_MAX = 2**31 - 1
"""The largest `integer` column value (credential.max_connections)."""


def _positive(text: str, most: int = BIGINT_MAX) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most}, got {text}")
    return value


def _connections(text: str) -> int:
    return _positive(text, INT_MAX)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port (1-65535): {value}")
    return value


def _ids(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a download id: {text!r}") from None
    if not 1 <= value <= BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"not a download id: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asyncsat", description="Massive, resumable satellite data downloads "
                "tracked in PostgreSQL.")
    p.add_argument("--version", action="version", version=f"asyncsat {__version__}")
    p.add_argument("--dsn", help="PostgreSQL DSN (default: ASYNCSAT_DSN, else embedded server)")
    p.add_argument("--home", help="state directory (default: ASYNCSAT_HOME, else "
                   "~/.local/share/asyncsat)")
    p.add_argument("--log-format", choices=LOG_FORMATS)
    p.add_argument("--log-level", choices=LOG_LEVELS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("init", help="create or upgrade the schema")

    prov = sub.add_parser("provider", help="manage providers").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    padd = prov.add_parser("add", help="add a provider")
    padd.add_argument("name")
    padd.add_argument("--protocol", choices=PROTOCOLS)
    padd.add_argument("--preset", choices=sorted(PRESETS),
                      help="a known service: fills protocol, URL and settings")
    padd.add_argument("--url")
    padd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pset = prov.add_parser("set", help="change a provider's URL or settings (running "
                           "daemons apply them at once)")
    pset.add_argument("name")
    pset.add_argument("--url", help="the new base URL (downloads queued already keep theirs)")
    pset.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pset.add_argument("--unset", action="append", default=[], metavar="KEY",
                      help="back to the setting's default")
    prov.add_parser("list", help="list providers").add_argument("--json", action="store_true")
    prov.add_parser("pause", help="start no new transfer of this provider (running ones "
                    "finish)").add_argument("name")
    prov.add_parser("resume", help="let a paused provider's downloads start again"
                    ).add_argument("name")
    prem = prov.add_parser("remove", help="remove a provider, its credentials and its "
                           "download rows (files are kept)")
    prem.add_argument("name")
    prem.add_argument("--force", action="store_true",
                      help="even with unfinished downloads (they are cancelled)")

    cred = sub.add_parser("credential", help="manage credentials").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    cadd = cred.add_parser("add", help="add (or update) an account of a provider")
    cadd.add_argument("provider")
    cadd.add_argument("--user", required=True)
    secret = cadd.add_mutually_exclusive_group(required=True)
    secret.add_argument("--password-env", metavar="VAR")
    secret.add_argument("--password-file", metavar="PATH")
    secret.add_argument("--password-stdin", action="store_true")
    secret.add_argument("--password-ref", metavar="env:NAME|file:PATH",
                        help="keep the password out of the database: each daemon reads it "
                        "where it runs (a systemd credential, a container secret)")
    cadd.add_argument("--max-connections", type=_connections)
    cset = cred.add_parser("set", help="change an account's connections, or take it out of "
                           "use and back (its secret kept)")
    cset.add_argument("provider")
    cset.add_argument("--user", required=True)
    cset.add_argument("--max-connections", type=_connections)
    use = cset.add_mutually_exclusive_group()
    use.add_argument("--disable", dest="enabled", action="store_false", default=None,
                     help="no new transfer uses it (running ones finish)")
    use.add_argument("--enable", dest="enabled", action="store_true")
    cred.add_parser("list", help="list credentials").add_argument("--json", action="store_true")
    crem = cred.add_parser("remove", help="remove an account of a provider")
    crem.add_argument("provider")
    crem.add_argument("--user", required=True)

    get = sub.add_parser("get", help="queue URLs for download")
    get.add_argument("urls", nargs="+", metavar="URL")
    get.add_argument("--provider")
    get.add_argument("--dest")
    get.add_argument("--checksum", metavar="ALGO:HEX")
    get.add_argument("--wait", action="store_true",
                     help="download now (or wait for the daemon); exit 0 only if all are done")

    search = sub.add_parser("search", help="search a provider's catalog")
    search.add_argument("provider")
    search.add_argument("--collection", required=True)
    search.add_argument("--start")
    search.add_argument("--end")
    area = search.add_mutually_exclusive_group()
    area.add_argument("--bbox")
    area.add_argument("--wkt")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--limit", type=_positive)
    search.add_argument("--dest")
    search.add_argument("--follow", action="store_true",
                        help="a standing request: search again every follow_interval and "
                        "queue new products, until cancel --request")
    search.add_argument("--wait", action="store_true",
                        help="download now (or wait for the daemon); exit 0 only if all are done")

    status = sub.add_parser("status", help="show downloads")
    status.add_argument("--json", action="store_true")
    status.add_argument("--request", type=_ids)
    status.add_argument("--watch", action="store_true")
    status.add_argument("--requests", action="store_true",
                        help="list requests (searches, URL lists) with their progress")
    status.add_argument("--status", action="append", choices=get_args(Status),
                        help="only downloads in this status (repeatable)")
    status.add_argument("--limit", type=_positive,
                        help="only the N newest downloads (a page: without --json, "
                        f"{STATUS_PAGE} unless given)")
    status.add_argument("--before", type=_ids, metavar="ID",
                        help="only downloads older than download ID (the next page)")

    retry = sub.add_parser("retry", help="queue failed downloads again")
    retry.add_argument("ids", nargs="*", type=_ids, default=[], metavar="ID")
    retry.add_argument("--failed", action="store_true", help="every failed download")

    cancel = sub.add_parser("cancel", help="cancel downloads, or a request")
    cancel.add_argument("ids", nargs="*", type=_ids, default=[], metavar="ID")
    cancel.add_argument("--request", type=_ids, metavar="ID",
                        help="cancel a request (a standing one stops) and its downloads")

    sub.add_parser("check", help="exit 0 when the database answers and a daemon serves it")

    db = sub.add_parser("db", help="the database this command line uses").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    db.add_parser("dsn", help="print the DSN to use with psql (never its password)")
    dbpsql = db.add_parser("psql", help="run psql on the database (arguments after -- go "
                           "to psql)")
    dbpsql.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="ARG")
    db.add_parser("stop", help="stop the embedded PostgreSQL server")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--exit-when-idle", action="store_true")
    run.add_argument("--metrics-port", type=_port, metavar="PORT",
                     help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics "
                     "(config metrics_host for another address)")
    return p


def run() -> NoReturn:
    """The `asyncsat` program: `main()`, then the exit, without the interpreter's teardown
    of every module and object (50 ms of CPU after a `get --wait`, measured with strace:
    a command that downloads one small file took 0.37 s, now 0.28). Nothing is left to it:
    transfers are synced and recorded, the pool closed, the worker threads joined
    (asyncio.run); the atexit handlers still run (the embedded server's list of the
    processes using it) and the output is flushed."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # output lost (a full disk): not a success, as CPython's own exit
            code = code or 120
        except ValueError:  # (closed)
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    redactor = Redactor()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run" or getattr(args, "wait", False):  # (transfers, here)
            warmup.start()
        settings = Settings.from_env(os.environ, tty=sys.stdout.isatty(), dsn=args.dsn,
                                     home=args.home, log_format=args.log_format,
                                     log_level=args.log_level)
        redactor.add_dsn(settings.dsn)
        redactor.add_login(None, settings.dsn_password)
        configure(redactor, fmt=settings.log_format, level=settings.log_level)
        return uvloop.run(_dispatch(args, settings, redactor))
    except UsageError as exc:
        _fail(redactor, exc.message)
        return 2
    except AsyncsatError as exc:
        _fail(redactor, exc.message)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `asyncsat status | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # (as a shell reports a process ended by SIGPIPE)
    except Exception as exc:  # the contract: one clear line, exit code 1, never a traceback
        hint = _OLD_SCHEMA_HINT if getattr(exc, "sqlstate", None) in _OLD_SCHEMA else ""
        _fail(redactor, f"{type(exc).__name__}: {exc}{hint}")
        return 1


# undefined table, column, function: what a database of an earlier release lacks when
# `asyncsat init` was not run after the upgrade
_OLD_SCHEMA = frozenset({"42P01", "42703", "42883"})
_OLD_SCHEMA_HINT = (" (the database may have the schema of an earlier asyncsat release:"
                    " `asyncsat init` upgrades it)")


def _fail(redactor: Redactor, message: str) -> None:
    line = " ".join(redactor(message).split())
    print(f"asyncsat: error: {line}", file=sys.stderr)


async def _dispatch(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    from asyncsat import commands  # imports the database layer only when needed

    command = args.command if not hasattr(args, "action") else f"{args.command}_{args.action}"
    handler = getattr(commands, command)
    result: int = await handler(args, settings, redactor)
    return result


if __name__ == "__main__":  # `python -m asyncsat.cli`: main() with CPython's own exit (for
    sys.exit(main())  # tools that act at exit, as cProfile, which `run()` would skip)
