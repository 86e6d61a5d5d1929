"""Bucket notifications -> what to do: one parser for the formats stores send.

:func:`parse_message` takes the raw body of one message (an HTTP webhook POST, or
later one SQS / NATS / Redis message) and returns a :class:`Parsed`: the object
events it carries (convert ``bucket/key``, or remove its output), the records it
understood and ignores on purpose (a test event, a folder, an access event), and
the problems that make it, or one of its records, a dead letter. It never raises:
whatever arrives, the service gets an answer it can act on.

Two formats:

* **S3 ``Records``** (AWS S3, MinIO, Ceph RGW; through SNS too). Facts used, from
  the AWS "Event message structure" page (docs.aws.amazon.com/AmazonS3/latest/
  userguide/notification-content-structure.html): ``eventVersion`` is 2.x (2.1 to
  2.6 so far, all compatible), ``eventName`` is ``ObjectCreated:*`` /
  ``ObjectRemoved:*`` (MinIO and some Ceph versions prefix ``s3:``), the key in
  ``s3.object.key`` is URL-encoded as in an HTML form (a space is ``+``), hence
  ``unquote_plus``; ``size``, ``eTag``, ``versionId``, ``sequencer`` (hex, orders
  the events of one key). A bucket given a notification configuration first gets
  ``{"Event": "s3:TestEvent", ...}`` with no Records. Ceph (docs.ceph.com "Bucket
  Notifications", event record) sends ``size`` as a string and user metadata as a
  list ``[{"key", "val"}]``; MinIO (its bucket notification guide) wraps Records
  in ``{"EventName", "Key", "Records"}`` and adds ``userMetadata`` as a map.
* **SeaweedFS filer webhook** (``[notification.webhook]`` in notification.toml).
  Facts used, from seaweedfs/seaweedfs at cc8364a: weed/notification/webhook/
  http.go posts ``{"key": <full filer path>, "event_type": ..., "message": <the
  filer_pb.EventNotification marshalled with encoding/json>}`` as application/json,
  and retries a non-2xx answer (webhook_queue.go: watermill Retry middleware,
  max_retries, then its own dead-letter topic); types.go detectEventType names
  ``create`` (new_entry only), ``delete`` (old_entry only), ``rename`` (both, and
  the parent path or name changed) and ``update``. weed/pb/filer.proto gives the
  snake_case field names (encoding/json uses the protobuf struct's json tags):
  ``old_entry`` / ``new_entry`` (``name``, ``is_directory``, ``attributes.file_size``,
  ``attributes.mtime`` seconds + ``mtime_ns``, ``attributes.md5``, ``extended``: a
  map of bytes, so base64 in JSON), ``new_parent_path``. S3 buckets live under the
  filer's ``/buckets/<bucket>/``; the S3 gateway keeps the ETag in
  ``extended["Seaweed-X-Amz-ETag"]`` and user metadata as ``X-Amz-Meta-*`` keys
  (seen in real posts of weed 4.48, see tests/test_bucket_events.py).

An output optimizr wrote to a bucket carries the user metadata ``optimizr-output``
(storage.base.OUTPUT_METADATA); when the event shows it (MinIO's userMetadata,
Ceph's metadata, SeaweedFS's extended) the event is ignored as an own output.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_plus

from optimizr.storage.base import OUTPUT_METADATA

Action = Literal["convert", "remove"]

#: The folder of the SeaweedFS filer under which each S3 bucket is a folder (its
#: default, ``filer.toml``'s ``buckets_folder``).
SEAWEED_BUCKETS = "/buckets/"

#: The user-metadata names the output marker may take on the wire.
_MARKERS = {
    OUTPUT_METADATA,
    f"x-amz-meta-{OUTPUT_METADATA}",
    OUTPUT_METADATA.replace("-", "_"),
}


@dataclass(frozen=True)
class BucketEvent:
    """One object event: convert ``key`` (created or replaced), or remove its output."""

    action: Action
    bucket: str
    key: str
    size: int | None = None
    etag: str | None = None
    #: Orders the events of one key, where the store says (S3's hex sequencer;
    #: SeaweedFS: the mtime in ns). Text, compared only between events of one key.
    sequencer: str | None = None
    #: "s3" or "seaweedfs": which format it came in.
    format: str = "s3"


@dataclass(frozen=True)
class Parsed:
    """What one message says."""

    events: tuple[BucketEvent, ...] = ()
    #: Records understood and deliberately passed over, each with why.
    ignored: tuple[str, ...] = ()
    #: Why the message (or some of its records) cannot be used: a dead letter.
    problems: tuple[str, ...] = ()
    format: str = "unknown"

    @property
    def dead(self) -> bool:
        """Nothing usable and something wrong: the whole message is a dead letter."""
        return bool(self.problems) and not self.events and not self.ignored


@dataclass
class _Builder:
    format: str
    events: list[BucketEvent] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def done(self) -> Parsed:
        return Parsed(tuple(self.events), tuple(self.ignored), tuple(self.problems), self.format)


def parse_message(body: bytes | str) -> Parsed:
    """The events in one message body, whatever it holds (never raises)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return Parsed(problems=(f"not JSON: {_short(exc)}",))
    return parse_document(doc)


