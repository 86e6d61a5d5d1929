"""The deployment files that can be tried without root: docker-compose.yml's seed script
against a real S3 server, and the optimizr settings the compose file names.

The image itself is built and smoke-tested by ``make image`` (root, buildah and podman,
minutes: README, "Deployment"), never by this suite.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from optimizr.cli_options import OPTIONS
from optimizr.samples import write_samples
from optimizr.storage.objectstore import StoreOptions, storage_for
from optimizr.storage.urls import parse_location
from servers import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "deploy" / "seed_samples.py"
COMPOSE = ROOT / "docker-compose.yml"
SEED_TIMEOUT = 120  # seconds, a bound for a hung script only: it takes a few here


def seed(server: SeaweedS3, url: str, secret_key: str) -> subprocess.CompletedProcess[str]:
    # The environment the compose file gives the seed service, pointed at the test server.
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint,
    }
    return subprocess.run(
        [sys.executable, str(SEED), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=SEED_TIMEOUT,
        check=False,
    )


def test_seed_puts_the_sample_library_under_the_prefix(
    s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"seed-{uuid.uuid4().hex[:12]}"
    url = f"s3://{s3_server.bucket}/{prefix}"
    run = seed(s3_server, url, s3_server.secret_key)
    assert run.returncode == 0, run.stderr
    # The samples are drawn deterministically: the objects hold what a local draw writes.
    local = tmp_path / "samples"
    write_samples(local)
    expected = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    assert len(expected) >= 6
    assert f"put {len(expected)} files" in run.stdout
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = storage_for(
        parse_location(url), StoreOptions(endpoint_url=s3_server.endpoint, s3_path_style=True)
    )
    for key, path in expected.items():
        assert store.read_bytes(key) == path.read_bytes(), key


def test_seed_says_wrong_credentials_at_once_instead_of_waiting(s3_server: SeaweedS3) -> None:
    # A refusal is final; only "not answering yet" is waited for (up to two minutes).
    run = seed(s3_server, f"s3://{s3_server.bucket}/refused", "not-the-secret")
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"seed: s3://{s3_server.bucket}/refused refused the credentials: ")
    assert "403 Forbidden" in line


def test_compose_sets_only_optimizr_variables_that_exist() -> None:
    # A renamed option would leave the compose file's OPTIMIZR_* setting silently unread.
    named = set(re.findall(r"\bOPTIMIZR_[A-Z0-9_]+", COMPOSE.read_text()))
    assert {"OPTIMIZR_ENDPOINT_URL", "OPTIMIZR_S3_PATH_STYLE"} <= named
    assert named <= {option.envvar for option in OPTIONS}


def load_cluster_smoke() -> Any:
    spec = importlib.util.spec_from_file_location(
        "cluster_smoke", ROOT / "deploy" / "cluster_smoke.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_smoke"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_cluster_smoke_runs_the_compose_services_with_only_their_addresses_changed(
    tmp_path: Path,
) -> None:
    # `make image-cluster-smoke` (no Docker engine here) runs what docker-compose.yml
    # says, read from it: a service it does not run, or an address of compose's network
    # left in what it runs (which would reach nothing, or another machine), fails here.
    smoke = load_cluster_smoke()
    compose = smoke.load_compose()
    replicas = compose["services"]["worker"]["deploy"]["replicas"]
    ports = smoke.pick_ports(replicas)
    plan = smoke.plan(compose, ports, tmp_path)
    containers = [plan.scheduler, *plan.workers, plan.seed, plan.convert]
    assert {c.service for c in containers} | {"seaweedfs"} == set(compose["services"])
    assert len(plan.workers) == replicas == 2
    numbers = [ports.scheduler, ports.scheduler_http, ports.metrics, *ports.weed.values()]
    numbers += [port for pair in ports.workers for port in pair]
    assert len(set(numbers)) == len(numbers)

    def addresses(text: str) -> list[str]:
        return re.findall(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:scheduler|seaweedfs):\d+", text)

    for container in containers:
        spec = compose["services"][container.service]
        assert list(container.entrypoint) == list(spec.get("entrypoint") or [])
        assert container.init and spec["init"] is True  # tini (podman: catatonit) as PID 1
        # compose's own command first, word for word but for addresses and ports...
        original = [str(arg) for arg in spec["command"]]
        ran = list(container.command[: len(original)])
        for mine, theirs in zip(ran, original, strict=True):
            assert mine == theirs or addresses(theirs) or theirs.isdigit(), (mine, theirs)
        # ...then only the flags that a shared host network needs.
        added = container.command[len(original) :]
        assert set(added[::2]) <= {"--host", "--worker-port", "--nanny-port", "--dashboard-address"}
        assert container.environment.keys() == (spec.get("environment") or {}).keys()
        for value in [*container.command, *container.environment.values()]:
            assert all(found == "127.0.0.1" for found in addresses(value)), value
        assert not {"8786", "8333", "9090"} & set(container.command)  # compose's fixed ports
        for port in re.findall(r"127\.0\.0\.1:(\d+)", " ".join(container.command)):
            assert int(port) in numbers or port == "0"
    assert "-ip.bind=127.0.0.1" in plan.weed_command
    assert f"-s3.port={ports.s3}" in plan.weed_command
    assert (
        plan.convert.command[:4] == ("convert", plan.src, plan.dest, "--cluster")
        and plan.convert.command[4] == f"tcp://127.0.0.1:{ports.scheduler}"
    )
