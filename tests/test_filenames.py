"""File names as the filesystem gives them: bytes, not always UTF-8, and not always
printable. They must round-trip exactly (listing, manifest, output name, summary,
logs, status, failed.jsonl) and be shown escaped wherever a person reads them."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from click.testing import Result
from PIL import Image

from conftest import age, manifest_rows, photo_array, save_jpeg, save_png
from optimizr.config import EncodeOptions
from optimizr.encode import encode_webp
from optimizr.metrics.progress import TerminalProgress
from optimizr.results import Result as FileResult

SCHEMA = json.loads(
    resources.files("optimizr").joinpath("schemas/summary-2.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())

#: Latin-1 names as old archives and Samba shares hold them: not UTF-8.
CAFE = b"caf\xe9.jpg"
DIR = b"d\xfcr"
BAD = b"bad\xff.jpg"
#: Valid UTF-8, but a terminal would obey them.
COLOURED = "esc\x1b[31mred.jpg"
NEWLINE = "new\nline.jpg"
MARKUP = "[red]x.jpg"
BAD_COLOURED = "bad\x1b[1m.jpg"


def fs(name: bytes) -> str:
    """A name as os.scandir gives it: str with the undecodable bytes as surrogates."""
    return os.fsdecode(name)


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """optimizr in its own process, output kept as the bytes it wrote."""
    command = [sys.executable, "-m", "optimizr", *(os.fsencode(a) for a in args)]
    return subprocess.run(command, capture_output=True, timeout=timeout, check=False)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def assert_valid_unicode(doc: Any) -> None:
    """No lone surrogate anywhere: such a string is not text any JSON reader accepts."""
    for text in strings(doc):
        text.encode("utf-8")  # raises on a surrogate


def exact(item: dict[str, Any], field: str = "path") -> bytes:
    """The exact bytes a JSON item names: field_bytes (base64) when present, else field."""
    if f"{field}_bytes" in item:
        return base64.b64decode(item[f"{field}_bytes"], validate=True)
    return os.fsencode(item[field])


@pytest.fixture
def latin1_tree(tmp_path: Path) -> tuple[Path, Path]:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / fs(CAFE), photo_array(320, 240, seed=1))
    save_jpeg(src / fs(DIR) / "inner.jpg", photo_array(320, 240, seed=2))
    save_jpeg(src / "plain.jpg", photo_array(320, 240, seed=3))
    age(src)
    return src, dest


# -- item 1: names that are not UTF-8 -------------------------------------------------------


def test_a_name_that_is_not_utf8_converts_resumes_and_reports(
    latin1_tree: tuple[Path, Path],
) -> None:
    src, dest = latin1_tree
    first = run_cli("convert", src, dest)
    assert first.returncode == 0, first.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in first.stderr
    # The output carries the source's exact bytes, with .webp.
    assert sorted(os.listdir(os.fsencode(dest))) == sorted(
        [b".optimizr", b"caf\xe9.webp", DIR, b"optimizr-summary.json", b"plain.webp"]
    )
    assert os.listdir(os.fsencode(dest) + b"/" + DIR) == [b"inner.webp"]
    summary = json.loads((dest / "optimizr-summary.json").read_bytes().decode("utf-8"))
    errors = list(VALIDATOR.iter_errors(summary))
    assert not errors, errors
    assert_valid_unicode(summary)
    assert summary["files"]["converted"] == 3 and summary["exit_code"] == 0
    saved = {exact(item): item for item in summary["largest_savings"]}
    assert set(saved) == {CAFE, DIR + b"/inner.jpg", b"plain.jpg"}
    assert saved[CAFE]["path"] == "caf\\xe9.jpg"  # the display form, for people
    assert "path_bytes" not in saved[b"plain.jpg"]  # UTF-8 names need no second form
    rows = manifest_rows(dest)
    assert set(rows) == {fs(CAFE), fs(DIR) + "/inner.jpg", "plain.jpg"}
    assert rows[fs(CAFE)]["output"] == fs(b"caf\xe9.webp")

    again = run_cli("convert", src, dest)
    assert again.returncode == 0, again.stderr.decode("utf-8", "replace")
    summary = json.loads((dest / "optimizr-summary.json").read_bytes().decode("utf-8"))
    assert summary["files"]["skipped_by_reason"] == {"up to date": 3}

    status = run_cli("status", dest)
    assert status.returncode == 0, status.stderr.decode("utf-8", "replace")
    assert b"3 done" in status.stdout
    report = run_cli("status", dest, "--json")
    assert report.returncode == 0
    assert json.loads(report.stdout.decode("utf-8"))["by_status"]["done"] == 3


def test_a_failed_name_that_is_not_utf8_survives_failed_list_and_rebuild(
    latin1_tree: tuple[Path, Path],
) -> None:
    src, dest = latin1_tree
    (src / fs(DIR) / fs(BAD)).write_bytes(b"not a jpeg at all" * 20)
    age(src)
    first = run_cli("convert", src, dest)
    assert first.returncode == 1
    assert b"Traceback" not in first.stderr
    # The person sees the name escaped, on one line.
    assert b"FAILED d\\xfcr/bad\\xff.jpg: not an image" in first.stderr
    lines = (dest / ".optimizr/failed.jsonl").read_bytes().decode("utf-8").splitlines()
    [item] = [json.loads(line) for line in lines]
    assert item["path"] == "d\\xfcr/bad\\xff.jpg"
    assert exact(item) == DIR + b"/" + BAD
    summary = json.loads((dest / "optimizr-summary.json").read_bytes().decode("utf-8"))
    [failure] = summary["not_converted"]
    assert exact(failure) == DIR + b"/" + BAD and failure["reason"] == "not an image"
    [group] = summary["failures_by_reason"]
    assert exact(group["examples"][0]) == DIR + b"/" + BAD
    assert not list(VALIDATOR.iter_errors(summary))
    status = run_cli("status", dest)
    assert b"e.g. d\\xfcr/bad\\xff.jpg" in status.stdout
    as_json = json.loads(run_cli("status", dest, "--json").stdout.decode("utf-8"))
    [group] = as_json["failures"]
    assert exact(group, "example") == DIR + b"/" + BAD

    # The manifest is lost: the rebuild brings the failure back from failed.jsonl
    # under its exact key, so the walk's file matches it and it is not retried.
    (dest / ".optimizr/manifest.sqlite").write_bytes(b"garbage" * 100)
    rebuilt = run_cli("convert", src, dest, "--rebuild-manifest")
    assert b"Traceback" not in rebuilt.stderr
    summary = json.loads((dest / "optimizr-summary.json").read_bytes().decode("utf-8"))
    assert summary["files"]["known_failed"] == 1
    assert summary["manifest"]["adopted"] == 3
    rows = manifest_rows(dest)
    assert rows[fs(DIR) + "/" + fs(BAD)]["status"] == "failed"


def test_json_logs_name_a_non_utf8_file_exactly_and_stay_utf8(
    latin1_tree: tuple[Path, Path],
) -> None:
    src, dest = latin1_tree
    (src / fs(BAD)).write_bytes(b"not a jpeg at all" * 20)
    (src / COLOURED).write_bytes(b"also not a jpeg" * 20)
    age(src)
    proc = run_cli("convert", src, dest, "--log-format", "json")
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stderr.decode("utf-8").splitlines()]
    assert_valid_unicode(events)
    images = {exact(e): e for e in events if e["event"] == "image"}
    assert set(images) == {CAFE, DIR + b"/inner.jpg", b"plain.jpg", BAD, COLOURED.encode()}
    assert images[CAFE]["path"] == "caf\\xe9.jpg"
    assert exact(images[CAFE], "output") == b"caf\xe9.webp"
    assert images[BAD]["status"] == "failed" and images[BAD]["path"] == "bad\\xff.jpg"
    # A valid UTF-8 name is given exactly (JSON escapes its control characters itself).
    assert images[COLOURED.encode()]["path"] == COLOURED
    assert "path_bytes" not in images[COLOURED.encode()]


def _formats(root: Path) -> dict[str, Path]:
    """One small file per format libvips decodes, drawn with Pillow."""
    pixels = photo_array(300, 200, seed=5)
    made = {
        "jpeg": save_jpeg(root / "x.jpg", pixels),
        "png": save_png(root / "x.png", pixels),
    }
    Image.fromarray(pixels).save(root / "x.webp", quality=90)
    Image.fromarray(pixels).save(root / "x.tif")
    frames = [Image.fromarray(np.roll(pixels, 20 * i, axis=1)) for i in range(3)]
    frames[0].save(root / "x.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: decoded with random access, then turned
    Image.fromarray(pixels).save(root / "turned.jpg", quality=92, exif=exif)
    made.update(webp=root / "x.webp", tiff=root / "x.tif", gif=root / "x.gif")
    made["orientation"] = root / "turned.jpg"
    return made


@pytest.mark.parametrize("max_width", [None, 120])
def test_every_decoder_reads_a_non_utf8_path_as_it_reads_a_plain_one(
    tmp_path: Path, max_width: int | None
) -> None:
    from optimizr.probe import probe

    options = EncodeOptions(max_width=max_width)
    for kind, plain in _formats(tmp_path).items():
        latin1 = plain.with_name(fs(b"\xe9t\xe9-" + os.fsencode(plain.name)))
        latin1.write_bytes(plain.read_bytes())
        want, got = encode_webp(str(plain), options), encode_webp(str(latin1), options)
        assert got.webp == want.webp, kind
        assert (got.facts.width_out, got.facts.frames) == (want.facts.width_out, want.facts.frames)
        header = probe(str(latin1))
        assert header is not None and header == probe(str(plain)), kind


@pytest.mark.parametrize("max_width", [None, 60])
def test_a_truncated_file_still_fails_when_read_through_a_descriptor(
    tmp_path: Path, max_width: int | None
) -> None:
    """Shrink-on-load from a descriptor must keep the loader's strictness (fail_on)."""
    from optimizr.errors import TruncatedImage

    whole = save_jpeg(tmp_path / "whole.jpg", photo_array(320, 240)).read_bytes()
    cut = tmp_path / fs(b"cut\xe9.jpg")
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(TruncatedImage):
        encode_webp(str(cut), EncodeOptions(max_width=max_width))


