"""File names as the filesystem gives them: bytes, not always UTF-8, and not always
printable. They must be shown escaped wherever a person reads them."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

from click.testing import Result

from conftest import age, photo_array, save_jpeg
from optimizr.metrics.progress import TerminalProgress
from optimizr.results import Result as FileResult

#: Latin-1 names as old archives and Samba shares hold them: not UTF-8.
CAFE = b"caf\xe9.jpg"
#: Valid UTF-8, but a terminal would obey them.
COLOURED = "esc\x1b[31mred.jpg"
NEWLINE = "new\nline.jpg"
MARKUP = "[red]x.jpg"
BAD_COLOURED = "bad\x1b[1m.jpg"


def fs(name: bytes) -> str:
    """A name as os.scandir gives it: str with the undecodable bytes as surrogates."""
    return os.fsdecode(name)


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
