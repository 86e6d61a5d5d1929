"""The decoder table: one place says who decodes what, and every reader follows it."""

from __future__ import annotations

from click.testing import CliRunner

from optimizr import decoders
from optimizr.cli import main
from optimizr.sniff import SUPPORTED


def test_what_is_supported_is_what_the_table_names() -> None:
    assert frozenset(decoders.TABLE) == SUPPORTED
    for kind in ("jpeg", "png", "gif", "webp", "tiff", "avif"):
        assert decoders.TABLE[kind].library == decoders.LIBVIPS  # streamed, shrunk on load
        assert decoders.module_for(kind) is None


def test_version_lists_each_format_and_the_library_that_decodes_it() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("formats:\n", 1)[1].splitlines()
    support = decoders.support()
    assert [line.split()[0] for line in listed] == list(decoders.TABLE)
    for line in listed:
        kind, said = line.split(None, 1)
        entry = support[kind]
        expected = entry["library"] if entry["available"] else entry["reason"]
        assert said.startswith(expected), line
