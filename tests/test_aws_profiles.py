"""Shared AWS profiles of static keys: read from the files the AWS CLI reads, used
against the real SeaweedFS, refused by name when they would need more than keys."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from optimizr.errors import UsageError
from optimizr.storage.aws_profiles import profile_to_use, read_profile
from optimizr.storage.objectstore import StoreOptions, probe, storage_for
from optimizr.storage.urls import parse_location
from servers import SeaweedS3


@pytest.fixture
def aws_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    credentials, config = tmp_path / "credentials", tmp_path / "config"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    return credentials, config


def test_a_profile_merges_config_and_credentials_the_credentials_winning(
    aws_files: tuple[Path, Path],
) -> None:
    credentials, config = aws_files
    credentials.write_text("[work]\naws_access_key_id = AKWORK\naws_secret_access_key = s3cr3t\n")
    config.write_text(
        "[profile work]\nregion = eu-west-3\nendpoint_url = http://127.0.0.1:1\n"
        "aws_access_key_id = FROM-CONFIG\n[default]\nregion = us-east-1\n"
        "aws_access_key_id = AKDEF\naws_secret_access_key = d3f\n"
    )
    work = read_profile("work")
    assert (work.access_key_id, work.secret_access_key) == ("AKWORK", "s3cr3t")
    assert (work.region, work.endpoint_url) == ("eu-west-3", "http://127.0.0.1:1")
    assert "s3cr3t" not in repr(work)
    assert read_profile("default").access_key_id == "AKDEF"


def test_profiles_that_need_more_than_keys_or_do_not_exist_are_refused_by_name(
    aws_files: tuple[Path, Path],
) -> None:
    credentials, config = aws_files
    config.write_text(
        "[profile role]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = base\n"
        "[profile half]\naws_access_key_id = AKHALF\n"
    )
    with pytest.raises(UsageError, match="role_arn, source_profile") as role:
        read_profile("role")
    assert "arn:aws" not in str(role.value)
    with pytest.raises(UsageError, match="no aws_secret_access_key"):
        read_profile("half")
    with pytest.raises(UsageError, match="'nope' is in neither"):
        read_profile("nope")


def test_environment_keys_win_over_aws_profile(
    aws_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "work")
    assert profile_to_use(None) == "work"
    assert profile_to_use("other") == "other"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    assert profile_to_use(None) is None


def test_a_profile_of_static_keys_reaches_the_s3_server(
    aws_files: tuple[Path, Path], s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials, config = aws_files
    credentials.write_text(
        f"[seaweed]\naws_access_key_id = {s3_server.access_key}\n"
        f"aws_secret_access_key = {s3_server.secret_key}\n"
        "[wrong]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n"
    )
    config.write_text(
        f"[profile seaweed]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n"
    )
    where = parse_location(f"s3://{s3_server.bucket}/p-{uuid.uuid4().hex}")
    # --profile, its endpoint and region from the config file.
    storage = storage_for(where, StoreOptions(profile="seaweed", s3_path_style=True))
    probe(storage, write=True)
    storage.write_atomic("x.webp", b"RIFF")
    assert storage.read_bytes("x.webp") == b"RIFF"
    # AWS_PROFILE, with no keys in the environment.
    monkeypatch.setenv("AWS_PROFILE", "seaweed")
    assert storage_for(where, StoreOptions(s3_path_style=True)).read_bytes("x.webp") == b"RIFF"
    wrong = storage_for(where, StoreOptions(profile="wrong", endpoint_url=s3_server.endpoint,
                                            region="us-east-1", s3_path_style=True))  # fmt: skip
    with pytest.raises(UsageError, match="credentials") as refused:
        probe(wrong, write=False)
    assert "nothing" not in str(refused.value)
