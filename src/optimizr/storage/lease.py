"""One run per remote DEST: a lease on the object ``DEST/.optimizr/lock``.

A bucket has no flock, and nothing drops a lock when the process that holds it
dies, so the lock object carries a lease: the holder rewrites it every ttl/3
(a compare-and-swap on its ETag), and a run that finds it not rewritten for
longer than its ttl may take it over, so a run killed with -9 (or a machine
that lost power) leaves DEST locked for a minute, not for ever.

Every write of the lock is conditional, decided by the store itself: the first
with If-None-Match (:meth:`ObjectStorage.create`), every later one with
If-Match on the ETag last seen (:meth:`ObjectStorage.replace_if`). So of
several runs that start at once, or that race to take over one expired lease,
exactly one wins; and a holder whose lease was taken over learns it from its
next renewal, the one that fails.

**When is a lease expired?** Decided on the store's clock alone. Each write
of the lock makes the server stamp it with Last-Modified; to learn the
server's "now", a taker writes a tiny probe object and reads the stamp the
server gave it. The lease's age is the difference of two stamps of one clock,
so clock skew between the machines of the holder and of the taker plays no
part: a taker whose clock runs an hour fast still sees a lease renewed a
second ago as a second old (a test holds it to this). The holder's own
timestamps in the object (``started``, ``renewed``) are for people only.
Taking the holder's timestamps with a skew margin instead would be one
request cheaper, but a margin only guesses at the skew, and a wrong guess
lets two runs write into one DEST. ``margin`` covers what is left: Last-
Modified has a resolution of one second on S3, and a request's latency.

The holder, for its part, counts its lease from the moment it *sent* its
last successful renewal (on its own monotonic clock): the server stamped
that write later, so the holder always gives up (``on_lost``) at least
``margin`` before any taker may judge the lease expired.

Every record the lease writes differs from the one before (a renewal
counter): S3's ETag is the MD5 of the content, and a rewrite of identical
bytes would keep the ETag and defeat the compare-and-swap.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from optimizr.errors import DestBusy
from optimizr.lock import LOCK_NAME
from optimizr.storage.base import STATE_DIR
from optimizr.storage.objectstore import ObjectStorage

logger = logging.getLogger(__name__)

#: The lock object's key under DEST.
LOCK_KEY = f"{STATE_DIR}/{LOCK_NAME}"
#: Seconds a lease lasts without a renewal.
DEFAULT_TTL = 60.0
#: Seconds added to the ttl before a taker may take an unrenewed lease over.
DEFAULT_MARGIN = 5.0
#: How many times acquire looks again at a lock that changed under it.
ACQUIRE_ATTEMPTS = 5

T = TypeVar("T")


@dataclass(frozen=True)
class LeaseRecord:
    """The content of the lock object (JSON)."""

    holder: str  # a random token: the one identity that counts
    host: str
    pid: int
    started: float  # the holder's wall clock: for people only
    renewed: float
    ttl: float
    renewal: int = 0  # makes every write's content, so its ETag, new

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord | None:
        try:
            value = json.loads(data)
            return cls(
                holder=str(value["holder"]),
                host=str(value["host"]),
                pid=int(value["pid"]),
                started=float(value["started"]),
                renewed=float(value["renewed"]),
                ttl=float(value["ttl"]),
                renewal=int(value.get("renewal", 0)),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # not a record of ours: judged by its age alone


@dataclass(frozen=True)
class LeaseState:
    """The lock object as one look at it found it."""

    etag: str | None
    #: None when the object is not a lease record optimizr can read.
    record: LeaseRecord | None
    #: Seconds since the lock was last written, on the store's clock.
    age: float
    #: Seconds until a taker may take it over; <= 0: it has expired.
    expires_in: float

    @property
    def expired(self) -> bool:
        return self.expires_in <= 0


@dataclass(frozen=True)
class LeaseStatistics:
    held: bool
    renewals: int
    renew_failures: int
    #: 1 when this lease was acquired by taking over an expired one.
    takeovers: int
    #: Why the lease was lost while held (taken over, deleted, not renewable), or None.
    lost: str | None
    #: Why release could not remove the lock (it then expires by itself), or None.
    release_error: str | None


def read_lease(
    storage: ObjectStorage,
    *,
    margin: float = DEFAULT_MARGIN,
    default_ttl: float = DEFAULT_TTL,
    now: float | None = None,
) -> LeaseState | None:
    """The lock of ``storage`` (a DEST) as it stands, or None when there is none.

    ``now``: the time to judge its age against. By default the store's own clock,
    read by writing and deleting a probe object under ``.optimizr/`` (see the module
    docstring); a reader that may not write (``optimizr status`` with read-only
    credentials) may pass ``time.time()``, and then the age shown is off by the
    skew between this machine and the store."""
    for _ in range(ACQUIRE_ATTEMPTS):
        head = storage.stat(LOCK_KEY)
        if head is None:
            return None
        try:
            obj = storage.read_object(LOCK_KEY)
        except FileNotFoundError:
            return None
        if obj.etag != head.etag:
            continue  # rewritten between the HEAD and the GET: its stamp is not this one's
        record = LeaseRecord.from_json(obj.data)
        ttl = record.ttl if record is not None else default_ttl
        age = (server_now(storage) if now is None else now) - head.mtime_ns / 1e9
        return LeaseState(obj.etag, record, age, ttl + margin - age)
    # Rewritten at every look: whoever does that is alive.
    record = LeaseRecord.from_json(obj.data)
    ttl = record.ttl if record is not None else default_ttl
    return LeaseState(obj.etag, record, 0.0, ttl + margin)


def server_now(storage: ObjectStorage) -> float:
    """The store's clock now (seconds since the epoch): the Last-Modified it stamps
    on a probe object written for the purpose."""
    key = f"{STATE_DIR}/{LOCK_NAME}.clock-{secrets.token_hex(8)}"
    storage.write_atomic(key, b"")
    try:
        stamped = storage.stat(key)
    finally:
        storage.delete(key)
    if stamped is None:
        raise FileNotFoundError(2, "the clock probe vanished as it was written", key)
    return stamped.mtime_ns / 1e9


def describe_lease(state: LeaseState) -> str:
    """Who holds the lock and until when, for a message or ``optimizr status``."""
    expires = _clock(time.time() + state.expires_in)
    record = state.record
    if record is None:
        return f"holder unknown (not an optimizr lease record), written {state.age:.0f} s ago"
    lease = (
        f"lease expired {-state.expires_in:.0f} s ago"
        if state.expired
        else f"lease renewed {max(state.age, 0):.0f} s ago, expires {expires} unless renewed"
    )
    return f"pid {record.pid} on {record.host}, since {_clock(record.started)}, {lease}"


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


class RemoteLease:
    """DEST's lock on an object store, held by a lease renewed in a daemon thread.

    ``acquire()`` (or ``with``) before the run writes anything into DEST; raises
    :class:`DestBusy` naming the holder when another live run holds it.
    ``release()`` when the run ends, however it ends. If the lease is lost
    meanwhile (another run took it over after a renewal failed to land for a whole
    ttl, or it could not be renewed in time), ``on_lost(reason)`` is called once,
    from the renewal thread (keep it short: set a flag, signal the run to stop),
    and :attr:`lost` says why.

    The storage's own request retries should end well inside ``ttl / 3`` (e.g.
    ``StoreOptions(retry_timeout=...)``): a renewal that has not answered by the
    time the lease would run out counts as failed either way, but a ``release``
    whose DELETE is still being retried past the ttl could remove a lock that
    another run has taken over by then.
    """

    def __init__(
        self,
        storage: ObjectStorage,
        *,
        ttl: float = DEFAULT_TTL,
        margin: float = DEFAULT_MARGIN,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if ttl <= 0 or margin < 0:
            raise ValueError(f"lease ttl must be > 0 and margin >= 0 (got {ttl}, {margin})")
        self.storage = storage
        self.ttl = ttl
        self.margin = margin
        self.on_lost = on_lost
        self.holder = secrets.token_hex(16)
        self._record: LeaseRecord | None = None
        self._etag: str | None = None
        self._valid_until = 0.0  # time.monotonic() at which our lease runs out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # _etag/_record/counters: renewer vs release
        self._renewals = 0
        self._renew_failures = 0
        self._takeovers = 0
        self._lost: str | None = None
        self._release_error: str | None = None

    @property
    def lost(self) -> str | None:
        """Why the lease was lost while held, or None."""
        return self._lost

    def acquire(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this lease is already held")
        where = self.storage.describe()
        for _ in range(ACQUIRE_ATTEMPTS):
            begun = time.monotonic()
            record = self._new_record()
            try:
                etag = self.storage.create(LOCK_KEY, record.to_json())
            except FileExistsError:
                pass
            else:
                self._hold(record, etag, begun)
                return
            state = read_lease(self.storage, margin=self.margin, default_ttl=self.ttl)
            if state is None or state.etag is None:
                continue  # released meanwhile: create it again
            if not state.expired:
                raise DestBusy(
                    f"another optimizr run is converting into {where} "
                    f"({describe_lease(state)}); wait for it to finish or stop it first. "
                    f"A run that was killed holds it only until its lease expires: "
                    f"then the next run takes it over"
                )
            begun = time.monotonic()
            try:
                etag = self.storage.replace_if(LOCK_KEY, record.to_json(), state.etag)
            except (FileExistsError, FileNotFoundError):
                continue  # another taker won the race, or the holder released: look again
            logger.warning("took over the expired lock of %s (%s)", where, describe_lease(state))
            self._takeovers += 1
            self._hold(record, etag, begun)
            return
        raise DestBusy(
            f"the lock of {where} changed {ACQUIRE_ATTEMPTS} times while this run tried to "
            "take it: other runs are starting on this DEST; let one of them finish first"
        )

    def release(self) -> None:
        """Stop renewing; delete the lock if it is still ours (never another run's).

        A failure to delete it is recorded (``statistics().release_error``) and
        logged, not raised: the lock then expires by itself after its ttl."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(self.ttl)
        self._thread = None
        try:
            self._delete_if_ours()
        except OSError as exc:
            self._release_error = exc.strerror or str(exc)
            logger.warning(
                "could not remove the lock of %s (%s): it expires by itself within %.0f s",
                self.storage.describe(),
                self._release_error,
                self.ttl + self.margin,
            )

    def __enter__(self) -> RemoteLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def statistics(self) -> LeaseStatistics:
        with self._mutex:
            return LeaseStatistics(
                held=self._thread is not None and self._lost is None,
                renewals=self._renewals,
                renew_failures=self._renew_failures,
                takeovers=self._takeovers,
                lost=self._lost,
                release_error=self._release_error,
            )

    # -- holding -----------------------------------------------------------------

    def _new_record(self) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(self.holder, socket.gethostname(), os.getpid(), now, now, self.ttl)

    def _hold(self, record: LeaseRecord, etag: str | None, begun: float) -> None:
        self._record, self._etag = record, etag
        self._valid_until = begun + self.ttl
        self._stop.clear()
        self._lost = None
        self._thread = threading.Thread(target=self._renew_loop, name="optimizr-lease", daemon=True)
        self._thread.start()

    def _next_record(self) -> LeaseRecord:
        assert self._record is not None
        previous = self._record
        return LeaseRecord(
            previous.holder,
            previous.host,
            previous.pid,
            previous.started,
            time.time(),
            previous.ttl,
            previous.renewal + 1,
        )

    def _renew_loop(self) -> None:
        interval = self.ttl / 3
        wait = interval
        while not self._stop.wait(wait):
            remaining = self._valid_until - time.monotonic()
            if remaining <= 0:
                self._lose(f"it could not be renewed within its ttl of {self.ttl:g} s")
                return
            try:
                lost = self._renew_once(remaining)
            except OSError as exc:
                # A transient failure (a timeout, a 503, a reset): try again, more
                # often than every ttl/3, while the lease still holds.
                with self._mutex:
                    self._renew_failures += 1
                logger.warning(
                    "renewing the lock of %s failed (%s); retrying",
                    self.storage.describe(),
                    exc.strerror or exc,
                )
                wait = min(interval / 4, max(self._valid_until - time.monotonic(), 0.0))
                continue
            if lost is not None:
                self._lose(lost)
                return
            wait = max(self._valid_until - self.ttl + interval - time.monotonic(), 0.0)

    def _renew_once(self, remaining: float) -> str | None:
        """One renewal; None when it landed (or must simply be tried again), else why
        the lease is lost. OSError when it failed for a reason that may pass."""
        begun = time.monotonic()
        record = self._next_record()
        etag = self._etag
        assert etag is not None
        try:
            new_etag = _within(remaining, self.storage.replace_if, LOCK_KEY, record.to_json(), etag)
        except (FileExistsError, FileNotFoundError):
            return self._recheck(remaining)
        with self._mutex:
            self._record, self._etag = record, new_etag
            self._valid_until = begun + self.ttl
            self._renewals += 1
        return None

    def _recheck(self, remaining: float) -> str | None:
        """The ETag is not ours any more: another run took the lock, it was deleted,
        or our own write landed but its answer was lost (the request was retried)."""
        current = _within(remaining, self._read_current)
        if current is None:
            return "its lock object was deleted"
        data, etag = current
        record = LeaseRecord.from_json(data)
        if record is not None and record.holder == self.holder:
            # Our own write: carry on from its ETag. The lease is not extended by
            # it (we do not know when the server stamped it): the next renewal,
            # now, does that.
            with self._mutex:
                self._etag, self._record = etag, record
            return None
        who = "" if record is None else f" by pid {record.pid} on {record.host}"
        return f"it was taken over{who}"

    def _read_current(self) -> tuple[bytes, str | None] | None:
        try:
            obj = self.storage.read_object(LOCK_KEY)
        except FileNotFoundError:
            return None
        return obj.data, obj.etag

    def _lose(self, reason: str) -> None:
        message = f"the lock of {self.storage.describe()} was lost: {reason}"
        with self._mutex:
            self._lost = message
        logger.warning("%s", message)
        if self.on_lost is not None:
            self.on_lost(message)

    def _delete_if_ours(self) -> None:
        """Refresh the lock by compare-and-swap, then delete it.

        S3 has no conditional DELETE. The refresh proves, at the server, that the
        lock is still ours, and restarts its lease: no taker may judge it expired
        for a whole ttl, well past the DELETE that follows at once."""
        for _ in range(ACQUIRE_ATTEMPTS):
            etag = self._etag
            if etag is None:
                return
            record = self._next_record()
            try:
                self._etag = self.storage.replace_if(LOCK_KEY, record.to_json(), etag)
                self._record = record
            except (FileExistsError, FileNotFoundError):
                current = self._read_current()
                if current is None:
                    return  # gone already
                found = LeaseRecord.from_json(current[0])
                if found is None or found.holder != self.holder:
                    return  # another run's now: not ours to delete
                self._etag, self._record = current[1], found
                continue
            self.storage.delete(LOCK_KEY)
            self._etag = None
            return
        raise OSError(11, "the lock kept changing while it was released", LOCK_KEY)


def _within(seconds: float, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``, or TimeoutError after ``seconds``.

    The store retries a request for longer than a lease may last; the renewer must
    not wait past its lease on one. The request is left running in its daemon
    thread: a renewal that lands late only makes the lock ours a little longer,
    and the next compare-and-swap sorts out which ETag is current."""
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, call(*args)))
        except BaseException as exc:  # handed to the waiting thread, raised there
            box.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name="optimizr-lease-request", daemon=True).start()
    if not done.wait(seconds):
        raise TimeoutError(110, f"no answer within {seconds:.1f} s", LOCK_KEY)
    ok, value = box[0]
    if not ok:
        raise value
    result: T = value
    return result
