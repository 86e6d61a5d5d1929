"""Tracing (issue 15): real ``optimizr convert`` runs exporting over OTLP/HTTP to the
test receiver (tests/otlp_receiver.py), which decodes the protobuf; the tests check
the tree of spans it got, from the coordinator and from the worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import photo_array, save_jpeg
from optimizr import tracing
from optimizr.config import EncodeOptions
from optimizr.executors.base import Job
from optimizr.executors.codec_messages import CodecMessages
from optimizr.executors.worker import convert_job
from optimizr.storage.objectstore import StoreOptions, storage_for
from optimizr.storage.urls import parse_location
from otlp_receiver import OtlpReceiver, ReceivedSpan, span_tree
from servers import SeaweedS3, free_ports

PHASES = ("read", "decode", "encode", "write")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without OpenTelemetry's variables (a developer's shell may set
    them), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OPTIMIZR_", "AWS_"))}
    return {**env, **extra}


def _library(root: Path, good: int = 4) -> Path:
    src = root / "src"
    src.mkdir()
    for i in range(good):
        save_jpeg(src / f"photo{i}.jpg", photo_array(160 + 16 * i, 120, seed=i))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)  # a JPEG cut short
    return src


def _convert(src: Path, dest: Path, *args: str, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest), "--no-progress"]
    proc = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=240, env=env or _clean_env()
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # broken.jpg is a new failure
    return proc.stderr


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_id == parent.span_id]


def _check_tree(spans: list[ReceivedSpan], images: int) -> None:
    tree = span_tree(spans)
    runs = [s for s in spans if s.name == "run"]
    assert len(runs) == 1 and runs[0].parent_id == "", tree
    run = runs[0]
    assert run.resource["service.name"] == "optimizr"
    assert run.attributes["optimizr.found"] == images + 1
    assert run.attributes["optimizr.converted"] == images
    assert run.attributes["optimizr.failed"] == 1
    assert run.attributes["optimizr.source"].endswith("src")
    coordinator = run.resource["process.pid"]

    image_spans = [s for s in spans if s.name == "image"]
    assert sorted(s.attributes["optimizr.key"] for s in image_spans) == sorted(
        ["broken.jpg", *(f"photo{i}.jpg" for i in range(images))]
    ), tree
    assert all(s.parent_id == run.span_id for s in image_spans), tree
    assert len({s.trace_id for s in spans}) == 1

    worker_pids = set()
    for image in image_spans:
        children = _children(spans, image)
        if image.attributes["optimizr.key"] == "broken.jpg":
            assert image.error, tree
            assert image.attributes["optimizr.outcome"] == "failed"
            assert image.attributes["optimizr.reason"] == "truncated"
            assert "premature end" in image.attributes["optimizr.error"]
            assert image.status_message.startswith("truncated: ")
            # ... and the worker said so under it, from its own process.
            (failed,) = children
            assert failed.name == "convert" and failed.error
            assert failed.resource["process.pid"] != coordinator
            continue
        assert not image.error, tree
        assert image.attributes["optimizr.outcome"] == "converted"
        assert image.attributes["optimizr.bytes_out"] > 0
        by_name = {s.name: s for s in children}
        assert sorted(by_name) == sorted(PHASES), tree
        for name in ("read", "decode", "encode"):
            phase = by_name[name]
            # Made in a worker process (propagation across processes), exported by it.
            assert phase.resource["optimizr.role"] == "worker", tree
            assert phase.resource["process.pid"] != coordinator
            worker_pids.add(phase.resource["process.pid"])
            assert image.start_ns <= phase.start_ns <= phase.end_ns <= image.end_ns, tree
        assert by_name["read"].end_ns <= by_name["decode"].start_ns
        assert by_name["decode"].end_ns <= by_name["encode"].start_ns
        assert by_name["write"].resource["process.pid"] == coordinator
        assert by_name["encode"].end_ns <= by_name["write"].start_ns
    assert worker_pids, tree


def test_a_run_is_one_trace_with_a_span_per_image_and_phase(
    tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    src, dest = _library(tmp_path), tmp_path / "dest"
    _convert(src, dest, "--otlp-endpoint", otlp_receiver.url, "-j", "2")
    spans = otlp_receiver.trace_of_run(str(dest))
    print(span_tree(spans))  # the excerpt the README shows (pytest -s)
    _check_tree(spans, images=4)


def test_the_standard_otel_variable_turns_tracing_on(
    tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    src, dest = _library(tmp_path, good=2), tmp_path / "dest"
    _convert(src, dest, "-j", "1", env=_clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.url))
    _check_tree(otlp_receiver.trace_of_run(str(dest)), images=2)


#: Runs the CLI in this interpreter, then prints which tracing modules it imported.
_RUN_AND_LIST_MODULES = """
import json, sys
from optimizr.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
names = [m for m in sys.modules if m.startswith(("opentelemetry", "optimizr.otel"))]
print(json.dumps(sorted(names)))
"""


def _modules_after(args: list[str], env: dict[str, str]) -> tuple[list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_without_an_endpoint_the_sdk_is_never_imported(
    tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    src = _library(tmp_path, good=1)
    base = ["convert", str(src), "--no-progress", "-j", "1"]
    off, _ = _modules_after([*base, str(tmp_path / "off")], _clean_env())
    assert off == []
    # The same check sees the import when tracing is on: it can fail.
    on, _ = _modules_after(
        [*base, str(tmp_path / "on"), "--otlp-endpoint", otlp_receiver.url], _clean_env()
    )
    assert "optimizr.otel" in on and "opentelemetry.sdk.trace" in on


def test_a_worker_without_a_trace_in_its_job_imports_nothing(tmp_path: Path) -> None:
    photo = save_jpeg(tmp_path / "a.jpg", photo_array(64, 48))
    script = f"""
