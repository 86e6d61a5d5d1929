"""The worker pool as its callers meet it: from an unguarded script or stdin, with
workers that cannot start, die before they are ready or while idle, start slowly,
are sent the terminal's Ctrl-C, or print to their stderr."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import decode, manifest_rows, photo_array, save_jpeg
from optimizr import EncodeOptions, RunConfig, WorkerStartFailed, convert_tree
from optimizr.executors import Job, ProcessExecutor
from optimizr.executors.codec_messages import tidy
from test_cli import make_tree, spawn_cli, wait_for

ROOT = Path(__file__).resolve().parent.parent


def readme_library_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    library = readme[readme.index("## Library") :]
    return re.search(r"```python\n(.*?)```", library, re.S).group(1)  # type: ignore[union-attr]


def library_folder(root: Path) -> Path:
    """What the README's snippet converts: photo.jpg, and photos/ with a stray text file."""
    save_jpeg(root / "photo.jpg", photo_array(96, 64, seed=1))
    save_jpeg(root / "photos" / "a.jpg", photo_array(96, 64, seed=2))
    (root / "photos" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["script", "stdin"])
def test_the_readme_snippet_works_from_an_unguarded_script_and_from_stdin(
    tmp_path: Path, how: str
) -> None:
    root = library_folder(tmp_path)
    # No `if __name__ == "__main__":` guard, as a user saves it. Each run of the
    # script appends a line: a worker that re-ran it would add one.
    script = (
        "open('runs.log', 'a').write('ran\\n')\n"
        + readme_library_snippet()
        + "print('TREE', summary.converted, summary.failed, dict(summary.skipped_by_reason))\n"
    )
    if how == "script":
        (root / "convert_photos.py").write_text(script)
        command, stdin = [sys.executable, "convert_photos.py"], None
    else:
        command, stdin = [sys.executable, "-"], script
    proc = subprocess.run(
        command, input=stdin, cwd=root, capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0, proc.stderr
    assert (root / "runs.log").read_text() == "ran\n"  # the script ran once, not once per worker
    assert proc.stdout.splitlines()[0].startswith("converted None ")
    assert "TREE 1 0 {'not an image': 1}" in proc.stdout.splitlines()
    assert proc.stderr == ""
    rows = manifest_rows(root / "webp")
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "a.jpg": ("done", None),
        "notes.txt": ("skipped", "not an image"),
    }
    decode(root / "webp" / "a.webp")
    decode(root / "photo.webp")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["startup:exit", "startup:crash"])
def test_a_pool_whose_workers_cannot_start_raises_before_anything_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 3)
    (src / "notes.txt").write_text("hi")
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", fault)
    with pytest.raises(WorkerStartFailed, match="worker processes cannot start") as info:
        convert_tree(src, dest, RunConfig(src=src, dest=dest, workers=2))
    assert info.value.exit_code == 4
    said = "injected start-up failure" if fault == "startup:exit" else "SIGSEGV"
    assert said in str(info.value)
    assert manifest_rows(dest) == {}  # no image is blamed for the machinery
    assert not (dest / "optimizr-summary.json").exists()
    assert list(dest.rglob("*.webp")) == []


@pytest.mark.parametrize(
    ("python", "said"),
    [
        (["/nonexistent/python3"], "cannot start a worker process (/nonexistent/python3)"),
        ([sys.executable, "-c", "import optimizr_is_not_here"], "No module named"),
    ],
)
def test_a_broken_interpreter_is_a_clear_error(
    tmp_path: Path, python: list[str], said: str
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 2)
    with ProcessExecutor(2, python=python) as executor, pytest.raises(WorkerStartFailed) as info:
        convert_tree(src, dest, executor=executor)
    assert said in str(info.value)
    assert executor.statistics().pids == ()  # it gave up: no worker left running
    assert manifest_rows(dest) == {}


@pytest.mark.timeout(120)
def test_the_cli_says_why_workers_cannot_start_and_exits_4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 2)
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "startup:exit")
    proc = spawn_cli(src, dest, "-j", "2")
    out, _ = proc.communicate(timeout=100)
    text = out.decode()
    assert proc.returncode == 4, text
    [error] = [line for line in text.splitlines() if line.startswith("optimizr: error:")]
    assert "worker processes cannot start" in error and "injected start-up failure" in error
    assert "Traceback" not in text
    assert manifest_rows(dest) == {}
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest),
               "--log-format", "json"]  # fmt: skip
    proc2 = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert proc2.returncode == 4
    events = [json.loads(line) for line in proc2.stderr.splitlines()]  # all JSON
    [failure] = [e for e in events if e["event"] == "error"]
    assert failure["exit_code"] == 4 and "cannot start" in failure["message"]


