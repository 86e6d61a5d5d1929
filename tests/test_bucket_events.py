"""The bucket notification parser over real payloads: S3 Records as AWS, MinIO and
Ceph document them, and SeaweedFS filer webhook posts captured from weed 4.48
(tests/data/events/). Whatever comes in, the parser answers and never raises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from optimizr.bucket_events import BucketEvent, parse_document, parse_message

DATA = Path(__file__).parent / "data" / "events"


def aws_record(name: str = "ObjectCreated:Put", key: str = "HappyFace.jpg", **obj: Any) -> dict:
    """A record shaped as the AWS "Event message structure" page's version 2.1 example."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "1970-01-01T00:00:00.000Z",
        "eventName": name,
        "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "testConfigRule",
            "bucket": {
                "name": "amzn-s3-demo-bucket",
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": "arn:aws:s3:::amzn-s3-demo-bucket",
            },
            "object": {
                "key": key,
                "size": 1024,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                "sequencer": "0055AED6DCD90281E5",
                **obj,
            },
        },
    }


def records(*items: dict) -> bytes:
    return json.dumps({"Records": list(items)}).encode()


def test_an_aws_put_is_one_convert_event_with_its_facts() -> None:
    parsed = parse_message(records(aws_record()))
    assert parsed.format == "s3" and not parsed.problems and not parsed.dead
    assert parsed.events == (
        BucketEvent(
            "convert",
            "amzn-s3-demo-bucket",
            "HappyFace.jpg",
            1024,
            "d41d8cd98f00b204e9800998ecf8427e",
            "0055AED6DCD90281E5",
            "s3",
        ),
    )


def test_keys_are_url_decoded_as_a_form_is() -> None:
    # S3 sends the key URL-encoded, a space as "+": "+" itself comes as %2B.
    parsed = parse_message(records(aws_record(key="photos/summer+2024/caf%C3%A9+%2B1.jpg")))
    assert parsed.events[0].key == "photos/summer 2024/café +1.jpg"


def test_a_removal_is_a_remove_event() -> None:
    for name in ("ObjectRemoved:Delete", "ObjectRemoved:DeleteMarkerCreated"):
        (event,) = parse_message(records(aws_record(name))).events
        assert event.action == "remove" and event.key == "HappyFace.jpg"


def test_the_test_event_is_ignored_not_dead() -> None:
    # What S3 sends once when a notification configuration is set.
    body = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2014-10-13T15:57:02.089Z",
        "Bucket": "amzn-s3-demo-bucket",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }
    parsed = parse_message(json.dumps(body))
    assert parsed.events == () and parsed.ignored == ("s3:TestEvent",) and not parsed.dead


def test_minio_webhook_body_with_its_s3_prefix_and_user_metadata() -> None:
    # MinIO's bucket notification guide: EventName and Key beside Records, names with "s3:".
    record = aws_record("s3:ObjectCreated:Put", "myphoto.jpg", contentType="image/jpeg")
    record["eventVersion"], record["eventSource"] = "2.0", "minio:s3"
    record["s3"]["object"]["userMetadata"] = {"content-type": "image/jpeg"}
    body = {"EventName": "s3:ObjectCreated:Put", "Key": "images/myphoto.jpg", "Records": [record]}
    (event,) = parse_message(json.dumps(body)).events
    assert (event.action, event.key, event.size) == ("convert", "myphoto.jpg", 1024)


def test_ceph_sends_the_size_as_text_and_metadata_as_a_list() -> None:
    # Ceph RGW's event record: "size":"1024", "metadata":[{"key","val"}], version 2.1/2.2.
    record = aws_record("ObjectCreated:Put", "myimage1.jpg", size="1024", metadata=[], tags=[])
    record["eventVersion"], record["eventSource"] = "2.2", "ceph:s3"
    (event,) = parse_message(records(record)).events
    assert event.size == 1024 and event.key == "myimage1.jpg"


def test_an_optimizr_output_in_the_bucket_is_never_an_event() -> None:
    minio = aws_record(key="a.webp", userMetadata={"X-Amz-Meta-Optimizr-Output": "1.0"})
    ceph = aws_record(key="b.webp", metadata=[{"key": "x-amz-meta-optimizr-output", "val": "1"}])
    parsed = parse_message(records(minio, ceph))
    assert parsed.events == () and len(parsed.ignored) == 2 and not parsed.dead
    assert all("optimizr output" in why for why in parsed.ignored)


def test_other_event_kinds_are_ignored() -> None:
    parsed = parse_message(records(aws_record("s3:ObjectAccessed:Get"), aws_record()))
    assert len(parsed.events) == 1 and "ObjectAccessed:Get" in parsed.ignored[0]


def test_an_s3_document_inside_an_sns_envelope() -> None:
    envelope = {
        "Type": "Notification",
        "MessageId": "m-1",
        "Message": records(aws_record()).decode(),
    }
    (event,) = parse_message(json.dumps(envelope)).events
    assert event.key == "HappyFace.jpg"


