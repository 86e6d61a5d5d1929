"""One declaration per option: the command line, the environment, optimizr.toml and the
frozen config agree; errors have one style; the conveniences of issue 10 items 11, 21, 23."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import photo_array, save_jpeg, save_png
from optimizr.cli import main
from optimizr.cli_options import OPTIONS, undeclared_fields


def small_tree(src: Path, count: int = 3) -> None:
    for i in range(count):
        save_jpeg(src / f"img{i}.jpg", photo_array(64, 48, seed=i))


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def summary_options(dest: Path) -> dict[str, object]:
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    options: dict[str, object] = doc["options"]
    options["budget_bytes"] = doc["memory"]["budget_bytes"]
    return options


def test_every_config_field_is_declared_once() -> None:
    assert undeclared_fields() == {"EncodeOptions": set(), "RunConfig": set(),
                                   "ConsoleOptions": set()}  # fmt: skip
    names = [opt.name for opt in OPTIONS]
    assert len(names) == len(set(names))
    envvars = [opt.envvar for opt in OPTIONS]
    assert len(envvars) == len(set(envvars))
    assert all(e.startswith("OPTIMIZR_") and e.isupper() for e in envvars)


def test_environment_sets_options(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    small_tree(src)
    env = {
        "OPTIMIZR_QUALITY": "61",
        "OPTIMIZR_MAX_MEMORY": "700M",
        "OPTIMIZR_EXCLUDE": "img1.jpg img2.jpg",
        "OPTIMIZR_VERIFY": "true",
        "OPTIMIZR_NAME": "append",
    }
    result = run("convert", src, dest, "--no-progress", env=env)
    assert result.exit_code == 0, result.output
    options = summary_options(dest)
    assert options["quality"] == 61 and options["verify"] is True
    assert options["exclude"] == ["img1.jpg", "img2.jpg"]
    assert options["budget_bytes"] == 700 << 20
    assert sorted(p.name for p in dest.glob("*.webp")) == ["img0.jpg.webp"]


def test_config_file_in_cwd_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    small_tree(src)
    (tmp_path / "optimizr.toml").write_text(
        'quality = 55\nmax-memory = "600M"\nexclude = ["img2.jpg"]\n[convert]\neffort = 2\n'
    )
    monkeypatch.chdir(tmp_path)
    assert run("convert", "src", "d1", "--no-progress").exit_code == 0
    options = summary_options(tmp_path / "d1")
    assert (options["quality"], options["effort"], options["exclude"]) == (55, 2, ["img2.jpg"])
    assert options["budget_bytes"] == 600 << 20
    # The environment beats the file; the command line beats both.
    monkeypatch.setenv("OPTIMIZR_QUALITY", "66")
    assert run("convert", "src", "d2", "--no-progress").exit_code == 0
    assert summary_options(tmp_path / "d2")["quality"] == 66
    assert run("convert", "src", "d3", "--no-progress", "-q", "77").exit_code == 0
    assert summary_options(tmp_path / "d3")["quality"] == 77


def test_explicit_config_file_and_its_errors(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    small_tree(src, 1)
    good = tmp_path / "web.toml"
    good.write_text("quality = 42\nmetadata = 'none'\n")
    assert run("convert", src, dest, "--config", good, "--no-progress").exit_code == 0
    assert summary_options(dest)["quality"] == 42
    typo = tmp_path / "typo.toml"
    typo.write_text("qualty = 42\n")
    result = run("convert", src, tmp_path / "d2", "--config", typo)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"optimizr: error: config file {typo}: unknown option 'qualty'"
    broken = tmp_path / "broken.toml"
    broken.write_text("quality = \n")
    result = run("convert", src, tmp_path / "d3", "--config", broken)
    assert result.exit_code == 2 and "is not valid TOML" in result.stderr
    assert not (tmp_path / "d2").exists() and not (tmp_path / "d3").exists()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("-q", "101"), {}, "invalid value for '--quality' / '-q': 101 is not in the range"),
        (("--qualty", "5"), {}, "no such option '--qualty'"),
        ((), {"OPTIMIZR_QUALITY": "abc"}, "'abc' is not a valid integer"),
        (("--max-memory", "lots"), {}, "not a size: 'lots'"),
        (("--max-memory", "10M"), {}, "--max-memory must be at least 64M"),
    ],
)
def test_every_usage_error_is_one_line_in_one_style(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    (tmp_path / "src").mkdir()
    result = run("convert", tmp_path / "src", tmp_path / "dest", *args, env=env)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("optimizr: error: ") and expected in lines[0], lines[0]
    assert "Usage:" not in result.output


def test_usage_error_is_a_json_event_with_json_logs(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    result = run("convert", tmp_path / "src", tmp_path / "d", "--log-format", "json", "-q", "x")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and "--quality" in event["message"]


def test_version_names_the_libraries() -> None:
    result = run("--version")
    assert result.exit_code == 0
    # The "formats:" lines after these are tests/test_decoders.py's.
    lines = result.stdout.split("formats:\n", 1)[0].splitlines()
    assert lines[0].startswith("optimizr ")
    names = ["libvips", "libwebp", "Python", "encoder:", "SSIMULACRA"]
    assert [line.split()[0] for line in lines[1:]] == names
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in lines[3]
    assert lines[4].startswith(("encoder: libwebp ", "encoder: libvips webpsave (slower: "))
    # Which loops score --target-score: `make` builds the C ones.
    assert lines[5] == "SSIMULACRA 2.1 (--target-score): C (avx2+fma)" or lines[5].startswith(
        "SSIMULACRA 2.1 (--target-score): C (baseline)"
    )


def test_quiet_shows_only_failures(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    small_tree(src, 2)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = run("convert", src, dest, "-Q")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAILED broken.jpg"), result.stderr
    assert result.stdout == ""
    # --log-level error hides even those; the exit code still tells.
    result = run("convert", src, tmp_path / "d2", "--log-level", "error")
    assert result.exit_code == 1 and result.stderr == ""


def test_log_level_works_in_text_mode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    small_tree(src, 2)
    info = run("convert", src, tmp_path / "d1", "--no-progress")
    debug = run("convert", src, tmp_path / "d2", "--no-progress", "--log-level", "debug")
    warning = run("convert", src, tmp_path / "d3", "--no-progress", "--log-level", "warning")
    assert "walk done" not in info.stderr and "files found" in info.stderr
    assert "debug: walk done: 2 files" in debug.stderr
    assert "converted img0.jpg -> img0.webp" in debug.stderr
    assert warning.stderr == ""


def test_summary_dash_goes_to_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    small_tree(src, 2)
    monkeypatch.chdir(tmp_path)
    result = run("convert", src, dest, "--summary", "-", "--no-progress")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["files"]["converted"] == 2
    assert not (tmp_path / "-").exists() and not (dest / "optimizr-summary.json").exists()


def test_json_failure_event_reports_the_source_size(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    broken = src / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 300)
    result = run("convert", src, dest, "--log-format", "json")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    [image] = [e for e in events if e["event"] == "image"]
    assert image["status"] == "failed" and image["bytes_in"] == broken.stat().st_size


def test_preserve_mtime(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    small_tree(src, 1)
    then = 1_500_000_000_123_456_789
    os.utime(src / "img0.jpg", ns=(then, then))
    assert run("convert", src, dest, "--preserve-mtime", "--no-progress").exit_code == 0
    assert (dest / "img0.webp").stat().st_mtime_ns == then
    # A re-run trusts that output: it is up to date, not redone.
    again = run("convert", src, dest, "--preserve-mtime", "--no-progress")
    assert json.loads((dest / "optimizr-summary.json").read_text())["files"]["converted"] == 0
    assert again.exit_code == 0
    assert run("convert", src, tmp_path / "d2", "--no-progress").exit_code == 0
    assert (tmp_path / "d2" / "img0.webp").stat().st_mtime_ns != then


def test_dry_run_lists_work_on_stdout(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    small_tree(src, 2)
    save_png(src / "flat.png", photo_array(32, 32))
    (src / "notes.txt").write_text("not an image")
    result = run("convert", src, dest, "--dry-run")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("would convert 3 files (")
    assert sorted(lines[:-1])[0].startswith("would convert flat.png -> flat.webp (")
    assert len(lines) == 4
    assert "notes.txt" not in result.stdout and "notes.txt" in result.stderr
    assert not dest.exists()


def test_workers_zero_means_all_cpus_in_help() -> None:
    help_text = " ".join(run("convert", "--help").stdout.split())
    assert "0: all the CPUs this process may use" in help_text
    assert "OPTIMIZR_QUALITY=75" in help_text


def test_shell_completion_script() -> None:
    env = {**os.environ, "_OPTIMIZR_COMPLETE": "bash_source"}
    script = Path(sys.executable).with_name("optimizr")  # the installed entry point
    out = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "complete" in out.stdout and "_OPTIMIZR_COMPLETE" in out.stdout


def test_completion_offers_options(cli: Callable[..., Result]) -> None:
    env = {"_OPTIMIZR_COMPLETE": "bash_complete", "COMP_WORDS": "optimizr convert --qua",
           "COMP_CWORD": "2"}  # fmt: skip
    result = CliRunner().invoke(main, [], env=env, prog_name="optimizr")
    assert "--quality" in result.output
