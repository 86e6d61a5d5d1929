"""Object-store requests: retried, timed and counted.

Every request :class:`~optimizr.storage.objectstore.ObjectStorage` makes goes through
:meth:`RequestRunner.call`. obstore's own retry is turned off (``max_retries=0``), so
every retry is made, and counted, here:

* **Transient** failures are retried: 429 and 503 (``throttled``: S3 answers
  SlowDown with 503), any other 5xx (``server_error``), a refused, reset or dropped
  connection (``connection``), and a request cut by the request or connect timeout
  (``timeout``). Nothing else is: a missing key, a refusal (401, 403), a lost
  precondition (409, 412) are answers, and asking again would get the same one.
* Backoff is exponential with full jitter (a delay drawn uniformly from zero to
  ``initial * 2**retry``, capped), so that many I/O threads throttled at once do not
  come back in step. A call gives up after ``max_retries`` retries, or when the next
  delay would end past ``retry_timeout`` seconds after its first attempt.
* Giving up on a transient failure is ``OSError(EIO)`` naming the key and the cause
  in words; obstore's own message is never passed on (it holds request URLs).

"A request" here is one attempt of one store call. A delimited listing of more than
1,000 keys follows its continuation pages inside one call, and a multipart upload's
parts are inside one put, so those count once per attempt however many HTTP requests
they take.
"""

from __future__ import annotations

import errno
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotModifiedError,
    PreconditionError,
)

T = TypeVar("T")

#: Upper bounds, in seconds, of the request latency histogram: from a LAN HEAD
#: (a few ms) to a large GET over a slow link near the request timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Why a request was retried; the ``cause`` label of optimizr_storage_retries_total.
CAUSES = ("throttled", "server_error", "connection", "timeout")
#: The longest backoff between two attempts, however many retries came before.
MAX_BACKOFF = 15.0

_STATUS = re.compile(r"status code: ([1-5]\d\d)|status: ([1-5]\d\d),")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_THROTTLE_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded")


def transient_cause(exc: BaseException) -> str | None:
    """The cause (one of CAUSES) if ``exc`` is a failure worth another attempt, else None.

    obstore raises GenericError for all of them; what happened is only in its text
    (the HTTP status, or the HTTP client's error kind), as seen by provoking each
    fault through tests/faultproxy.py."""
    if not isinstance(exc, BaseError) or isinstance(
        exc, AlreadyExistsError | PreconditionError | NotModifiedError
    ):
        return None  # not-found is a FileNotFoundError, never a BaseError
    text = str(exc)
    status = _STATUS.search(text)
    if status:
        code = int(status.group(1) or status.group(2))
        if code in (429, 503) or any(f"<Code>{c}</Code>" in text for c in _THROTTLE_CODES):
            return "throttled"
        if code == 408 or "<Code>RequestTimeout</Code>" in text:
            return "timeout"  # S3's 400 RequestTimeout: the server tired of a slow upload
        return "server_error" if code >= 500 else None
    kind = _HTTP_KIND.search(text)
    if (kind and kind.group(1) == "Timeout") or "TimedOut" in text or "timed out" in text:
        return "timeout"
    if kind and kind.group(1) in ("Connect", "Request", "Interrupted", "Decode"):
        return "connection"
    lowered = text.lower()
    if "connection reset" in lowered or "connection refused" in lowered:
        return "connection"
    return None


def may_have_landed(exc: BaseException) -> bool:
    """Could the request that failed with ``exc`` have been carried out all the same?

    A refused connection or a throttling answer says it was not; a timeout, a reset
    after sending, or a 500 leaves it unknown. A conditional write retried after
    such a failure may then find its own first attempt in the way."""
    cause = transient_cause(exc)
    if cause in (None, "throttled"):
        return False
    return not (cause == "connection" and _never_connected(str(exc)))


def _never_connected(text: str) -> bool:
    # The HTTP client's kind "Connect": no connection was made (refused, no route,
    # no such host), so nothing was sent. Matched as a whole word: the reset of an
    # open connection reads "kind: ConnectionReset" further down the same text.
    kind = _HTTP_KIND.search(text)
    return (kind is not None and kind.group(1) == "Connect") or "ConnectionRefused" in text


def describe_cause(exc: BaseException) -> str | None:
    """A transient failure in words, for an error message (None if it is not one)."""
    cause = transient_cause(exc)
    if cause == "connection":
        if _never_connected(str(exc)):
            return "the endpoint is unreachable"
        return "the connection was reset or closed"
    if cause == "timeout":
        return "the request timed out"
    if cause == "throttled":
        return "throttled by the server"
    if cause == "server_error":
        status = _STATUS.search(str(exc))
        assert status is not None
        return f"server error (HTTP {status.group(1) or status.group(2)})"
    return None


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 10
    #: Seconds from a call's first attempt after which no retry starts.
    retry_timeout: float = 180.0
    #: The first retry's backoff is drawn from [0, initial_backoff] seconds.
    initial_backoff: float = 0.1
    max_backoff: float = MAX_BACKOFF

    def backoff(self, retry: int) -> float:
        """The delay before retry number ``retry`` (0 for the first): full jitter."""
        ceiling = min(self.max_backoff, self.initial_backoff * 2.0**retry)
        return random.uniform(0.0, ceiling)


