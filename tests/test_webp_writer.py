"""The libwebp binding writes the same bytes as libvips' webpsave, from strips.

Every comparison encodes the same source twice through ``encode_webp``, once
with ``--encoder libvips`` (webpsave, the reference) and once with
``--encoder libwebp`` (the binding: strips, rotation in the picture's planes,
our own mux), and asks for identical files and facts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pyvips

from conftest import photo_array
from optimizr import libwebp, webp_writer
from optimizr.config import EncodeOptions
from optimizr.encode import Encoded, encode_webp
from optimizr.errors import ImageError
from optimizr.versions import tool_versions

MODES = {
    "lossy": EncodeOptions(),
    "metadata-all": EncodeOptions(metadata="all"),
    "metadata-none": EncodeOptions(metadata="none", quality=50, effort=6),
    "lossless": EncodeOptions(lossless=True, effort=1),
    "near-lossless": EncodeOptions(near_lossless=60, effort=1),
    "sharp-yuv": EncodeOptions(smart_subsample=True),
    "shrink-on-load": EncodeOptions(max_width=700, metadata="all"),
}


def both(source: str | bytes | Path, options: EncodeOptions) -> tuple[Encoded, Encoded]:
    src = os.fspath(source) if isinstance(source, Path) else source
    reference = encode_webp(src, dataclasses.replace(options, encoder="libvips"))
    ours = encode_webp(src, dataclasses.replace(options, encoder="libwebp"))
    return reference, ours


def assert_same(source: str | bytes | Path, options: EncodeOptions) -> Encoded:
    try:
        reference, ours = both(source, options)
    except ImageError as exc:  # then both must refuse it, the same way
        with pytest.raises(type(exc)):
            encode_webp(
                os.fspath(source) if isinstance(source, Path) else source,
                dataclasses.replace(options, encoder="libwebp"),
            )
        pytest.skip(f"both encoders refuse it: {exc}")
    assert ours.webp == reference.webp, f"{len(ours.webp)} bytes against {len(reference.webp)}"
    for name in ("width_out", "height_out", "frames", "has_alpha", "icc_kept", "pages"):
        assert getattr(ours.facts, name) == getattr(reference.facts, name), name
    assert ours.more_pages == reference.more_pages
    return ours


@pytest.fixture(autouse=True)
def _binding_loads() -> None:
    if libwebp.load() is None:
        pytest.fail(f"the libwebp binding must load here: {libwebp.encoder_info().reason}")


def test_the_binding_is_pillows_libwebp_found_by_glob() -> None:
    info = libwebp.encoder_info()
    assert info.name == "libwebp" and not info.fallback
    assert tuple(int(p) for p in info.libwebp_version.split(".")) >= libwebp.MIN_VERSION
    origin = Path(info.origin)
    import PIL

    assert origin.parent == Path(PIL.__file__).parent.parent / "pillow.libs"
    assert origin.name.startswith("libwebp-") and ".so" in origin.name
    assert info.describe().startswith(f"encoder: libwebp {info.libwebp_version} (")


def test_a_library_too_old_is_refused_with_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libwebp, "MIN_VERSION", (99, 0, 0))
    libwebp._load.cache_clear()
    try:
        info = libwebp.encoder_info()
        assert info.fallback and "older than 99.0.0" in info.reason
        assert info.describe().startswith("encoder: libvips webpsave (slower: ")
    finally:
        monkeypatch.undo()
        libwebp._load.cache_clear()
    assert libwebp.load() is not None


def test_the_whole_config_is_exposed() -> None:
    lib = libwebp.load()
    assert lib is not None
    names = {name for name, _ in libwebp.WebPConfig._fields_}
    for knob in (
        "quality",
        "method",
        "lossless",
        "near_lossless",
        "alpha_quality",
        "exact",
        "use_sharp_yuv",
        "target_size",
        "pass_",
        "segments",
        "sns_strength",
        "qmin",
        "qmax",
    ):
        assert knob in names
    config = webp_writer.make_config(lib, EncodeOptions(quality=61, effort=5, preset="photo"))
    assert (config.quality, config.method, config.lossless) == (61.0, 5, 0)
    # The preset is applied: libwebp's photo preset sets sns_strength 80.
    assert config.sns_strength == 80
    near = webp_writer.make_config(lib, EncodeOptions(near_lossless=40))
    assert (near.lossless, near.near_lossless) == (1, 40)
    sized = webp_writer.make_config(lib, EncodeOptions(), target_size=5000, pass_=6, exact=1)
    assert (sized.target_size, sized.pass_, sized.exact) == (5000, 6, 1)
    with pytest.raises(ValueError, match="no field"):
        webp_writer.make_config(lib, EncodeOptions(), bogus=1)


def test_libwebps_own_rate_control_is_reachable() -> None:
    """target_size and pass, which webpsave's options cannot reach from optimizr's,
    go straight to libwebp: the file lands near the size asked for."""
    lib = libwebp.load()
    assert lib is not None
    image = pyvips.Image.new_from_array(photo_array(400, 300, seed=9), interpretation="srgb")
    options = EncodeOptions(quality=95)
    free = webp_writer.encode(lib, image, options)
    config = webp_writer.make_config(lib, options, target_size=len(free) // 3, pass_=6)
    sized = webp_writer.encode(lib, image, options, config=config)
    assert len(sized) < len(free) // 2
    assert abs(len(sized) - len(free) // 3) < len(free) // 6


# -- synthetic sources: strips, odd sizes, alpha, grey, 16-bit, CMYK, orientation


@pytest.fixture
def small_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips of a few rows, so small images are cut into many of them."""
    monkeypatch.setattr(webp_writer, "STRIP_BYTES", 2048)