def test_a_name_libvips_would_parse_as_load_options_is_just_a_name(tmp_path: Path) -> None:
    # libvips reads "name[options]" off a file name: "scan[1]" was "does not exist".
    src = save_jpeg(tmp_path / "scan[1]", photo_array(96, 64))
    assert encode_webp(str(src), EncodeOptions()).facts.width_out == 96


# -- item 10: names that a terminal would obey ------------------------------------------------


def test_printable_escapes_what_a_terminal_or_log_line_would_obey() -> None:
    from optimizr.filenames import printable

    assert printable("photo.jpg") == "photo.jpg"
    assert printable("été/日本/👩‍👩‍👧.png") == "été/日本/👩‍👩‍👧.png"  # text is left alone
    assert printable(COLOURED) == "esc\\x1b[31mred.jpg"
    assert printable(NEWLINE) == "new\\nline.jpg"
    assert printable("tab\there\rcr\x00nul\x7fdel") == "tab\\there\\rcr\\x00nul\\x7fdel"
    assert printable("c1\x9bcsi\x85nel") == "c1\\u009bcsi\\u0085nel"
    assert printable("ls\u2028ps\u2029") == "ls\\u2028ps\\u2029"
    assert printable("gpj.\u202eexe") == "gpj.\\u202eexe"  # a right-to-left override
    assert printable(fs(CAFE)) == "caf\\xe9.jpg"  # the byte that is not UTF-8
    for text in (COLOURED, NEWLINE, fs(CAFE), "gpj.\u202eexe"):
        once = printable(text)
        assert once.isprintable() and printable(once) == once


