"""The public surface: exports, config validation, sizes, CPU detection, samples."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest

import optimizr
from conftest import decode
from optimizr import EncodeOptions, RunConfig, UsageError, convert_tree, parse_size
from optimizr.config import available_cpus
from optimizr.errors import ImageError, OptimizrError


def test_all_is_complete_and_importable() -> None:
    public = {
        name
        for name, value in vars(optimizr).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert public <= set(optimizr.__all__), public - set(optimizr.__all__)
    for name in optimizr.__all__:
        assert hasattr(optimizr, name), name


def test_public_functions_are_documented() -> None:
    for name in ("convert_file", "convert_tree", "encode_webp"):
        doc = getattr(optimizr, name).__doc__
        assert doc and len(doc.split()) > 10, name


def test_every_error_has_an_exit_code_and_image_errors_a_reason() -> None:
    for name in optimizr.__all__:
        value = getattr(optimizr, name)
        if inspect.isclass(value) and issubclass(value, OptimizrError):
            assert value.exit_code in (1, 2, 3, 4, 130)
            if issubclass(value, ImageError):
                assert value("x").reason and str(value("detail")).endswith("detail")


def test_image_errors_survive_pickling() -> None:
    import pickle

    error = optimizr.TruncatedImage("jpeg: premature end")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is optimizr.TruncatedImage and copy.message == error.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", int(1.5 * (1 << 30))),
        ("1000", 1000),
        ("64k", 64 << 10),
    ],  # fmt: skip
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quality": 101},
        {"effort": -1},
        {"near_lossless": 101},
        {"max_width": 0},
        {"preset": "nope"},
        {"metadata": "some"},
        {"max_pixels": 0},
    ],  # fmt: skip
)
def test_encode_options_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        EncodeOptions(**kwargs)  # type: ignore[arg-type]


def test_options_are_frozen_and_hashable() -> None:
    options = EncodeOptions()
    with pytest.raises(AttributeError):
        options.quality = 5  # type: ignore[misc]
    assert hash(options) == hash(EncodeOptions())


def test_available_cpus_honours_affinity() -> None:
    original = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(original)})
        assert available_cpus() == 1
        assert RunConfig(src=Path("a"), dest=Path("b")).effective_workers == 1
    finally:
        os.sched_setaffinity(0, original)
    assert available_cpus() >= 1


def test_sample_library_converts_completely(tmp_path: Path) -> None:
    """What `make run` converts: every kind of sample comes out right."""
    from optimizr.samples import write_samples

    written = write_samples(tmp_path / "samples")
    assert len(written) == 6
    summary = convert_tree(tmp_path / "samples", tmp_path / "out", EncodeOptions())
    assert summary.exit_code == 0
    assert summary.converted == 5 and summary.skipped_by_reason == {"not an image": 1}
    out = tmp_path / "out"
    assert decode(out / "photos" / "portrait_rotated.webp").size == (1067, 1600)
    assert decode(out / "graphics" / "badge.webp").mode == "RGBA"
    spinner = decode(out / "animations" / "spinner.webp")
    assert spinner.n_frames == 8 and spinner.info["loop"] == 0
    # WebP has no grey mode: lossy YUV rounding may move a channel by one level.
    grey = np.asarray(decode(out / "graphics" / "grey_scan.webp").convert("RGB"), dtype=int)
    assert np.abs(grey - grey[..., :1]).max() <= 1


def test_samples_can_add_photos_of_assorted_sizes(tmp_path: Path) -> None:
    from optimizr.samples import main

    assert main([str(tmp_path / "s"), "--photos", "3"]) == 0
    extra = sorted((tmp_path / "s" / "photos" / "more").glob("*.jpg"))
    assert len(extra) == 3
    widths = {decode(p).size[0] for p in extra}
    assert len(widths) == 3 and min(widths) >= 800


def test_a_worker_imports_only_what_converting_needs() -> None:
    """A worker process imports optimizr.executors.worker (and so the package): not
    the run's machinery (object stores, SQLite, the pipeline) nor numpy, which only a
    rotated photo needs. Each is 10-15 MB of resident memory in every worker."""
    import subprocess
    import sys

    code = (
        "import sys, optimizr.executors.worker, optimizr.encode, optimizr.verify;"
        "print(' '.join(sorted(m for m in ('obstore', 'sqlite3', 'numpy', 'optimizr.convert',"
        " 'optimizr.pipeline', 'optimizr.executors.local', 'rich', 'plotly') if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