@dataclass(frozen=True)
class LatencyHistogram:
    """Seconds per request attempt: how many fell at or under each bound."""

    #: Per bucket, not cumulative: ``counts[i]`` are the requests in
    #: (bounds[i-1], bounds[i]]; the last one, those above every bound.
    counts: tuple[int, ...]
    sum: float
    bounds: tuple[float, ...] = LATENCY_BUCKETS

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, requests at or under it) pairs ending with +Inf, as
        Prometheus histograms have them."""
        pairs, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": round(self.sum, 6),
            "buckets": {_bound_name(b): n for b, n in self.cumulative()},
        }


def _bound_name(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


@dataclass(frozen=True)
class StorageStatistics:
    """What one store's requests did, at one instant (``ObjectStorage.statistics()``)."""

    #: The store as ``describe()`` names it (a URL without credentials).
    store: str
    #: Request attempts by operation (head, get, put, list, delete, create, replace_if).
    requests: dict[str, int] = field(default_factory=dict)
    #: Retries by operation, then by cause (throttled, server_error, connection, timeout).
    retries: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Calls that ended in an error by operation: given up after retries, refused,
    #: or failed otherwise. A missing key or a lost precondition is an answer, not one.
    failures: dict[str, int] = field(default_factory=dict)
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_retries(self) -> int:
        return sum(n for causes in self.retries.values() for n in causes.values())

    def retries_by_cause(self) -> dict[str, int]:
        totals = dict.fromkeys(CAUSES, 0)
        for causes in self.retries.values():
            for cause, n in causes.items():
                totals[cause] += n
        return totals

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for summary.json."""
        return {
            "store": self.store,
            "requests": dict(self.requests),
            "retries": {op: dict(causes) for op, causes in self.retries.items()},
            "failures": dict(self.failures),
            "latency_seconds": {op: h.to_dict() for op, h in self.latency.items()},
        }


class RequestCounter:
    """Thread-safe tallies of one store's requests (many I/O threads call at once)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._retries: dict[str, dict[str, int]] = {}
        self._failures: dict[str, int] = {}
        self._buckets: dict[str, list[int]] = {}
        self._seconds: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        """One attempt of ``op`` that took ``seconds``, whatever its outcome."""
        index = next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        with self._lock:
            self._requests[op] = self._requests.get(op, 0) + 1
            buckets = self._buckets.setdefault(op, [0] * (len(self.bounds) + 1))
            buckets[index] += 1
            self._seconds[op] = self._seconds.get(op, 0.0) + seconds

    def retried(self, op: str, cause: str) -> None:
        with self._lock:
            causes = self._retries.setdefault(op, {})
            causes[cause] = causes.get(cause, 0) + 1

    def failed(self, op: str) -> None:
        with self._lock:
            self._failures[op] = self._failures.get(op, 0) + 1

    def snapshot(self, store: str) -> StorageStatistics:
        with self._lock:
            return StorageStatistics(
                store=store,
                requests=dict(self._requests),
                retries={op: dict(causes) for op, causes in self._retries.items()},
                failures=dict(self._failures),
                latency={
                    op: LatencyHistogram(tuple(b), self._seconds[op], self.bounds)
                    for op, b in self._buckets.items()
                },
            )


@dataclass
class Outcome:
    """Filled in by :meth:`RequestRunner.call`: did an attempt fail in a way that
    leaves unknown whether the store carried it out?"""

    uncertain: bool = False


#: What a giving-up message says each operation was trying to do.
ACTIONS = {
    "head": "stat",
    "get": "read",
    "put": "write",
    "create": "write",
    "replace_if": "write",
    "list": "list",
    "delete": "delete",
}


class RequestRunner:
    """Runs store calls under a :class:`RetryPolicy`, counting into a RequestCounter."""

    def __init__(
        self,
        policy: RetryPolicy,
        counter: RequestCounter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self.counter = counter or RequestCounter()
        self.clock = clock
        self.sleep = sleep

    def call(self, op: str, key: str, fn: Callable[[], T], outcome: Outcome | None = None) -> T:
        """``fn()``, retried while it fails transiently; see the module docstring.

        Raises what ``fn`` raised for a failure that is not transient, and
        OSError(EIO) naming ``key`` once a transient one is given up on."""
        first = self.clock()
        retries = 0
        while True:
            started = self.clock()
            try:
                result = fn()
            except Exception as exc:  # not KeyboardInterrupt: a stop is no failure
                self.counter.observe(op, self.clock() - started)
                cause = transient_cause(exc)
                if cause is None:
                    if not _is_answer(exc):
                        self.counter.failed(op)
                    raise
                if outcome is not None and may_have_landed(exc):
                    outcome.uncertain = True
                delay = self.policy.backoff(retries)
                if (
                    retries >= self.policy.max_retries
                    or self.clock() - first + delay > self.policy.retry_timeout
                ):
                    self.counter.failed(op)
                    raise _gave_up(exc, op, key, retries) from None
                self.counter.retried(op, cause)
                retries += 1
                self.sleep(delay)
                continue
            self.counter.observe(op, self.clock() - started)
            return result


def _is_answer(exc: BaseException) -> bool:
    return isinstance(
        exc, FileNotFoundError | AlreadyExistsError | PreconditionError | NotModifiedError
    )


def _gave_up(exc: BaseException, op: str, key: str, retries: int) -> OSError:
    cause = describe_cause(exc)
    tries = f" (gave up after {retries} retries)" if retries else ""
    message = f"cannot {ACTIONS.get(op, op)} {key}: {cause}{tries}"
    return OSError(errno.EIO, message, key)