def parse_document(doc: Any, *, depth: int = 0) -> Parsed:
    """The events in a decoded JSON document (see :func:`parse_message`)."""
    if not isinstance(doc, dict):
        return Parsed(problems=(f"a JSON {type(doc).__name__}, not an object",))
    if "Records" in doc:
        return _s3_records(doc["Records"])
    if doc.get("Event") == "s3:TestEvent":
        # Sent once when a notification configuration is set: nothing happened.
        return Parsed(ignored=("s3:TestEvent",), format="s3")
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str) and depth == 0:
        # S3 -> SNS -> SQS/HTTP: the S3 document is the SNS envelope's Message.
        try:
            inner = json.loads(doc["Message"])
        except ValueError as exc:
            return Parsed(problems=(f"SNS Message is not JSON: {_short(exc)}",))
        return parse_document(inner, depth=1)
    if isinstance(doc.get("key"), str) and isinstance(doc.get("message"), dict):
        return _seaweed(doc)
    keys = ", ".join(sorted(str(k) for k in doc)[:6]) or "none"
    return Parsed(problems=(f"not a bucket notification (no Records; keys: {keys})",))


# -- S3 Records --------------------------------------------------------------------------


def _s3_records(records: Any) -> Parsed:
    out = _Builder("s3")
    if not isinstance(records, list):
        out.problems.append(f"Records is a JSON {type(records).__name__}, not a list")
        return out.done()
    if not records:
        out.ignored.append("no records")
    for index, record in enumerate(records):
        problem = _s3_record(record, out)
        if problem is not None:
            out.problems.append(f"record {index}: {problem}")
    return out.done()