def _rgba(width: int, height: int, *, alpha_rows: tuple[int, int] | None) -> np.ndarray:
    rgb = photo_array(width, height, seed=width + height)
    alpha = np.full((height, width, 1), 255, dtype=np.uint8)
    if alpha_rows is not None:
        top, bottom = alpha_rows
        ramp = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
        alpha[top:bottom, :, 0] = ramp  # alpha in these rows only: some strips opaque
    return np.concatenate([rgb, alpha], axis=2)


def _png(array: np.ndarray, **kwargs: object) -> bytes:
    image = pyvips.Image.new_from_array(array, interpretation="srgb")
    return bytes(image.pngsave_buffer(**kwargs))


def _oriented_jpeg(width: int, height: int, orientation: int, **kwargs: object) -> bytes:
    image = pyvips.Image.new_from_array(photo_array(width, height, seed=orientation))
    image = image.copy(interpretation="srgb")
    image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return bytes(image.jpegsave_buffer(Q=90, keep=pyvips.enums.ForeignKeep.ALL, **kwargs))


@pytest.mark.usefixtures("small_strips")
@pytest.mark.parametrize("mode", ["lossy", "lossless", "sharp-yuv", "metadata-all"])
@pytest.mark.parametrize(("width", "height"), [(64, 601), (37, 83), (50, 2)])
def test_strips_of_a_tall_image_with_alpha_in_some_rows(mode: str, width: int, height: int) -> None:
    png = _png(_rgba(width, height, alpha_rows=(height // 3, height // 3 + 5)))
    ours = assert_same(png, MODES[mode])
    assert ours.facts.has_alpha


@pytest.mark.usefixtures("small_strips")
def test_an_opaque_rgba_image_loses_its_alpha_as_with_webpsave() -> None:
    ours = assert_same(_png(_rgba(40, 300, alpha_rows=None)), MODES["lossy"])
    assert not ours.facts.has_alpha


def test_many_strips_are_rendered_not_one_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoded image never exists whole: libvips renders strips of bounded size."""
    monkeypatch.setattr(webp_writer, "STRIP_BYTES", 64 * 1024)
    fetched: list[int] = []
    real = pyvips.Region.fetch

    def spy(self: pyvips.Region, x: int, y: int, w: int, h: int) -> object:
        data = real(self, x, y, w, h)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(pyvips.Region, "fetch", spy)
    png = _png(_rgba(512, 1024, alpha_rows=(0, 1024)))
    encode_webp(png, EncodeOptions(encoder="libwebp"))
    assert len(fetched) >= 1024 * 512 * 4 // (64 * 1024)
    assert max(fetched) <= 64 * 1024


@pytest.mark.usefixtures("small_strips")
@pytest.mark.parametrize("mode", ["lossy", "near-lossless", "sharp-yuv"])
def test_grey_grey_alpha_and_16_bit_sources(mode: str) -> None:
    rgb = photo_array(45, 77, seed=3)
    grey = rgb[:, :, :1]
    grey_alpha = np.concatenate([grey, _rgba(45, 77, alpha_rows=(10, 40))[:, :, 3:]], axis=2)
    for array, interpretation in ((grey, "b-w"), (grey_alpha, "b-w")):
        image = pyvips.Image.new_from_array(array, interpretation=interpretation)
        assert_same(bytes(image.pngsave_buffer()), MODES[mode])
    sixteen = pyvips.Image.new_from_array(rgb.astype(np.uint16) * 257, interpretation="rgb16")
    assert_same(bytes(sixteen.pngsave_buffer(bitdepth=16)), MODES[mode])


@pytest.mark.usefixtures("small_strips")
def test_cmyk_source() -> None:
    rgb = pyvips.Image.new_from_array(photo_array(61, 90, seed=5), interpretation="srgb")
    cmyk = rgb.icc_transform("cmyk", intent="relative")
    jpeg = bytes(cmyk.jpegsave_buffer(Q=90))
    assert pyvips.Image.new_from_buffer(jpeg, "").interpretation == "cmyk"
    assert_same(jpeg, MODES["lossy"])


@pytest.mark.usefixtures("small_strips")
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    ("width", "height"), [(64, 48), (63, 48), (64, 47), (33, 21), (1, 9), (9, 1), (3, 3)]
)
@pytest.mark.parametrize("mode", ["lossy", "lossless", "metadata-all", "sharp-yuv"])
def test_every_orientation_odd_and_even(
    orientation: int, width: int, height: int, mode: str
) -> None:
    jpeg = _oriented_jpeg(width, height, orientation)
    ours = assert_same(jpeg, MODES[mode])
    expected = (height, width) if orientation >= 5 else (width, height)
    assert (ours.facts.width_out, ours.facts.height_out) == expected


@pytest.mark.parametrize(("width", "height"), [(64, 48), (64, 47), (63, 48), (63, 47)])
@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_rotated_photos_stream_whatever_their_sides(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, orientation: int
) -> None:
    """A photo to rotate is read sequentially and rotated in libwebp's planes (odd
    sides included: the first row or column is then a block of its own); only
    libvips' webpsave needs it decoded whole first."""
    import optimizr.encode as encode_module

    accesses: list[str] = []
    real = encode_module._open

    def spy(source: str | bytes, fail_on: str, **kwargs: object) -> object:
        if "access" in kwargs:
            accesses.append(str(kwargs["access"]))
        return real(source, fail_on, **kwargs)

    monkeypatch.setattr(encode_module, "_open", spy)
    jpeg = _oriented_jpeg(width, height, orientation)
    for options in (
        EncodeOptions(encoder="libwebp"),
        EncodeOptions(encoder="libwebp", lossless=True),
    ):
        accesses.clear()
        encode_webp(jpeg, options)
        assert accesses == ["sequential"]
    accesses.clear()
    encode_webp(jpeg, EncodeOptions(encoder="libvips"))
    assert accesses == ["random"]


def test_metadata_all_writes_exif_as_libvips_rewrites_it() -> None:
    """libvips rewrites the EXIF (orientation 1 after rotating, the new size):
    the binding's proxy save gives the same block."""
    jpeg = _oriented_jpeg(64, 48, 6)
    ours = assert_same(jpeg, MODES["metadata-all"])
    loaded = pyvips.Image.new_from_buffer(ours.webp, "")
    assert loaded.get("orientation") == 1
    assert (loaded.width, loaded.height) == (48, 64)


def test_animation_frames_delays_and_loop() -> None:
    frames = [photo_array(40, 30, seed=i) for i in range(4)]
    strip = pyvips.Image.new_from_array(np.concatenate(frames, axis=0), interpretation="srgb")
    strip = strip.copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", 30)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [50, 5, 200, 0])
    strip.set_type(pyvips.GValue.gint_type, "loop", 3)
    gif = bytes(strip.gifsave_buffer())
    for mode in ("lossy", "lossless", "metadata-all"):
        ours = assert_same(gif, MODES[mode])
        assert ours.facts.frames == 4
    webp = pyvips.Image.new_from_buffer(ours.webp, "", n=-1)
    assert webp.get("loop") == 3
    assert list(webp.get("delay")) == [50, 100, 200, 100]


# -- the corpus: real photos, profiles, PNG, GIF, WebP, TIFF, BMP, APNG


def _files(corpus: Path, *folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (corpus / folder).iterdir() if p.is_file())


CORPUS_CASES = {
    # folder(s): modes run on every file there
    "photos": ("lossy", "metadata-all", "shrink-on-load"),
    "orientation": ("lossy", "metadata-all", "shrink-on-load"),
    "color": ("lossy", "metadata-all", "metadata-none", "shrink-on-load"),
    "png": ("lossy", "lossless", "near-lossless", "sharp-yuv"),
    "other/gif": ("lossy", "lossless", "shrink-on-load"),
    "other/webp": ("lossy", "metadata-all"),
    "other/apng": ("lossy", "lossless"),
    "other/bmp": ("lossy",),
    "other/tiff": ("lossy",),
}


@pytest.mark.parametrize("folder", sorted(CORPUS_CASES))
def test_corpus_byte_identical(corpus: Path, folder: str) -> None:
    from optimizr.config import WEBP_MAX_DIMENSION

    compared = 0
    for path in _files(corpus, folder):
        for mode in CORPUS_CASES[folder]:
            options = dataclasses.replace(MODES[mode], oversize="fit", pages="all")
            try:
                reference, ours = both(path, options)
            except ImageError:
                with pytest.raises(ImageError):
                    encode_webp(os.fspath(path), dataclasses.replace(options, encoder="libwebp"))
                continue
            assert ours.webp == reference.webp, f"{path.name} {mode}"
            assert ours.facts.width_out == reference.facts.width_out <= WEBP_MAX_DIMENSION
            assert ours.facts.height_out == reference.facts.height_out
            assert ours.more_pages == reference.more_pages, f"{path.name} {mode}"
            compared += 1
    assert compared >= len(CORPUS_CASES[folder])


# -- the fallback: libvips' webpsave, said once, reported, the same files


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optimizr", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_fallback_is_said_once_reported_and_writes_the_same_files(
    tmp_path: Path, make_photo: object
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "wide.jpg").write_bytes(_oriented_jpeg(120, 80, 6))
    (src / "alpha.png").write_bytes(_png(_rgba(90, 70, alpha_rows=(5, 30))))
    (src / "grey.png").write_bytes(
        bytes(pyvips.Image.new_from_array(photo_array(50, 40)[:, :, :1]).pngsave_buffer())
    )
    missing = tmp_path / "no-libwebp-here"
    missing.mkdir()
    fallback = {libwebp.LIBRARY_DIR_ENV: str(missing)}

    normal = _run(["convert", str(src), str(tmp_path / "a"), "--no-progress"], {})
    assert normal.returncode == 0, normal.stderr
    assert "encoder:" not in normal.stderr
    slow = _run(["convert", str(src), str(tmp_path / "b"), "--no-progress"], fallback)
    assert slow.returncode == 0, slow.stderr
    said = [line for line in slow.stderr.splitlines() if "encoder: libvips webpsave" in line]
    assert len(said) == 1, slow.stderr
    assert "(slower: " in said[0] and str(missing) in said[0]

    outputs = sorted(p.name for p in (tmp_path / "a").glob("*.webp"))
    assert outputs == ["alpha.webp", "grey.webp", "wide.webp"]
    for name in outputs:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    tool_a = json.loads((tmp_path / "a" / "optimizr-summary.json").read_text())["tool"]
    tool_b = json.loads((tmp_path / "b" / "optimizr-summary.json").read_text())["tool"]
    assert (
        tool_a["encoder"] == "libwebp"
        and tool_a["libwebp"] == libwebp.encoder_info().libwebp_version
    )
    assert tool_b["encoder"] == "libvips webpsave" and tool_b["libwebp_origin"] == "pyvips-binary"

    version = _run(["--version"], fallback)
    assert "encoder: libvips webpsave (slower:" in version.stdout
    assert "encoder: libwebp " in _run(["--version"], {}).stdout

    refused = _run(["convert", str(src), str(tmp_path / "c"), "--encoder", "libwebp"], fallback)
    assert refused.returncode == 2
    assert "--encoder libwebp: no libwebp" in refused.stderr


def test_build_info_metric_names_the_encoder() -> None:
    from prometheus_client import generate_latest

    from optimizr.metrics.exporter import MetricsExporter

    exporter = MetricsExporter(build_info=tool_versions())
    text = generate_latest(exporter.registry).decode()
    line = next(line for line in text.splitlines() if line.startswith("optimizr_build_info{"))
    assert 'encoder="libwebp"' in line
    assert f'libwebp="{libwebp.encoder_info().libwebp_version}"' in line
    slow = MetricsExporter(build_info=tool_versions("libvips"))
    assert 'encoder="libvips webpsave"' in generate_latest(slow.registry).decode()
