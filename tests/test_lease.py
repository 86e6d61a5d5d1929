"""The lease on a remote DEST's lock object, one set of test bodies over two object
stores: a real SeaweedFS S3 server, and obstore's in-memory store (whose
conditional puts, If-None-Match and If-Match, behave as S3's do).

No test sleeps to win a race: each polls for the condition it waits on, with a
deadline far beyond what it needs. Leases are short (seconds) to keep the tests
short, and margins cover S3's one-second Last-Modified resolution."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from optimizr.errors import DestBusy
from optimizr.storage.lease import (
    LOCK_KEY,
    LeaseRecord,
    RemoteLease,
    describe_lease,
    read_lease,
)
from optimizr.storage.objectstore import ObjectStorage, storage_for
from optimizr.storage.urls import parse_location
from servers import SeaweedS3
from test_storage import s3_env, s3_options, s3_storage

BACKENDS = ["s3", "memory"]
PATIENCE = 120.0  # seconds: far beyond any wait here, even on a busy 2-core machine


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(params=BACKENDS)
def dest(request: pytest.FixtureRequest) -> Callable[[], ObjectStorage]:
    """A factory of storages over one fresh DEST: each call is another client (as
    another machine's run would have) of the same keys."""
    if request.param == "memory":
        first = storage_for(parse_location("memory://dest"))
        return lambda: ObjectStorage(first.store, first.location)
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    s3_env(request.getfixturevalue("monkeypatch"), server)
    url = s3_storage(server).location.url()
    return lambda: s3_storage_at(server, url)


def s3_storage_at(server: SeaweedS3, url: str) -> ObjectStorage:
    return storage_for(parse_location(url), s3_options(server))


@pytest.fixture
def leases() -> Iterator[list[RemoteLease]]:
    """Leases a test makes, released at the end whatever happened (their threads stop)."""
    made: list[RemoteLease] = []
    yield made
    for lease in made:
        lease.release()


def record_of(storage: ObjectStorage) -> LeaseRecord:
    record = LeaseRecord.from_json(storage.read_bytes(LOCK_KEY))
    assert record is not None
    return record


def left_behind(storage: ObjectStorage, *, ttl: float, clock_offset: float = 0.0) -> None:
    """The lock a run killed with -9 leaves: a record that nobody renews. The
    holder's clock may be off by ``clock_offset`` seconds."""
    now = time.time() + clock_offset
    record = LeaseRecord("killed-run", "elsewhere", 4242, now, now, ttl)
    storage.create(LOCK_KEY, record.to_json())


def test_a_second_acquire_is_refused_naming_the_holder(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    first = RemoteLease(dest(), ttl=30)
    leases.append(first)
    first.acquire()
    second = RemoteLease(dest(), ttl=30)
    with pytest.raises(DestBusy) as refused:
        second.acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message
    assert f"on {socket.gethostname()}," in message
    assert "since " in message and "expires " in message
    assert "wait for it to finish or stop it" in message
    assert refused.value.exit_code == 3
    assert record_of(dest()).holder == first.holder
    assert second.statistics().held is False


def test_release_deletes_the_lock_and_lets_another_take_it(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    with RemoteLease(dest(), ttl=30) as first:
        assert first.statistics().held
        assert read_lease(dest()) is not None
    assert dest().stat(LOCK_KEY) is None
    assert first.statistics().held is False and first.statistics().release_error is None
    second = RemoteLease(dest(), ttl=30)
    leases.append(second)
    second.acquire()  # no wait, no takeover: the lock was gone
    assert second.statistics().takeovers == 0
    assert record_of(dest()).holder == second.holder


def test_an_abandoned_lease_is_taken_over_only_after_it_expires(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    ttl, margin = 2.0, 1.0
    begun = time.monotonic()
    left_behind(dest(), ttl=ttl)
    taker = RemoteLease(dest(), ttl=30, margin=margin)
    leases.append(taker)
    refusals = 0

    def try_acquire() -> bool:
        nonlocal refusals
        try:
            taker.acquire()
        except DestBusy as exc:
            assert "pid 4242 on elsewhere" in str(exc)
            refusals += 1
            return False
        return True

    wait_for(try_acquire, "the abandoned lease to be taken over")
    # Never before ttl + margin (less one second: S3 stamps whole seconds).
    assert time.monotonic() - begun >= ttl + margin - 1.0
    assert taker.statistics().takeovers == 1
    assert record_of(dest()).holder == taker.holder


def test_a_run_killed_with_sigkill_is_taken_over(
    s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, leases: list[RemoteLease]
) -> None:
    s3_env(monkeypatch, s3_server)
    url = s3_storage(s3_server).location.url()
    script = (
        "import sys, time\n"
        "from optimizr.storage.lease import RemoteLease\n"
        "from optimizr.storage.objectstore import StoreOptions, storage_for\n"
        "from optimizr.storage.urls import parse_location\n"
        "options = StoreOptions(endpoint_url=sys.argv[2], region='us-east-1', s3_path_style=True)\n"
        "lease = RemoteLease(storage_for(parse_location(sys.argv[1]), options), ttl=2.0)\n"
        "lease.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, url, s3_server.endpoint], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"held\n"
        taker = RemoteLease(s3_storage_at(s3_server, url), ttl=30, margin=1.0)
        leases.append(taker)
        with pytest.raises(DestBusy, match=f"pid {child.pid} "):
            taker.acquire()  # alive and renewing: refused, naming it
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()

    def taken() -> bool:
        try:
            taker.acquire()
        except DestBusy:
            return False
        return True

    wait_for(taken, "the killed run's lease to be taken over")
    assert taker.statistics().takeovers == 1


def test_of_takers_racing_on_an_expired_lease_exactly_one_wins(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    left_behind(dest(), ttl=1.0)

    def expired() -> bool:
        state = read_lease(dest(), margin=0.5)
        return state is not None and state.expired

    wait_for(expired, "the lease to expire")
    takers = [RemoteLease(dest(), ttl=30, margin=0.5) for _ in range(6)]
    leases.extend(takers)
    barrier = threading.Barrier(len(takers))
    won: list[RemoteLease] = []
    refused: list[str] = []

    def take(lease: RemoteLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except DestBusy as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 5, refused
    assert record_of(dest()).holder == won[0].holder
    assert all(f"pid {os.getpid()}" in message for message in refused)


def test_renewal_keeps_a_live_lease_past_its_ttl(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    # Renewed every second; a taker would need it unrenewed for 5 s.
    ttl, margin = 3.0, 2.0
    holder = RemoteLease(dest(), ttl=ttl, margin=margin)
    leases.append(holder)
    begun = time.monotonic()
    holder.acquire()
    wait_for(
        lambda: time.monotonic() - begun > ttl + margin + 1.0 and holder.statistics().renewals >= 3,
        "the lease to outlive its ttl",
    )
    with pytest.raises(DestBusy):
        RemoteLease(dest(), ttl=ttl, margin=margin).acquire()
    stats = holder.statistics()
    assert stats.held and stats.lost is None and stats.renew_failures == 0
    assert record_of(dest()).holder == holder.holder
    assert record_of(dest()).renewal >= 3


@dataclass
class LostCalls:
    reasons: list[str] = field(default_factory=list)

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


def test_a_lease_taken_over_calls_on_lost_and_release_leaves_the_new_holders_lock(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    lost = LostCalls()
    holder = RemoteLease(dest(), ttl=1.5, on_lost=lost)
    leases.append(holder)
    holder.acquire()
    # Another run's takeover, as it lands in the store (a plain overwrite here: the
    # holder must find out from its next renewal, whoever wrote it).
    other = LeaseRecord("other-run", "otherhost", 777, time.time(), time.time(), 60)
    dest().write_atomic(LOCK_KEY, other.to_json())
    wait_for(lambda: bool(lost.reasons), "on_lost")
    assert len(lost.reasons) == 1
    assert "taken over by pid 777 on otherhost" in lost.reasons[0]
    assert holder.lost == lost.reasons[0] and holder.statistics().held is False
    holder.release()
    assert record_of(dest()) == other  # never deletes someone else's lock


def test_a_lock_deleted_under_its_holder_calls_on_lost(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    lost = LostCalls()
    holder = RemoteLease(dest(), ttl=1.5, on_lost=lost)
    leases.append(holder)
    holder.acquire()
    assert dest().delete(LOCK_KEY)
    wait_for(lambda: bool(lost.reasons), "on_lost")
    assert "deleted" in lost.reasons[0]
    holder.release()
    assert dest().stat(LOCK_KEY) is None


class FlakyStorage(ObjectStorage):
    """A fault injector: the next ``failures`` compare-and-swaps fail as a network
    error would, or every one hangs while ``hang`` is set."""

    def __init__(self, base: ObjectStorage) -> None:
        super().__init__(base.store, base.location)
        self.failures = 0
        self.hang = threading.Event()
        self.unhang = threading.Event()

    def replace_if(self, key: str, data: bytes, etag: str) -> str | None:
        if self.hang.is_set():
            self.unhang.wait(PATIENCE)
        if self.failures > 0:
            self.failures -= 1
            raise OSError(5, f"cannot write {key}: connection reset", key)
        return super().replace_if(key, data, etag)


def test_transient_renewal_failures_are_retried_while_the_lease_holds(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    flaky = FlakyStorage(dest())
    lost = LostCalls()
    flaky.failures = 2  # the first two renewals (acquire itself is a create)
    holder = RemoteLease(flaky, ttl=6, on_lost=lost)
    leases.append(holder)
    holder.acquire()
    wait_for(lambda: holder.statistics().renewals >= 1, "a renewal after the failures")
    stats = holder.statistics()
    assert stats.renew_failures == 2 and stats.held and lost.reasons == []


def test_a_lease_that_cannot_be_renewed_in_time_is_lost_even_if_a_request_hangs(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    flaky = FlakyStorage(dest())
    lost = LostCalls()
    holder = RemoteLease(flaky, ttl=1.5, on_lost=lost)
    leases.append(holder)
    holder.acquire()
    flaky.hang.set()
    try:
        wait_for(lambda: bool(lost.reasons), "on_lost while the renewal hangs")
    finally:
        flaky.hang.clear()
        flaky.unhang.set()
    assert "could not be renewed within its ttl" in lost.reasons[0]
    assert holder.statistics().renew_failures >= 1
    holder.release()  # still its own lock: refreshed by compare-and-swap, then deleted
    assert dest().stat(LOCK_KEY) is None


def test_a_holder_clock_a_day_slow_does_not_make_a_live_lease_look_expired(
    dest: Callable[[], ObjectStorage],
) -> None:
    # Its record says it was renewed a day ago; the store stamped it just now.
    left_behind(dest(), ttl=30, clock_offset=-86400)
    with pytest.raises(DestBusy, match="pid 4242 on elsewhere"):
        RemoteLease(dest(), ttl=30).acquire()
    state = read_lease(dest())
    assert state is not None and not state.expired and state.age < 30
    assert "lease renewed" in describe_lease(state)


def test_a_holder_clock_a_day_fast_does_not_keep_an_expired_lease_alive(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    # Its record says it was renewed tomorrow; it expires by the store's stamp.
    left_behind(dest(), ttl=1.0, clock_offset=86400)
    taker = RemoteLease(dest(), ttl=30, margin=0.5)
    leases.append(taker)

    def taken() -> bool:
        try:
            taker.acquire()
        except DestBusy:
            return False
        return True

    wait_for(taken, "the lease to be taken over")
    assert taker.statistics().takeovers == 1


def test_a_lock_that_is_not_a_lease_record_is_judged_by_its_age(
    dest: Callable[[], ObjectStorage], leases: list[RemoteLease]
) -> None:
    dest().create(LOCK_KEY, b"not json")
    state = read_lease(dest(), default_ttl=1.0)
    assert state is not None and state.record is None
    assert "holder unknown" in describe_lease(state)
    taker = RemoteLease(dest(), ttl=1.0, margin=0.5)
    leases.append(taker)

    def taken() -> bool:
        try:
            taker.acquire()
        except DestBusy as exc:
            assert "holder unknown" in str(exc)
            return False
        return True

    wait_for(taken, "the foreign lock to be taken over")


def test_read_lease_is_none_without_a_lock(dest: Callable[[], ObjectStorage]) -> None:
    assert read_lease(dest()) is None
    # ... and leaves nothing behind (the clock probe is deleted).
    assert dest().list_files(".optimizr") == {}


def test_lease_arguments_are_checked(dest: Callable[[], ObjectStorage]) -> None:
    with pytest.raises(ValueError, match="ttl"):
        RemoteLease(dest(), ttl=0)