import json, sys
from optimizr.config import EncodeOptions
from optimizr.executors.base import Job
from optimizr.executors.codec_messages import CodecMessages
from optimizr.executors.worker import convert_job
from optimizr.storage.objectstore import StoreOptions, storage_for
from optimizr.storage.urls import parse_location
with CodecMessages() as messages:
    encoded, error, _ = convert_job(Job(1, "a.jpg", {str(photo)!r}, EncodeOptions()), messages)
assert error is None and encoded.webp
print(json.dumps([m for m in sys.modules if m.startswith(("opentelemetry", "optimizr.otel"))]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


#: Makes ``import opentelemetry`` fail, as where the tracing extra is not installed.
_WITHOUT_OTEL = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Missing())
from optimizr.cli import main
main(sys.argv[1:])
"""


def test_without_the_extra_one_warning_and_the_run_goes_on(tmp_path: Path) -> None:
    src, dest = _library(tmp_path, good=2), tmp_path / "dest"
    command = [sys.executable, "-c", _WITHOUT_OTEL, "convert", str(src), str(dest)]
    proc = subprocess.run(
        [*command, "--no-progress", "-j", "1", "--otlp-endpoint", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_clean_env(),
    )
    assert proc.returncode == 1, proc.stderr  # broken.jpg, as without tracing
    warnings = [line for line in proc.stderr.splitlines() if "tracing is off" in line]
    assert len(warnings) == 1, proc.stderr
    assert "optimizr[tracing]" in warnings[0] and "OpenTelemetry is not installed" in warnings[0]
    assert sorted(p.name for p in dest.glob("*.webp")) == ["photo0.webp", "photo1.webp"]


def test_worker_api_nests_and_exports_once_per_job(
    tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    """The calls a Dask task makes: in_worker around its own fetch and write phases
    and convert_job (whose in_worker joins the outer one); one export, at the end."""
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    carrier = (
        (tracing.ENDPOINT_KEY, tracing.traces_url(otlp_receiver.url) or ""),
        ("traceparent", f"00-{trace_id}-{parent_id}-01"),
    )
    photo = save_jpeg(tmp_path / "a.jpg", photo_array(64, 48))
    job = Job(1, "a.jpg", str(photo), EncodeOptions(), trace=carrier)
    requests = otlp_receiver.requests
    with CodecMessages() as messages, tracing.in_worker(job):
        with tracing.phase("fetch", **{"optimizr.bytes": 10}):
            pass
        encoded, error, _ = convert_job(job, messages)
        assert error is None and encoded is not None
        assert otlp_receiver.requests == requests  # nothing exported before the end
        with pytest.raises(OSError), tracing.phase("write"):
            raise OSError("disk full")
    assert otlp_receiver.requests == requests + 1
    spans = [s for s in otlp_receiver.spans if s.trace_id == trace_id]
    assert sorted(s.name for s in spans) == ["decode", "encode", "fetch", "read", "write"]
    assert {s.parent_id for s in spans} == {parent_id}
    assert [s.error for s in spans if s.name == "write"] == [True]


def test_traces_url() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318/"}
    assert tracing.traces_url(None, {}) is None
    assert tracing.traces_url(None, env) == "http://env:4318/v1/traces"
    assert tracing.traces_url("http://opt:4318", env) == "http://opt:4318/v1/traces"
    assert tracing.traces_url("http://opt/v1/traces", env) == "http://opt/v1/traces"
    full = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://full/x"}
    assert tracing.traces_url(None, full) == "http://full/x"


def test_a_bad_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    src = _library(tmp_path, good=1)
    proc = subprocess.run(
        [sys.executable, "-m", "optimizr", "convert", str(src), str(tmp_path / "d")]
        + ["--otlp-endpoint", "collector:4318"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    assert proc.returncode == 2
    assert "--otlp-endpoint 'collector:4318': not an http:// or https:// URL" in proc.stderr


def test_an_object_store_run_traces_the_fetch_and_the_upload(
    tmp_path: Path,
    otlp_receiver: OtlpReceiver,
    s3_server: SeaweedS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SRC and DEST on S3 (SeaweedFS): the coordinator's fetch and upload are the
    image's fetch and write spans, around the worker's read, decode and encode."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    src, dest = f"s3://{s3_server.bucket}/{prefix}/src", f"s3://{s3_server.bucket}/{prefix}/out"
    local = _library(tmp_path, good=2)
    env = _clean_env(
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_REGION="us-east-1",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(name, env[name])
    store = storage_for(
        parse_location(src), StoreOptions(endpoint_url=s3_server.endpoint, s3_path_style=True)
    )
    for path in local.iterdir():
        store.write_atomic(path.name, path.read_bytes())
    flags = ["--endpoint-url", s3_server.endpoint, "--s3-path-style"]
    _convert(src, dest, "--otlp-endpoint", otlp_receiver.url, "-j", "1", *flags, env=env)
    spans = otlp_receiver.trace_of_run(dest)
    tree = span_tree(spans)
    coordinator = next(s for s in spans if s.name == "run").resource["process.pid"]
    converted = [
        s for s in spans if s.name == "image" and s.attributes["optimizr.outcome"] == "converted"
    ]
    assert len(converted) == 2, tree
    for image in converted:
        by_name = {s.name: s for s in _children(spans, image)}
        assert sorted(by_name) == sorted(("fetch", *PHASES)), tree
        assert by_name["fetch"].resource["process.pid"] == coordinator
        assert by_name["write"].resource["process.pid"] == coordinator
        assert by_name["read"].resource["process.pid"] != coordinator
        assert by_name["fetch"].end_ns <= by_name["read"].start_ns
        assert by_name["encode"].end_ns <= by_name["write"].start_ns


@pytest.mark.parametrize("how", ["optimizr.toml", "OPTIMIZR_OTLP_ENDPOINT"])
def test_the_endpoint_from_the_config_file_or_optimizr_env(
    tmp_path: Path, otlp_receiver: OtlpReceiver, how: str
) -> None:
    src, dest = _library(tmp_path, good=1), tmp_path / "dest"
    env = _clean_env()
    if how == "optimizr.toml":
        (tmp_path / "optimizr.toml").write_text(f'otlp-endpoint = "{otlp_receiver.url}"\n')
    else:
        env[how] = otlp_receiver.url
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest), "-Q"]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    _check_tree(otlp_receiver.trace_of_run(str(dest)), images=1)


def test_a_collector_that_is_down_costs_one_warning_and_the_run_goes_on(tmp_path: Path) -> None:
    src, dest = _library(tmp_path, good=2), tmp_path / "dest"
    (closed,) = free_ports(1)  # bound and released: nothing listens there
    stderr = _convert(src, dest, "-Q", "-j", "1", "--otlp-endpoint", f"http://127.0.0.1:{closed}")
    assert sorted(p.name for p in dest.glob("*.webp")) == ["photo0.webp", "photo1.webp"]
    lines = [line for line in stderr.splitlines() if "broken.jpg" not in line]
    assert len(lines) == 1, stderr  # the SDK's own retry messages are held back
    assert lines[0].startswith("warning: tracing: ") and "failed" in lines[0]
    assert "spans lost" in lines[0] and "refused" in lines[0]