def test_a_bad_record_among_good_ones_is_a_problem_not_the_whole_message() -> None:
    old = aws_record()
    old["eventVersion"] = "1.0"
    parsed = parse_message(records(aws_record(key="ok.jpg"), old, {"eventVersion": "2.1"}))
    assert [e.key for e in parsed.events] == ["ok.jpg"]
    assert not parsed.dead
    assert parsed.problems[0] == "record 1: eventVersion '1.0': only 2.x is understood"
    assert parsed.problems[1] == "record 2: no eventName"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'"Records"', "a JSON str, not an object"),
        (b'{"hello": "world"}', "not a bucket notification (no Records; keys: hello)"),
        (b'{"Records": {"a": 1}}', "Records is a JSON dict, not a list"),
        (b'{"Records": [7]}', "record 0: a JSON int, not an object"),
        (b'{"Records": [{"eventVersion": "2.1", "eventName": "ObjectCreated:Put"}]}', "no s3"),
        (b'{"Type": "Notification", "Message": "{nope"}', "SNS Message is not JSON"),
        (b'{"key": "/buckets/b/x.jpg", "message": {}}', "neither old_entry nor new_entry"),
        (b'{"key": "/b/x", "message": {"new_entry": 3}}', "new_entry is not an object"),
    ],
)
def test_garbage_is_a_dead_letter_with_its_reason(body: bytes, problem: str) -> None:
    parsed = parse_message(body)
    assert parsed.dead and parsed.events == ()
    assert problem in parsed.problems[0]


def test_whatever_the_json_the_parser_never_raises() -> None:
    weird: list[Any] = [None, 0, 1.5, True, [], {}, "", {"Records": None}, {"Records": [None]}]
    record = aws_record()
    for field in ("s3", "eventName", "eventVersion"):
        for value in weird:
            broken = json.loads(json.dumps(record))
            broken[field] = value
            parse_document({"Records": [broken]})
    for field in ("key", "size", "eTag", "sequencer", "userMetadata", "metadata"):
        for value in weird:
            broken = json.loads(json.dumps(record))
            broken["s3"]["object"][field] = value
            parse_document({"Records": [broken]})
    post = json.loads((DATA / "seaweedfs-create-file.json").read_text())
    for field in ("name", "attributes", "extended", "is_directory"):
        for value in weird:
            broken = json.loads(json.dumps(post))
            broken["message"]["new_entry"][field] = value
            parse_document(broken)
    for value in weird:
        parse_document(value)
        parse_document({"key": "/buckets/b/k", "message": {"new_entry": value, "old_entry": value}})


# -- SeaweedFS -----------------------------------------------------------------------------


def seaweed(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_a_seaweedfs_put_posted_by_the_filer() -> None:
    parsed = parse_message(seaweed("seaweedfs-create-file.json"))
    assert parsed.format == "seaweedfs" and not parsed.problems
    (event,) = parsed.events
    # The filer path is not URL-encoded; /buckets/<bucket>/ is the S3 bucket.
    assert (event.action, event.bucket, event.key) == (
        "convert",
        "optimizr-test",
        "photos/a b+c.jpg",
    )
    assert event.size == 103
    # The S3 ETag the gateway keeps in the entry's extended attributes (base64 bytes).
    assert event.etag == "bb55adcef0130089ee9f93dd03491db1"
    assert event.sequencer == f"{1796165814 * 1_000_000_000:020d}"


def test_a_seaweedfs_folder_is_ignored() -> None:
    parsed = parse_message(seaweed("seaweedfs-create-folder.json"))
    assert parsed.events == () and parsed.ignored == ("/buckets/optimizr-test/photos: a folder",)


def test_a_seaweedfs_delete() -> None:
    (event,) = parse_message(seaweed("seaweedfs-delete-file.json")).events
    assert (event.action, event.bucket, event.key) == ("remove", "optimizr-test", "photos/x.jpg")
    assert event.etag == "c03bf8952e9cc42af91ccd2072dccd28"


def test_a_seaweedfs_rename_removes_the_old_name_and_converts_the_new() -> None:
    # types.go detectEventType: both entries, and the parent or the name changed.
    post = json.loads(seaweed("seaweedfs-create-file.json"))
    entry = post["message"]["new_entry"]
    post["event_type"] = "rename"
    post["key"] = "/buckets/optimizr-test/incoming/tmp123"
    post["message"]["old_entry"] = {**entry, "name": "tmp123"}
    post["message"]["new_parent_path"] = "/buckets/optimizr-test/photos"
    events = parse_document(post).events
    assert [(e.action, e.key) for e in events] == [
        ("remove", "incoming/tmp123"),
        ("convert", "photos/a b+c.jpg"),
    ]


def test_a_seaweedfs_update_in_place_is_one_convert() -> None:
    post = json.loads(seaweed("seaweedfs-create-file.json"))
    post["event_type"] = "update"
    post["message"]["old_entry"] = post["message"]["new_entry"]
    (event,) = parse_document(post).events
    assert (event.action, event.key) == ("convert", "photos/a b+c.jpg")


def test_a_seaweedfs_output_carrying_the_marker_is_ignored() -> None:
    post = json.loads(seaweed("seaweedfs-create-file.json"))
    # The S3 gateway stores user metadata as X-Amz-Meta-* extended attributes.
    post["message"]["new_entry"]["extended"]["X-Amz-Meta-Optimizr-Output"] = "MC4x"
    parsed = parse_document(post)
    assert parsed.events == () and "optimizr output" in parsed.ignored[0]


def test_a_filer_path_outside_the_buckets_folder() -> None:
    post = json.loads(seaweed("seaweedfs-create-file.json"))
    post["key"] = "/photos/a.jpg"
    post["message"]["new_entry"]["name"] = "a.jpg"
    post["message"]["new_parent_path"] = "/photos"
    (event,) = parse_document(post).events
    assert (event.bucket, event.key) == ("", "photos/a.jpg")