def _s3_record(record: Any, out: _Builder) -> str | None:
    """Adds the record's event (or why it is ignored) to ``out``; returns a problem."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    version = record.get("eventVersion")
    if not isinstance(version, str) or not version.startswith("2."):
        return f"eventVersion {version!r}: only 2.x is understood"
    name = record.get("eventName")
    if not isinstance(name, str):
        return "no eventName"
    kind = name.removeprefix("s3:")
    s3 = record.get("s3")
    if not isinstance(s3, dict):
        return "no s3 object"
    bucket, obj = s3.get("bucket"), s3.get("object")
    if not isinstance(bucket, dict) or not isinstance(bucket.get("name"), str):
        return "no s3.bucket.name"
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not obj["key"]:
        return "no s3.object.key"
    key = unquote_plus(obj["key"])
    if kind.startswith("ObjectCreated:"):
        action: Action = "convert"
    elif kind.startswith("ObjectRemoved:"):
        action = "remove"
    else:
        out.ignored.append(f"{name} {key}: not an object creation or removal")
        return None
    if action == "convert" and _marked(_s3_metadata(obj)):
        out.ignored.append(f"{key}: an optimizr output (it carries {OUTPUT_METADATA})")
        return None
    try:
        size = _int(obj.get("size"))
    except ValueError:
        return f"s3.object.size {obj.get('size')!r} is not a number"
    etag = obj.get("eTag")
    sequencer = obj.get("sequencer")
    out.events.append(
        BucketEvent(
            action,
            bucket["name"],
            key,
            size,
            etag.strip('"') if isinstance(etag, str) and etag else None,
            sequencer if isinstance(sequencer, str) and sequencer else None,
            "s3",
        )
    )
    return None


def _s3_metadata(obj: Mapping[str, Any]) -> dict[str, str]:
    """User metadata in an S3 record: MinIO's map, or Ceph's list of {key, val}."""
    found: dict[str, str] = {}
    meta = obj.get("userMetadata")
    if isinstance(meta, dict):
        found.update({str(k): str(v) for k, v in meta.items()})
    listed = obj.get("metadata")
    if isinstance(listed, list):
        for item in listed:
            if isinstance(item, dict) and "key" in item:
                found[str(item["key"])] = str(item.get("val", ""))
    return found


# -- SeaweedFS -----------------------------------------------------------------------------


def _seaweed(doc: dict[str, Any]) -> Parsed:
    out = _Builder("seaweedfs")
    path, event_type, message = doc["key"], doc.get("event_type"), doc["message"]
    old, new = message.get("old_entry"), message.get("new_entry")
    if old is not None and not isinstance(old, dict):
        out.problems.append("message.old_entry is not an object")
    if new is not None and not isinstance(new, dict):
        out.problems.append("message.new_entry is not an object")
    if out.problems:
        return out.done()
    if old is None and new is None:
        out.problems.append(f"{path}: neither old_entry nor new_entry")
        return out.done()
    if (new or old or {}).get("is_directory"):
        out.ignored.append(f"{path}: a folder")
        return out.done()
    parent = message.get("new_parent_path")
    if new is not None:
        name = new.get("name")
        if not isinstance(name, str) or not name:
            out.problems.append(f"{path}: new_entry has no name")
            return out.done()
        where = parent if isinstance(parent, str) and parent else path.rpartition("/")[0]
        new_path = f"{where.rstrip('/')}/{name}"
        if old is not None and new_path != path:
            # A rename (event_type "rename"): the old name's output goes, the new converts.
            _seaweed_event(out, "remove", path, old)
        _seaweed_event(out, "convert", new_path, new)
    else:
        _seaweed_event(out, "remove", path, old)
    if event_type is not None and not isinstance(event_type, str):
        out.problems.append(f"event_type {event_type!r} is not text")
    return out.done()


def _seaweed_event(out: _Builder, action: Action, path: str, entry: dict[str, Any]) -> None:
    bucket, key = _bucket_and_key(path)
    if not key:
        out.ignored.append(f"{path}: a bucket, not an object")
        return
    extended = entry.get("extended")
    metadata = _seaweed_extended(extended) if isinstance(extended, dict) else {}
    if action == "convert" and _marked(metadata):
        out.ignored.append(f"{key}: an optimizr output (it carries {OUTPUT_METADATA})")
        return
    attributes = entry.get("attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    try:
        size = _int(attributes.get("file_size", 0 if action == "convert" else None))
        mtime = _int(attributes.get("mtime"))
        mtime_ns = _int(attributes.get("mtime_ns")) or 0
    except ValueError:
        out.problems.append(f"{path}: attributes are not numbers")
        return
    etag = metadata.get("Seaweed-X-Amz-ETag") or _md5_hex(attributes.get("md5"))
    sequencer = None if mtime is None else f"{mtime * 1_000_000_000 + mtime_ns:020d}"
    out.events.append(BucketEvent(action, bucket, key, size, etag, sequencer, "seaweedfs"))


def _bucket_and_key(path: str) -> tuple[str, str]:
    """``/buckets/b/a/x.jpg`` -> (``b``, ``a/x.jpg``); a path outside the buckets
    folder is a key of bucket "" (the filer used as a file system)."""
    if path.startswith(SEAWEED_BUCKETS):
        bucket, _, key = path[len(SEAWEED_BUCKETS) :].partition("/")
        return bucket, key
    return "", path.lstrip("/")


def _seaweed_extended(extended: dict[str, Any]) -> dict[str, str]:
    """The filer's extended attributes: bytes values, base64 in the JSON."""
    found: dict[str, str] = {}
    for name, value in extended.items():
        if not isinstance(value, str):
            continue
        try:
            found[str(name)] = base64.b64decode(value, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            found[str(name)] = value
    return found


def _md5_hex(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None


# -- helpers -------------------------------------------------------------------------------


def _marked(metadata: Mapping[str, str]) -> bool:
    return any(name.lower() in _MARKERS for name in metadata)


def _int(value: Any) -> int | None:
    """A count sent as a number or (Ceph) as text; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(value)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
