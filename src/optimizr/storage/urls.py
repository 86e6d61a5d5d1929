"""SRC and DEST arguments: a local path or an object-store URL, parsed into a :class:`Location`.

Accepted: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix``
(the account comes from ``AZURE_STORAGE_ACCOUNT_NAME``, as obstore reads it),
``memory://prefix`` (tests), ``file:///abs/path`` and plain paths. A malformed URL is
a :class:`~optimizr.errors.UsageError`. Credentials never belong in a URL: one that
carries ``user@`` or a query string is refused, without echoing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from optimizr.errors import UsageError

Scheme = Literal["local", "s3", "gs", "az", "memory"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The naming rules of each service, checked here so a typo fails before any request.
_BUCKET_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "s3": (re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"), "3-63 of a-z 0-9 . -"),
    "gs": (re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"), "3-63 of a-z 0-9 . _ -"),
    "az": (re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$"), "3-63 of a-z 0-9 -"),
}


@dataclass(frozen=True)
class Location:
    """Where a tree lives. ``bucket`` is the S3/GCS bucket or Azure container;
    ``prefix`` the key prefix inside it (no leading or trailing slash, "" for the
    whole bucket); ``path`` the folder of a local location."""

    scheme: Scheme
    bucket: str = ""
    prefix: str = ""
    path: Path | None = None

    @property
    def is_remote(self) -> bool:
        return self.scheme in ("s3", "gs", "az")

    def url(self) -> str:
        """The canonical form, for messages: it carries no credential by construction."""
        if self.scheme == "local":
            return str(self.path)
        if self.scheme == "memory":
            return f"memory://{self.prefix}"
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def is_url(argument: str) -> bool:
    """Does ``argument`` look like a URL (``scheme://``) rather than a path?"""
    return _URL.match(argument) is not None


def parse_location(argument: str) -> Location:
    """Parse a SRC or DEST argument; raise UsageError naming what is wrong."""
    match = _URL.match(argument)
    if match is None:
        if not argument:
            raise UsageError("an empty path is not a location")
        return Location("local", path=Path(argument))
    scheme = match.group(1).lower()
    if scheme == "file":
        return _parse_file(argument)
    if scheme in ("abfs", "abfss", "azure", "adl"):
        raise UsageError(f"{scheme}:// URLs are not accepted: write az://container/prefix")
    if scheme not in ("s3", "gs", "az", "memory"):
        raise UsageError(
            f"unknown URL scheme {scheme}:// (use s3://, gs://, az://, file:// or a plain path)"
        )
    parts = urlsplit(argument)
    if parts.query or parts.fragment or "?" in argument or "#" in argument:
        raise UsageError(f"a {scheme}:// URL takes no query or fragment (credentials go elsewhere)")
    if "@" in parts.netloc:
        # Not echoed: what precedes the @ may be a secret.
        raise UsageError(
            f"a {scheme}:// URL must not carry credentials (user@): use the environment"
        )
    if scheme == "memory":
        return Location("memory", prefix=_clean_prefix(scheme, parts.netloc + parts.path))
    bucket = parts.netloc
    if not bucket:
        raise UsageError(f"{scheme}:// URL without a bucket: write {scheme}://BUCKET/prefix")
    rule, allowed = _BUCKET_RULES[scheme]
    if not rule.match(bucket):
        raise UsageError(f"{scheme}://{bucket}: not a valid bucket or container name ({allowed})")
    remote: Scheme = "s3" if scheme == "s3" else "gs" if scheme == "gs" else "az"
    return Location(remote, bucket=bucket, prefix=_clean_prefix(scheme, parts.path))


def _parse_file(argument: str) -> Location:
    parts = urlsplit(argument)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"file:// URL names host {parts.netloc!r}: only local files are accepted")
    if parts.query or parts.fragment:
        raise UsageError("a file:// URL takes no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise UsageError("a file:// URL needs an absolute path: file:///abs/path")
    return Location("local", path=Path(path))


def _clean_prefix(scheme: str, raw: str) -> str:
    prefix = unquote(raw).strip("/")
    if not prefix:
        return ""
    segments = prefix.split("/")
    if any(s in ("", ".", "..") for s in segments):
        # Object stores take these literally: "a//b" and "a/../b" would be keys
        # no folder tree could mirror, so they are refused rather than guessed at.
        raise UsageError(f"{scheme}:// prefix {prefix!r} has an empty, '.' or '..' segment")
    return prefix
