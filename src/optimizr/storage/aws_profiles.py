"""Shared AWS profiles (``~/.aws/credentials`` and ``~/.aws/config``), read the way the
AWS CLI reads them, for the static-key case.

obstore 0.12 reads credentials from the environment, web identity and instance
metadata, never from the shared files; S3-compatible services (R2, MinIO, Ceph,
Spaces) are mostly set up with a profile of static keys in those files. This reads
one: ``--profile NAME``, else ``AWS_PROFILE`` (when no ``AWS_ACCESS_KEY_ID`` is set:
environment credentials win, as in the AWS CLI). Files from
``AWS_SHARED_CREDENTIALS_FILE`` and ``AWS_CONFIG_FILE``, else ``~/.aws/``.

A profile that gets its credentials another way (``role_arn``, ``sso_*``,
``credential_process``, ``source_profile``, ``web_identity_token_file``) needs
boto3's credential chain and is refused by name; never half-used. Values never
appear in a message: only key names.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from optimizr.errors import UsageError

#: Keys that mean "the credentials come from somewhere else": not read here.
_INDIRECT = (
    "role_arn",
    "source_profile",
    "credential_source",
    "credential_process",
    "web_identity_token_file",
    "sso_session",
    "sso_start_url",
    "sso_account_id",
    "sso_role_name",
)


@dataclass(frozen=True)
class Profile:
    name: str
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    region: str | None = None
    endpoint_url: str | None = None

    def __repr__(self) -> str:  # never the keys
        return f"Profile({self.name!r})"


def profile_to_use(explicit: str | None) -> str | None:
    """The profile a run reads: --profile, else AWS_PROFILE unless the environment
    already holds credentials (they win, as in the AWS CLI); None: none."""
    if explicit is not None:
        return explicit
    name = os.environ.get("AWS_PROFILE")
    if name and not os.environ.get("AWS_ACCESS_KEY_ID"):
        return name
    return None


def read_profile(name: str) -> Profile:
    """Profile ``name``'s static credentials and settings; UsageError if there is none."""
    home = Path.home() / ".aws"
    credentials_file = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", home / "credentials"))
    config_file = Path(os.environ.get("AWS_CONFIG_FILE", home / "config"))
    # The credentials file names sections "NAME"; the config file "profile NAME"
    # (and "default" as it is). The credentials file wins where both say.
    merged: dict[str, str] = {}
    found = False
    for path, section in (
        (config_file, name if name == "default" else f"profile {name}"),
        (credentials_file, name),
    ):
        values = _section(path, section)
        if values is not None:
            found = True
            merged.update(values)
    if not found:
        raise UsageError(f"AWS profile {name!r} is in neither {credentials_file} nor {config_file}")
    indirect = [key for key in _INDIRECT if key in merged]
    if indirect:
        raise UsageError(
            f"AWS profile {name!r} gets its credentials through {', '.join(indirect)}, "
            "which optimizr does not follow (only static keys); export the "
            "credentials it yields as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_SESSION_TOKEN instead"
        )
    missing = [k for k in ("aws_access_key_id", "aws_secret_access_key") if not merged.get(k)]
    if missing:
        raise UsageError(f"AWS profile {name!r} has no {' or '.join(missing)}")
    return Profile(
        name,
        merged["aws_access_key_id"],
        merged["aws_secret_access_key"],
        merged.get("aws_session_token") or None,
        merged.get("region") or None,
        merged.get("endpoint_url") or None,
    )


def _section(path: Path, section: str) -> dict[str, str] | None:
    parser = configparser.RawConfigParser()
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        # The parser's message may quote a line (a secret): only the file and the kind.
        raise UsageError(f"cannot read {path}: {type(exc).__name__}") from None
    if not parser.has_section(section):
        return None
    return {key.lower(): value.strip() for key, value in parser.items(section)}
