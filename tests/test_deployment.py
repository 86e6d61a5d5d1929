"""The deployment files that can be tried without root: docker-compose.yml's seed script
against a real S3 server, and the optimizr settings the compose file names.

The image itself is built and smoke-tested by ``make image`` (root, buildah and podman,
minutes: README, "Deployment"), never by this suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

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
