"""The retry policy: a pure function of (error, failures so far, progress made).

Tenacity's wait strategy computes the backoff; the attempt counts live in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tenacity import RetryCallState, Retrying, wait_exponential, wait_random

from asyncsat.errors import (
    AuthError,
    DiskFullError,
    OfflineError,
    RetryableError,
    TransferError,
    VerificationError,
)
from asyncsat.models import Provider

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_MAX = 60.0
STRICT_RETRIES = 2  # attempts allowed for refused logins


@dataclass(frozen=True)
class Policy:
    """Per-provider retry settings (provider settings max_attempts, backoff_initial/max)."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX

    @classmethod
    def for_provider(cls, provider: Provider) -> Policy:
        s = provider.settings

        def num(key: str, default: float) -> float:
            value = s.get(key, default)
            return float(value) if isinstance(value, int | float) and value > 0 else default

        return cls(
            max_attempts=int(num("max_attempts", DEFAULT_MAX_ATTEMPTS)),
            backoff_initial=num("backoff_initial", DEFAULT_BACKOFF_INITIAL),
            backoff_max=num("backoff_max", DEFAULT_BACKOFF_MAX),
        )


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt."""

    action: Literal["retry", "fail", "offline"]
    failures: int
    delay: float = 0.0
    bad_at_source: bool = False
    """The same wrong bytes arrived twice: the provider's copy is bad, fetching again
    cannot help."""


def backoff(failures: int, policy: Policy) -> float:
    """Exponential backoff with jitter for the n-th consecutive failure (n >= 1)."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, failures)
    wait = wait_exponential(multiplier=policy.backoff_initial, max=policy.backoff_max) + \
        wait_random(0, policy.backoff_initial)
    return min(float(wait(state)), policy.backoff_max)


def decide(error: TransferError, failures: int, progressed: bool, policy: Policy, *,
           repeated: bool = False, tries: int = 1) -> Decision:
    """Retry, fail or park as offline, given the consecutive failures before this attempt.

    An attempt that moved the file forward before the connection broke resets the count: a
    flaky connection that keeps delivering bytes never exhausts the budget. A file that
    arrived whole but failed verification is no progress; the same wrong file twice
    (`repeated`: the same digest, the same wrong size) is bad at the source and fails at
    once. Throttling (429 and the like) never counts. Nor does a full destination disk, but
    its wait grows with the row's `tries` (its attempts so far) up to `backoff_max`: each
    try is a request to the provider, and a disk may stay full for hours.
    """
    if isinstance(error, OfflineError):
        return Decision("offline", failures)
    if not isinstance(error, RetryableError):
        return Decision("fail", failures + 1)
    if isinstance(error, VerificationError) and repeated:
        return Decision("fail", failures + 1, bad_at_source=True)
    if isinstance(error, AuthError):
        n = failures + 1
        return Decision("fail", n) if n >= STRICT_RETRIES else \
            Decision("retry", n, _delay(error, n, policy))
    if isinstance(error, DiskFullError):
        return Decision("retry", failures, _delay(error, max(1, tries), policy))
    if error.throttled:
        return Decision("retry", failures, _delay(error, max(1, failures + 1), policy))
    n = 0 if progressed and not isinstance(error, VerificationError) else failures + 1
    if n >= policy.max_attempts:
        return Decision("fail", n)
    return Decision("retry", n, _delay(error, max(1, n), policy))


def _delay(error: RetryableError, n: int, policy: Policy) -> float:
    wait = backoff(n, policy)
    if error.retry_after is not None:
        wait = max(wait, error.retry_after)
    return wait


DEFAULT_FOLLOW_INTERVAL = 900.0
DEFAULT_FOLLOW_OVERLAP = 86400.0
DEFAULT_OFFLINE_INTERVAL = 60.0
MAX_OFFLINE_INTERVAL = 1800.0


@dataclass(frozen=True)
class Follow:
    """When standing requests run and offline products are looked at (provider settings)."""

    interval: float = DEFAULT_FOLLOW_INTERVAL
    """`follow_interval`: seconds between two runs of a standing request."""
    overlap: float = DEFAULT_FOLLOW_OVERLAP
    """`follow_overlap`: how far before its watermark a run searches again, for products
    the catalog indexed late."""
    offline_interval: float = DEFAULT_OFFLINE_INTERVAL
    """`offline_interval`: seconds before an offline product is first looked at again."""


def follow_settings(provider: Provider) -> Follow:
    s = provider.settings

    def num(key: str, default: float) -> float:
        value = s.get(key, default)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            and value > 0 else default

    return Follow(interval=num("follow_interval", DEFAULT_FOLLOW_INTERVAL),
                  overlap=num("follow_overlap", DEFAULT_FOLLOW_OVERLAP),
                  offline_interval=num("offline_interval", DEFAULT_OFFLINE_INTERVAL))


def offline_delay(checks: int, follow: Follow, retry_after: float | None = None) -> float:
    """Seconds before an offline product is looked at again, after `checks` earlier looks:
    `offline_interval`, doubling each time, up to 30 minutes (or what the server asks)."""
    first = min(follow.offline_interval, MAX_OFFLINE_INTERVAL)
    delay = min(first * float(2 ** min(checks, 16)), max(first, MAX_OFFLINE_INTERVAL))
    return max(delay, retry_after) if retry_after is not None else delay


def budget(decision: Decision, error: TransferError, progressed: bool, policy: Policy) -> str:
    """What an attempt that failed did to the retry budget, in words (for the log line)."""
    if decision.action == "offline":
        return "not used: the product is offline"
    if not isinstance(error, RetryableError):
        return "not retried: a permanent error"
    if decision.bad_at_source:
        return "not retried: the same wrong file twice, bad at the source"
    if isinstance(error, AuthError):
        return f"{decision.failures} of {STRICT_RETRIES} tries for a refused login"
    if isinstance(error, DiskFullError):
        return "not used: no space left on the destination, waited out"
    if error.throttled:
        return "not used: the server limits requests or connections"
    if progressed and decision.failures == 0:
        return "not used: the attempt moved the file forward"
    return f"{decision.failures} of {policy.max_attempts} attempts in a row without progress"
