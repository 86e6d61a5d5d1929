"""The CLI as a user runs it: options, exit codes, output, signals, worker faults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from conftest import age, decode, photo_array, save_jpeg

ROOT = Path(__file__).resolve().parent.parent


def make_tree(src: Path, count: int, size: tuple[int, int] = (96, 64)) -> list[Path]:
    return [
        save_jpeg(src / f"d{i % 3}" / f"img{i:03}.jpg", photo_array(*size, seed=i))
        for i in range(count)
    ]


def no_partial_outputs(dest: Path) -> None:
    leftovers = [p for p in dest.rglob("*") if p.name.endswith(".optimizr-tmp")]
    assert leftovers == []
    for out in dest.rglob("*.webp"):
        decode(out)  # every output that exists is whole


def test_help_lists_every_option(cli: Callable[..., Result]) -> None:
    result = cli("convert", "--help")
    assert result.exit_code == 0
    for option in ("--quality", "--effort", "--lossless", "--near-lossless", "--max-width",
                   "--metadata", "--srgb", "--oversize", "--max-pixels", "--if-larger",
                   "--name", "--dry-run", "--force", "--workers", "--summary"):  # fmt: skip
        assert option in result.output


def test_every_cli_option_is_documented_in_the_readme(cli: Callable[..., Result]) -> None:
    from optimizr.cli import convert

    readme = (ROOT / "README.md").read_text()
    options = [opt for param in convert.params for opt in param.opts if opt.startswith("--")]
    assert len(options) > 20
    missing = [opt for opt in options if opt not in readme]
    assert missing == []


def test_convert_exit_0_and_table(cli: Callable[..., Result], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 4)
    result = cli("convert", src, dest, "-j", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and "saving" in result.output
    assert len(list(dest.rglob("*.webp"))) == 4
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["exit_code"] == 0 and doc["files"]["converted"] == 4


def test_failures_give_exit_1_and_one_line_each(cli: Callable[..., Result], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    [good] = make_tree(src, 1)
    (src / "broken.jpg").write_bytes(good.read_bytes()[:500])
    (src / "fake.png").write_text("not a png at all")
    result = cli("convert", src, dest, "--no-progress")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(lines) == 2
    assert any(line.startswith("FAILED broken.jpg: truncated") for line in lines)
    assert any(line.startswith("FAILED fake.png: not an image") for line in lines)


def test_known_bad_files_exit_0_new_failures_exit_1_and_strict_counts_all(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 2)
    bad = src / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    age(src)

    def convert(*extra: str) -> tuple[int, str, dict[str, Any]]:
        result = cli("convert", src, dest, "--no-progress", *extra)
        doc = json.loads((dest / "optimizr-summary.json").read_text())
        assert doc["exit_code"] == result.exit_code
        return result.exit_code, result.output, doc

    code, _, doc = convert()
    assert code == 1 and doc["files"]["new_failed"] == 1  # found bad for the first time
    # A cron job's next runs: the known-bad file is listed, but the run is fine.
    code, text, doc = convert()
    assert code == 0, text
    assert "FAILED bad.jpg" in text and "of which known bad" in text
    assert doc["files"]["failed"] == 1 and doc["files"]["new_failed"] == 0
    assert [r["path"] for r in doc["not_converted"]] == ["bad.jpg"]
    [listed] = (dest / ".optimizr/failed.jsonl").read_text().splitlines()
    assert json.loads(listed)["path"] == "bad.jpg"
    assert convert("--strict")[0] == 1  # every failure counts
    assert convert("--force")[0] == 0  # reconverted all, bad the same way: not new
    # Tried again and bad the same way: still not new.
    code, text, doc = convert("--retry-failed")
    assert code == 0 and doc["files"]["known_failed"] == 0 and doc["files"]["failed"] == 1
    # A file that fails for the first time is new...
    (src / "d0" / "worse.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    age(src)
    code, text, doc = convert()
    assert code == 1 and doc["files"]["new_failed"] == 1, text
    assert convert()[0] == 0
    # ...and so is one that fails for another reason than before.
    bad.write_bytes(b"a text file now, no image signature")
    age(src)
    code, text, doc = convert()
    assert code == 1, text
    reasons = doc["files"]["failed_by_reason"]
    assert reasons["not an image"] == 1 and sum(reasons.values()) == 2  # and worse.jpg
    assert doc["files"]["new_failed"] == 1
    status = cli("status", dest, "--json")
    assert json.loads(status.output)["last_run"]["exit_code"] == 1


@pytest.mark.parametrize(
    "args",
    [
        ("--quality", "101"),
        ("--effort", "9"),
        ("--metadata", "some"),
        ("--workers", "-1"),
        ("--bogus-option",),
    ],
)
def test_usage_errors_exit_2(cli: Callable[..., Result], tmp_path: Path, args: tuple[str]) -> None:
    (tmp_path / "src").mkdir()
    result = cli("convert", tmp_path / "src", tmp_path / "dest", *args)
    assert result.exit_code == 2


def test_missing_src_exits_2(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("convert", tmp_path / "missing", tmp_path / "dest")
    assert result.exit_code == 2
    assert "SRC does not exist" in result.output


def test_dry_run_lists_and_writes_nothing(cli: Callable[..., Result], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 2)
    (src / "notes.txt").write_text("hi")
    result = cli("convert", src, dest, "--dry-run")
    assert result.exit_code == 0
    assert "would convert d0/img000.jpg -> d0/img000.webp (" in result.stdout
    assert "notes.txt: not an image" in result.stderr
    assert not dest.exists()


def test_verbose_prints_one_line_per_file(cli: Callable[..., Result], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 3)
    result = cli("convert", src, dest, "-v", "--no-progress")
    assert len(re.findall(r"^converted d\d/img\d+\.jpg -> ", result.output, re.M)) == 3


# -- worker faults: a crashing or hanging codec must not take the run down ---------------------


def test_worker_crash_fails_only_that_image(
    cli: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 6)
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "crash:img002.jpg,abort:img004.jpg")
    result = cli("convert", src, dest, "-j", "2", "--no-progress")
    assert result.exit_code == 1
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    failed = {e["path"]: e for e in doc["not_converted"]}
    assert set(failed) == {"d2/img002.jpg", "d1/img004.jpg"}
    assert failed["d2/img002.jpg"]["reason"] == "worker crashed"
    assert failed["d2/img002.jpg"]["message"] == "SIGSEGV"
    assert failed["d1/img004.jpg"]["message"] == "SIGABRT"
    assert doc["files"]["converted"] == 4
    no_partial_outputs(dest)


@pytest.mark.timeout(60)
def test_hung_worker_is_killed_after_timeout(
    cli: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 4)
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "hang:img001.jpg")
    # The clock starts when a ready worker gets the image (not while it starts up,
    # which on a loaded machine took seconds); a healthy image needs milliseconds.
    result = cli("convert", src, dest, "-j", "2", "--timeout", "5", "--no-progress")
    assert result.exit_code == 1
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    [failure] = doc["not_converted"]
    assert failure["path"] == "d1/img001.jpg" and failure["reason"] == "worker crashed"
    assert "timed out after 5 s" in failure["message"]
    assert doc["files"]["converted"] == 3


# -- signals, against a real process ------------------------------------------------------------


def spawn_cli(
    src: Path, dest: Path, *extra: str, prefix: tuple[str, ...] = (), **kwargs: object
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest), "--no-progress"]
    return subprocess.Popen(
        [*prefix, *command, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        **kwargs,  # type: ignore[call-overload]
    )


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll for a state the test needs, not for time to pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def big_tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 40, size=(1200, 900))
    yield src, dest


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_finishes_in_flight_and_writes_summary(
    big_tree: tuple[Path, Path], signum: int, code: int
) -> None:
    src, dest = big_tree
    proc = spawn_cli(src, dest, "-j", "1", "--effort", "6")
    wait_for(lambda: any(dest.rglob("*.webp")))
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == code, out.decode()
    assert b"stopping" in out
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["interrupted"] is True
    converted = doc["files"]["converted"]
    assert 1 <= converted < 40
    # Everything recorded as converted is on disk, whole.
    assert len(list(dest.rglob("*.webp"))) == converted
    no_partial_outputs(dest)


@pytest.mark.timeout(120)
def test_second_sigint_aborts_without_partial_files(
    big_tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = big_tree
    # The first image (in walk order) never finishes: after the first SIGINT the run
    # waits for it (--grace 60 s), so it cannot end before the second one arrives.
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "hang:d0/img000.jpg")
    proc = spawn_cli(src, dest, "-j", "2", "--effort", "6")
    wait_for(lambda: any(dest.rglob("*.webp")))
    proc.send_signal(signal.SIGINT)
    # Signals do not queue: the second is sent once the first has been handled.
    assert proc.stdout is not None
    first = b""
    while b"stopping" not in first:
        line = proc.stdout.readline()
        assert line, "the process ended before reporting that it is stopping"
        first += line
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 130, out.decode()
    assert b"aborting" in out
    no_partial_outputs(dest)
    assert len(list(dest.rglob("*.webp"))) < 40


@pytest.mark.timeout(120)
def test_sigterm_is_recorded_as_143_with_what_was_found_and_what_remains(
    tmp_path: Path,
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    # One folder: the walk lists it whole before the first image starts.
    for i in range(12):
        save_jpeg(src / f"img{i:03}.jpg", photo_array(1200, 900, seed=i))
    proc = spawn_cli(src, dest, "-j", "1", "--effort", "6")
    wait_for(lambda: any(dest.rglob("*.webp")))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=100)
    text = out.decode()
    assert proc.returncode == 143, text
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    files = doc["files"]
    assert doc["interrupted"] is True and doc["exit_code"] == 143
    finished = files["converted"] + files["skipped"] + files["failed"]
    assert files["found"] == 12 and 1 <= finished < 12
    assert files["remaining"] == 12 - finished
    assert re.search(r"files found\s*│\s*12\b", text), text
    assert re.search(rf"not done \(interrupted\)\s*│\s*{12 - finished}\b", text), text
    status = subprocess.run(
        [sys.executable, "-m", "optimizr", "status", str(dest), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    last = json.loads(status.stdout)["last_run"]
    assert last["exit_code"] == 143 and last["found"] == 12


# -- permissions ------------------------------------------------------------------------------

# Root reads anything; CI runs as root. Dropping the two capabilities that let
# root bypass file permissions makes the same process meet them like anyone else.
NO_DAC = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
          "--bounding-set=-dac_override,-dac_read_search")  # fmt: skip


def test_unreadable_file_and_folder_fail_with_permission_denied(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 3)
    save_jpeg(src / "secret" / "hidden.jpg", photo_array(64, 64))
    locked = src / "d1" / "img001.jpg"
    locked.chmod(0o000)
    (src / "secret").chmod(0o000)
    try:
        prefix = NO_DAC if os.geteuid() == 0 else ()
        proc = spawn_cli(src, dest, "-j", "1", prefix=prefix)
        out, _ = proc.communicate(timeout=120)
    finally:
        locked.chmod(0o644)
        (src / "secret").chmod(0o755)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "FAILED d1/img001.jpg: permission denied" in text
    assert "FAILED secret: permission denied" in text
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["files"]["converted"] == 2
    assert doc["files"]["failed_by_reason"] == {"permission denied": 2}
    # Once readable they are retried without --retry-failed: not the images' fault.
    proc = spawn_cli(src, dest, "-j", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()
    assert (dest / "d1/img001.webp").exists() and (dest / "secret/hidden.webp").exists()
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["files"]["converted"] == 2 and doc["files"]["skipped_by_reason"] == {"up to date": 2}


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 5)
    (src / "d1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (src / "notes.txt").write_text("hi")
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest),
               "--log-format", "json", "-j", "2"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line parses
    assert all({"time", "level", "event"} <= set(e) for e in events)
    images = [e for e in events if e["event"] == "image"]
    assert len(images) == 7
    for event in images:
        assert {"path", "status", "bytes_in", "bytes_out", "ms", "error"} <= set(event)
    by_path = {e["path"]: e for e in images}
    broken = by_path["d1/broken.jpg"]
    assert broken["level"] == "warning" and broken["status"] == "failed"
    assert broken["error"]["class"] in ("CorruptImage", "TruncatedImage")
    ok = by_path["d0/img000.jpg"]
    assert ok["status"] == "converted" and ok["error"] is None and ok["ms"] > 0
    assert ok["bytes_out"] == (dest / "d0/img000.webp").stat().st_size
    assert by_path["notes.txt"]["status"] == "skipped"
    [finished] = [e for e in events if e["event"] == "run finished"]
    summary = json.loads((dest / "optimizr-summary.json").read_text())
    assert finished["converted"] == summary["files"]["converted"] == 5
    assert finished["bytes_out"] == summary["bytes"]["out"] and finished["exit_code"] == 1
    assert proc.stdout == ""

    quiet = subprocess.run(
        [*command, "--log-level", "warning", "--force"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    levels = {json.loads(line)["level"] for line in quiet.stderr.splitlines()}
    assert levels == {"warning"}
    bad = subprocess.run(
        [sys.executable, "-m", "optimizr", "convert", str(tmp_path / "nope"), str(dest),
         "--log-format", "json"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    [error] = [json.loads(line) for line in bad.stderr.splitlines()]
    assert error["event"] == "error" and "SRC does not exist" in error["message"]