@pytest.mark.timeout(120)
def test_a_worker_that_dies_before_it_is_ready_fails_no_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 4)
    # The first worker to start exits before it is ready; its replacement does not.
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", f"startup-once:{tmp_path / 'marker'}")
    summary = convert_tree(src, dest, RunConfig(src=src, dest=dest, workers=1))
    assert (tmp_path / "marker").exists()
    assert (summary.converted, summary.failed) == (4, 0)
    assert summary.executor["restarts"] == 1 and summary.executor["crashed"] == 0


def jobs_for(paths: list[Path]) -> list[Job]:
    return [Job(i, p.name, str(p), EncodeOptions()) for i, p in enumerate(paths)]


def is_gone(pid: int) -> bool:
    """Dead (a zombie its parent has not reaped yet) or reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_that_dies_while_idle_fails_no_image(tmp_path: Path) -> None:
    paths = make_tree(tmp_path / "src", 4)
    with ProcessExecutor(2) as executor:

        def jobs() -> Iterator[Job]:
            first, *rest = jobs_for(paths)
            yield first
            # The second job is pulled once every worker is ready, before the first
            # is given out: both are idle. Kill one of them.
            victim = executor.statistics().pids[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: is_gone(victim))
            yield from rest

        outcomes = list(executor.imap_unordered(jobs()))
        stats = executor.statistics()
    assert sorted(o.job.key for o in outcomes) == sorted(p.name for p in paths)
    assert all(o.error is None for o in outcomes)
    assert (stats.crashed, stats.restarts, stats.completed) == (0, 1, 4)


def test_libvips_thread_pool_is_sized_even_once_pyvips_is_loaded() -> None:
    """libvips reads VIPS_CONCURRENCY when pyvips loads, and importing optimizr loads it:
    setting the variable afterwards left every worker with one thread per core."""
    code = (
        "import optimizr, pyvips\n"
        "from optimizr.executors.worker import configure_libvips\n"
        "configure_libvips(1)\n"
        "print(pyvips.concurrency_get())\n"
    )
    env = {**os.environ, "VIPS_CONCURRENCY": "3"}  # what libvips starts with
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["1"], out.stderr


def test_nothing_to_convert_starts_no_worker() -> None:
    with ProcessExecutor(2) as executor:
        assert list(executor.imap_unordered(iter([]))) == []
        assert executor.statistics().pids == ()


@pytest.fixture
def slow_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    """Every new interpreter takes 4 s to start (a loaded machine, a cold disk)."""
    site = tmp_path / "slow-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import time\ntime.sleep(4)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return 4.0


@pytest.mark.timeout(120)
def test_the_timeout_counts_from_when_a_ready_worker_gets_the_image(
    tmp_path: Path, slow_start: float
) -> None:
    paths = make_tree(tmp_path / "src", 3)
    # Each image takes milliseconds; the workers take 4 s to start. The start-up
    # must not count against the images' 3 s.
    with ProcessExecutor(2, timeout=slow_start - 1) as executor:
        outcomes = list(executor.imap_unordered(jobs_for(paths)))
        stats = executor.statistics()
    assert [o.error for o in outcomes] == [None] * 3
    assert stats.timed_out == 0 and stats.started == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_sent_to_the_whole_group_fails_no_image(tmp_path: Path, signum: int) -> None:
    """The terminal sends Ctrl-C to every process of the group, systemd SIGTERM to
    every process of the unit: the parent decides, the workers finish their image."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 30, size=(1200, 900))
    proc = spawn_cli(src, dest, "-j", "2", "--effort", "6", start_new_session=True)
    wait_for(lambda: any(dest.rglob("*.webp")) or proc.poll() is not None)
    os.killpg(proc.pid, signum)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), out.decode()
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["interrupted"] is True and doc["files"]["failed"] == 0, doc["not_converted"]
    assert 1 <= doc["files"]["converted"] < 30
    assert "Traceback" not in out.decode()


@pytest.mark.timeout(120)
def test_ctrl_c_while_workers_start_fails_no_image(tmp_path: Path, slow_start: float) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 4)
    proc = spawn_cli(src, dest, "-j", "2", start_new_session=True)
    # Both workers exist and are still starting (4 s each): Ctrl-C at the terminal.
    wait_for(lambda: len(children(proc.pid)) == 2 or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=100)
    text = out.decode()
    assert proc.returncode == 130, text
    assert "KeyboardInterrupt" not in text and "Traceback" not in text
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["files"]["failed"] == 0, doc["not_converted"]
    assert all(r["status"] != "failed" for r in manifest_rows(dest).values())


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
    return found