def test_json_forms_round_trip_the_exact_name() -> None:
    from optimizr.filenames import key_from_fields, name_fields

    for key in ("plain.jpg", COLOURED, fs(DIR + b"/" + BAD)):
        fields = name_fields(key)
        json.dumps(fields).encode("ascii")
        assert_valid_unicode(fields)
        assert key_from_fields(json.loads(json.dumps(fields))) == key
    assert name_fields(COLOURED) == {"path": COLOURED}
    # Only the bytes that are not UTF-8 are escaped: JSON escapes the rest itself.
    assert name_fields(fs(b"bad\xff\x1b.jpg"))["path"] == "bad\\xff\x1b.jpg"
    assert name_fields(fs(CAFE), "output") == {
        "output": "caf\\xe9.jpg",
        "output_bytes": base64.b64encode(CAFE).decode(),
    }


def test_names_print_escaped_on_one_line_each(cli: Callable[..., Result], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i, name in enumerate((COLOURED, NEWLINE, MARKUP)):
        save_jpeg(src / name, photo_array(160, 120, seed=i))
    (src / BAD_COLOURED).write_bytes(b"not a jpeg" * 20)
    age(src)
    result = cli("convert", src, dest, "-v", "--no-progress")
    assert result.exit_code == 1
    out = result.output
    assert "\x1b" not in out
    lines = out.splitlines()
    assert "converted esc\\x1b[31mred.jpg -> esc\\x1b[31mred.webp (" in out
    assert any(line.startswith("converted new\\nline.jpg -> new\\nline.webp (") for line in lines)
    assert any(line.startswith("converted [red]x.jpg -> [red]x.webp (") for line in lines)
    assert "FAILED bad\\x1b[1m.jpg: not an image" in out
    # and the files themselves keep their names
    assert (dest / "esc\x1b[31mred.webp").is_file() and (dest / "new\nline.webp").is_file()

    status = cli("status", dest)
    assert status.exit_code == 0 and "\x1b" not in status.output
    assert "e.g. bad\\x1b[1m.jpg" in status.output


def test_the_live_display_prints_names_escaped() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(live=True, verbose=True, stream=stream)
    with progress:
        progress.found(3)
        progress.finished(FileResult(COLOURED, "failed", "corrupt", "bad data"))
        progress.finished(FileResult("x\\[red]y.jpg", "failed", "corrupt", "bad data"))
        progress.finished(FileResult(NEWLINE, "converted", None, "", "new\nline.webp", 10, 5))
    text = stream.getvalue()
    assert "FAILED esc\\x1b[31mred.jpg: corrupt" in text
    assert "FAILED x\\[red]y.jpg: corrupt" in text  # a backslash does not unlock markup
    assert "converted new\\nline.jpg -> new\\nline.webp" in text
    assert COLOURED not in text and NEWLINE not in text


def test_errors_naming_src_print_escaped(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("convert", tmp_path / "no\x1b[31msuch", tmp_path / "dest")
    assert result.exit_code == 2
    assert "SRC does not exist" in result.output and "no\\x1b[31msuch" in result.output
    assert "\x1b" not in result.output


def test_text_logs_keep_one_event_on_one_line() -> None:
    from optimizr.metrics.logs import configure_logging

    stream = io.StringIO()
    with configure_logging("text", "info", stream) as logger:
        logger.warning("could not read %s", "new\nline\x1b[31m.jpg")
        logging.getLogger("somelib").warning("%s", fs(CAFE))
    assert stream.getvalue().splitlines() == [
        "warning: could not read new\\nline\\x1b[31m.jpg",
        "warning: caf\\xe9.jpg",
    ]


def test_the_html_report_shows_control_characters(tmp_path: Path) -> None:
    from optimizr.report import render_report

    name = "esc\x1b[31m<b>.jpg\nsecond"
    page = render_report(
        {
            "schema": "optimizr-summary/2",
            "files": {"failed": 1},
            "not_converted": [
                {"path": name, "status": "failed", "reason": "corrupt", "message": "m\x07"}
            ],
        }
    )
    assert "\x1b" not in page and "\x07" not in page
    assert "esc\\x1b[31m&lt;b&gt;.jpg\\nsecond" in page and "m\\x07" in page


def test_the_manifest_keeps_non_utf8_names_as_blobs(tmp_path: Path) -> None:
    """Below the CLI: the row's key columns hold the exact bytes, and SQL finds them."""
    from optimizr.manifest import Manifest

    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = Manifest.open(dest)
    key = fs(DIR + b"/" + CAFE)
    manifest.record(key, size=1, mtime_ns=2, checked_ns=3, fingerprint="f", status="done",
                    output=fs(DIR + b"/caf\xe9.webp"), output_size=4,
                    message=f"{key} is fine")  # fmt: skip
    manifest.close()
    conn = sqlite3.connect(dest / ".optimizr/manifest.sqlite")
    try:
        [(directory, name, output)] = conn.execute("SELECT dir, name, output FROM files")
    finally:
        conn.close()
    assert (directory, name, output) == (DIR, CAFE, DIR + b"/caf\xe9.webp")
    manifest = Manifest.open(dest)
    try:
        assert manifest.directories() == [fs(DIR)]
        [row] = manifest.rows_in(fs(DIR)).values()
        assert row.key == key and row.output == fs(DIR + b"/caf\xe9.webp")
        assert row.message == "d\\xfcr/caf\\xe9.jpg is fine"
        # --if-exists asks who wrote a file in DEST: found by its exact bytes too.
        assert manifest.owner_of(fs(DIR + b"/caf\xe9.webp")) == key
        assert manifest.owner_of(fs(DIR + b"/other\xe9.webp")) is None
        manifest.forget(key)
        assert manifest.rows_in(fs(DIR)) == {}
    finally:
        manifest.close()