# -- what the codec says about an image stays with that image --------------------------------


def damaged_jpeg(path: Path) -> Path:
    """A JPEG with a stray restart marker in its scan: libjpeg warns, libvips decodes
    it, and says ``read gave 1 warnings`` when the read is freed."""
    data = save_jpeg(path, photo_array(96, 64, seed=5)).read_bytes()
    scan = data.index(b"\xff\xda") + 200
    path.write_bytes(data[:scan] + b"\xff\xd3" + data[scan:])
    return path


def test_libvips_warnings_are_on_the_images_outcome(tmp_path: Path) -> None:
    damaged = damaged_jpeg(tmp_path / "damaged.jpg")
    [clean] = make_tree(tmp_path / "src", 1)
    with ProcessExecutor(1) as executor:
        outcomes = {o.job.key: o for o in executor.imap_unordered(jobs_for([damaged, clean]))}
    assert outcomes["damaged.jpg"].error is None
    warnings = outcomes["damaged.jpg"].warnings
    assert "VIPS: read gave 1 warnings" in warnings
    assert any("Corrupt JPEG data" in w for w in warnings)
    assert outcomes[clean.name].warnings == ()


@pytest.mark.timeout(120)
def test_json_logs_stay_json_and_carry_each_images_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 3)
    damaged_jpeg(src / "damaged.jpg")
    # A codec library printing straight to fd 2 while converting d1/img001.jpg.
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "stderr:img001.jpg")
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest),
               "--log-format", "json", "-j", "2"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line parses
    images = {e["path"]: e for e in events if e["event"] == "image"}
    assert len(images) == 4
    assert "VIPS: read gave 1 warnings" in images["damaged.jpg"]["warnings"]
    assert images["d1/img001.jpg"]["warnings"] == ["GLib-GObject: injected codec message"]
    assert images["d0/img000.jpg"]["warnings"] == []

    text = spawn_cli(src, tmp_path / "text-dest", "-j", "2").communicate(timeout=100)[0].decode()
    assert "WARNING damaged.jpg: VIPS: read gave 1 warnings" in text.splitlines()
    assert "WARNING d1/img001.jpg: GLib-GObject: injected codec message" in text.splitlines()
    assert "(process:" not in text


@pytest.mark.timeout(120)
def test_what_a_dying_worker_printed_reaches_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 3)
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "raise:img001.jpg")
    summary = convert_tree(src, dest, RunConfig(src=src, dest=dest, workers=2))
    [failure] = summary.not_converted
    assert failure.key == "d1/img001.jpg" and failure.reason == "worker crashed"
    assert failure.message == (
        "the worker exited with status 1: RuntimeError: injected fault: "
        "the worker dies with a traceback"
    )
    assert any(w.startswith("Traceback (most recent call last)") for w in failure.warnings)
    assert summary.converted == 2


@pytest.mark.timeout(200)
def test_the_olympus_photo_logs_only_json(tmp_path: Path, corpus: Path) -> None:
    """The photo whose libvips warnings broke ``jq`` (issue 10)."""
    src = tmp_path / "src"
    src.mkdir()
    photo = src / "olympus.jpg"
    photo.write_bytes((corpus / "photos/olympus-u1020_3648x2736.jpg").read_bytes())
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(tmp_path / "dest"),
               "--log-format", "json", "-j", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line parses
    [image] = [e for e in events if e["event"] == "image"]
    assert image["path"] == "olympus.jpg"
    assert "VIPS: read gave 100 warnings" in image["warnings"]


def test_codec_messages_are_tidied_into_one_line_each() -> None:
    raw = (
        "\n(process:7885): VIPS-WARNING **: 09:16:10.363: read gave 100 warnings\n\n"
        "(process:7885): VIPS-WARNING **: 09:16:10.363: \n"
        "(optimizr:12): GLib-GObject-CRITICAL **: g_object_unref: assertion failed\n"
    )
    assert tidy([raw, "VIPS: ", "VIPS: read gave 100 warnings"]) == (
        "VIPS: read gave 100 warnings",
        "GLib-GObject: g_object_unref: assertion failed",
    )
    many = tidy(f"line {i}" for i in range(50))
    assert len(many) == 21 and many[-1] == "... and 30 more"
    assert tidy(["x" * 1000]) == ("x" * 300,)
