"""What a run converts and where each output goes, before anything is converted.

``resolve_layout`` turns the command's SRC... DEST into a :class:`Layout`:

* **one SRC folder**: mirrored into DEST (DEST inside SRC is pruned from the walk;
  SRC == DEST is *in place*, allowed with ``--name append`` only);
* **one SRC file**: converted to DEST when DEST ends in ``.webp``, else into the
  folder DEST; like cwebp, nothing else is written (no manifest, no summary);
* **several SRCs** (cp's rule, the last argument is DEST): a folder ``a/`` is
  mirrored under ``DEST/a/``, a file ``c.jpg`` goes to ``DEST/c.webp``; two SRCs
  with one name are refused, two whose outputs meet are an output conflict;
* **--files-from**: the listed files of one SRC folder instead of a walk.

:class:`OwnOutputs` then keeps optimizr's own files out of the sources: outputs
a manifest recorded inside the walked tree (in place, SRC inside DEST, or a SRC
that is an earlier DEST), outputs beside their sources in place, and summaries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import sqlite3
import stat as stat_mod
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from optimizr.atomic import is_temp_name
from optimizr.config import SUMMARY_NAME, RunConfig
from optimizr.errors import OptimizrError, UsageError
from optimizr.manifest import Manifest, split_key
from optimizr.pipeline import output_key, row_outputs
from optimizr.storage.base import (
    DEST_FOLDER,
    NOT_FOUND,
    OUTSIDE_SRC,
    STATE_DIR,
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    WalkOptions,
)
from optimizr.storage.local import LocalStorage, os_reason

IN_PLACE_NEEDS_APPEND = (
    "converting in place (DEST is SRC) needs --name append (photo.jpg -> photo.jpg.webp, "
    "for nginx try_files $uri.webp): with --name {name} a WebP source would be its own "
    "output, and photo.jpg's output photo.webp would replace a source photo.webp"
)


@dataclass(frozen=True)
class Layout:
    """Where the sources are and where their outputs go."""

    source: Storage
    #: The folder outputs are written under (one file: the output's folder).
    dest_root: Path
    #: One file: the output's key under ``dest_root``. None for a tree.
    target: str | None = None
    #: Source keys of folders the walk never enters (DEST inside a SRC).
    prune: tuple[str, ...] = ()
    in_place: bool = False
    #: When this run's outputs can land inside SRC (in place: ""; SRC inside
    #: DEST: SRC's path in DEST), the prefix that maps a source folder to the
    #: manifest folder whose rows name the outputs written into it.
    own_prefix: str | None = None
    #: SRC folders that are DESTs of other runs (they hold STATE_DIR): (source
    #: key prefix, folder). Their manifests name outputs that are not sources.
    foreign: tuple[tuple[str, Path], ...] = ()
    #: Source keys of files optimizr wrote that no manifest lists (summaries).
    passed_over: tuple[str, ...] = ()

    @property
    def one_file(self) -> bool:
        return self.target is not None


def resolve_layout(srcs: Sequence[Path], dest: str, config: RunConfig) -> Layout:
    """Check SRC... DEST and say what the run reads and writes; UsageError if it cannot be.

    ``dest`` is DEST as typed: a trailing slash says "a folder" for one file."""
    for src in srcs:
        if not os.path.exists(src):
            raise UsageError(f"SRC does not exist: {src}")
    if len(srcs) > 1:
        if config.files_from is not None:
            raise UsageError("--files-from takes exactly one SRC folder (the names are in it)")
        return _several(srcs, Path(dest), config)
    if srcs[0].is_dir():
        return _tree(srcs[0], Path(dest), config)
    if config.files_from is not None:
        raise UsageError(f"--files-from names files in a SRC folder; {srcs[0]} is a file")
    return _one_file(srcs[0], dest, config)


def _tree(src: Path, dest: Path, config: RunConfig) -> Layout:
    src_real, dest_real = src.resolve(), dest.resolve()
    if dest_real.exists() and not dest_real.is_dir():
        raise UsageError(f"DEST exists and is not a folder: {dest}")
    in_place = src_real == dest_real
    if in_place and config.name != "append":
        raise UsageError(IN_PLACE_NEEDS_APPEND.format(name=config.name))
    prune: tuple[str, ...] = ()
    own_prefix: str | None = None
    if in_place:
        own_prefix = ""
    elif dest_real.is_relative_to(src_real):
        prune = (dest_real.relative_to(src_real).as_posix(),)
    elif src_real.is_relative_to(dest_real):
        # photos/raw -> photos: raw/raw/x.jpg's output is photos/raw/x.webp, in SRC.
        own_prefix = src_real.relative_to(dest_real).as_posix()
    storage = LocalStorage(src)
    source: Storage = storage
    if config.files_from is not None:
        names = read_listed_names(config.files_from, nul=config.files_from_nul)
        source = ListedSource(storage, names)
    foreign = () if in_place or not (src / STATE_DIR).is_dir() else (("", src),)
    passed = _summaries(config, {"": (src_real, bool(foreign) or in_place)})
    return Layout(source, dest, None, prune, in_place, own_prefix, foreign, passed)


def _one_file(src: Path, dest: str, config: RunConfig) -> Layout:
    dest_path = Path(dest)
    name = src.name
    if dest_path.is_dir() or dest.endswith(("/", os.sep)):
        folder, target = dest_path, output_key(name, config.name)
    elif dest_path.suffix.lower() == ".webp":
        folder, target = dest_path.parent, dest_path.name
    else:
        raise UsageError(
            f"DEST for one file must be a .webp file name, or a folder (one that exists, "
            f"or written with a trailing /): {dest}"
        )
    if (folder / target).resolve() == src.resolve():
        raise UsageError(f"the output would replace SRC itself: {src}")
    return Layout(SourceSet({name: src}, {}, str(src)), folder, target)


def _several(srcs: Sequence[Path], dest: Path, config: RunConfig) -> Layout:
    dest_real = dest.resolve()
    if dest_real.exists() and not dest_real.is_dir():
        raise UsageError(f"DEST exists and is not a folder: {dest}")
    by_name: dict[str, Path] = {}
    files: dict[str, Path] = {}
    trees: dict[str, LocalStorage] = {}
    roots: dict[str, tuple[Path, bool]] = {}
    prune: list[str] = []
    foreign: list[tuple[str, Path]] = []
    for src in srcs:
        # The name as typed (a trailing slash changes nothing, as with cp -r).
        name = os.path.basename(os.path.normpath(os.path.abspath(src)))
        if not name:
            raise UsageError(f"{src} has no name to go under DEST: give it as the only SRC")
        if name in by_name:
            raise UsageError(
                f"{by_name[name]} and {src} would both go to {dest / name}: convert them "
                "one at a time, into different DESTs"
            )
        by_name[name] = src
        src_real = src.resolve()
        if not src.is_dir():
            if (dest_real / output_key(name, config.name)) == src_real:
                raise UsageError(f"the output would replace SRC itself: {src}")
            files[name] = src
            continue
        target = dest_real / name
        if src_real in (dest_real, target) or src_real.is_relative_to(target):
            raise UsageError(
                f"{src} would be converted into itself ({dest / name}): convert it on its "
                "own, in place (SRC and DEST the same folder, with --name append)"
            )
        if dest_real.is_relative_to(src_real):
            prune.append(f"{name}/{dest_real.relative_to(src_real).as_posix()}")
        trees[name] = LocalStorage(src, prefix=name)
        holds_state = (src / STATE_DIR).is_dir()
        if holds_state:
            foreign.append((name, src))
        roots[name] = (src_real, holds_state)
    source = SourceSet(files, trees, ", ".join(str(s) for s in srcs))
    passed = _summaries(config, roots)
    return Layout(source, dest, None, tuple(prune), False, None, tuple(foreign), passed)


def _summaries(config: RunConfig, roots: dict[str, tuple[Path, bool]]) -> tuple[str, ...]:
    """Keys of the summaries in the walked trees: this run's, when --summary (or
    DEST, in place) puts it in a SRC, and those at the top of a SRC that is a DEST."""
    keys: list[str] = []
    summary = config.effective_summary_path.resolve()
    for prefix, (root, is_dest) in roots.items():
        if summary.is_relative_to(root):
            keys.append(posixpath.join(prefix, summary.relative_to(root).as_posix()))
        if is_dest:
            keys.append(posixpath.join(prefix, SUMMARY_NAME))
    return tuple(keys)


# -- several SRCs --------------------------------------------------------------------------


class _SourceOnly(Storage):
    """A storage that only ever serves sources: what writes would do is refused."""

    def write_atomic(
        self,
        key: str,
        data: bytes,
        *,
        mtime_ns: int | None = None,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        if_match: str | None = None,
    ) -> str | None:
        raise OSError(errno.EROFS, "a SRC is never written", key)

    def delete(self, key: str) -> bool:
        raise OSError(errno.EROFS, "a SRC is never written", key)

    def remove_stale_temporaries(self) -> int:
        return 0


class SourceSet(_SourceOnly):
    """Several SRCs read as one tree: folder ``a`` under the key ``a/``, file ``c.jpg``
    as the key ``c.jpg`` at the top (one file alone is a set of one)."""

    def __init__(self, files: dict[str, Path], trees: dict[str, LocalStorage], text: str) -> None:
        self.files = files
        self.trees = trees
        self._text = text

    def describe(self) -> str:
        return self._text

    def _path(self, key: str) -> Path | None:
        if key in self.files:
            return self.files[key]
        tree = self.trees.get(key.partition("/")[0])
        return None if tree is None else tree.path_of(key)

    def local_path(self, key: str) -> str | None:
        path = self._path(key)
        return None if path is None else str(path)

    def stat(self, key: str) -> FileStat | None:
        path = self._path(key)
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            return None
        return None if st is None else FileStat(st.st_size, st.st_mtime_ns)

    def list_files(self, directory: str) -> dict[str, FileStat]:
        if directory:
            tree = self.trees.get(directory.partition("/")[0])
            return {} if tree is None else tree.list_files(directory)
        listed = {name: self.stat(name) for name in self.files}
        return {name: st for name, st in listed.items() if st is not None}

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if path is None:
            raise FileNotFoundError(errno.ENOENT, "not a SRC", key)
        return path.read_bytes()

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        entries: list[SourceEntry] = []
        for name in sorted(self.files):
            if not options.wants_file(name):
                continue
            try:
                # Named on the command line: a symbolic link is followed, as cp and rsync do.
                st = os.stat(self.files[name])
            except OSError as exc:
                entries.append(SourceEntry(name, error=os_reason(exc)))
                continue
            entries.append(SourceEntry(name, st.st_size, st.st_mtime_ns))
        if entries:
            yield DirectoryListing("", tuple(entries))
        for name in sorted(self.trees):
            yield from self.trees[name].walk(options)


# -- --files-from --------------------------------------------------------------------------


def read_listed_names(source: Path, *, nul: bool) -> list[str]:
    """The names in a --files-from list (``-``: standard input), one a line or, with
    ``nul``, NUL-terminated. Names are bytes on POSIX: decoded as the OS decodes
    file names (``os.fsdecode``), so any name round-trips to the same file."""
    separator = b"\0" if nul else b"\n"
    names: list[str] = []
    pending = b""
    try:
        with contextlib.ExitStack() as stack:
            if str(source) == "-":
                stream = sys.stdin.buffer
            else:
                stream = stack.enter_context(open(source, "rb"))
            while chunk := stream.read(1 << 16):
                *complete, pending = (pending + chunk).split(separator)
                names.extend(os.fsdecode(name) for name in complete if name)
    except OSError as exc:
        raise UsageError(f"cannot read --files-from {source}: {exc.strerror or exc}") from None
    if pending:
        names.append(os.fsdecode(pending))
    return names


def listed_key(name: str, roots: Sequence[str]) -> str | None:
    """The source key of a listed name: relative to SRC (``./a//b.jpg`` -> ``a/b.jpg``;
    an absolute path under one of SRC's ``roots``, as typed or resolved, too); "" for
    SRC itself; None when it leads out of SRC."""
    norm = posixpath.normpath(name)
    if norm.startswith("/"):
        for root in roots:
            base = posixpath.normpath(root).rstrip("/")
            if norm == base or norm == base + "/":
                return ""
            if norm.startswith(base + "/"):
                return norm[len(base) + 1 :]
        return None
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


class ListedSource(_SourceOnly):
    """The files a list names in one SRC folder, yielded as a walk would: one
    listing per folder, sorted, so that conflicts and manifest lookups stay per
    folder. Memory: the names, grouped by folder (as much as the list itself)."""

    # A list proves nothing about the files it does not name: no row is forgotten.
    complete_walk = False

    def __init__(self, tree: LocalStorage, names: Iterable[str]) -> None:
        self.tree = tree
        self.walk_stats = tree.walk_stats
        roots = (os.path.abspath(tree.root), os.path.realpath(tree.root))
        self._groups: dict[str, set[str]] = {}
        self._refused: list[str] = []
        for name in names:
            key = listed_key(name, roots)
            if key is None:
                self._refused.append(name)
            elif key:  # "" is SRC itself (find's "."): its files are listed on their own
                directory, _, base = key.rpartition("/")
                self._groups.setdefault(directory, set()).add(base)

    def describe(self) -> str:
        return self.tree.describe()

    def local_path(self, key: str) -> str | None:
        return self.tree.local_path(key)

    def stat(self, key: str) -> FileStat | None:
        return self.tree.stat(key)

    def list_files(self, directory: str) -> dict[str, FileStat]:
        return self.tree.list_files(directory)

    def read_bytes(self, key: str) -> bytes:
        return self.tree.read_bytes(key)

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        stats = self.walk_stats
        if self._refused:
            yield DirectoryListing(
                "", tuple(SourceEntry(n, error=OUTSIDE_SRC) for n in self._refused)
            )
        root_real = os.path.realpath(self.tree.root)
        holds_state: dict[str, bool] = {}
        reported: set[str] = set()
        for directory in sorted(self._groups):
            names = sorted(self._groups[directory])
            keys = [f"{directory}/{name}" if directory else name for name in names]
            parts = directory.split("/") if directory else []
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if not all(options.wants_dir(p) for p in prefixes):
                stats.excluded += len(keys)
                continue
            dest = next((p for p in prefixes if self._holds_state(p, holds_state)), None)
            if dest is not None:
                if dest not in reported:
                    reported.add(dest)
                    stats.dest_folders += 1
                    yield DirectoryListing(dest, skipped=DEST_FOLDER)
                continue
            real = os.path.realpath(self.tree.path_of(directory))
            if not options.follow_symlinks and not (real + "/").startswith(root_real + "/"):
                # Reached through a symbolic link that leaves SRC, which a walk never follows.
                yield DirectoryListing(
                    directory, tuple(SourceEntry(k, error=OUTSIDE_SRC) for k in keys)
                )
                continue
            stats.directories += 1
            entries = [e for e in (self._entry(key, options) for key in keys) if e is not None]
            if entries:
                yield DirectoryListing(directory, tuple(entries))

    def _holds_state(self, directory: str, cache: dict[str, bool]) -> bool:
        if directory not in cache:
            cache[directory] = (self.tree.path_of(directory) / STATE_DIR).is_dir()
        return cache[directory]

    def _entry(self, key: str, options: WalkOptions) -> SourceEntry | None:
        stats = self.walk_stats
        path = self.tree.path_of(key)
        try:
            st = os.lstat(path)
            if stat_mod.S_ISLNK(st.st_mode):
                if not options.follow_symlinks:
                    stats.symlinks_skipped += 1
                    return None
                st = os.stat(path)
        except FileNotFoundError:
            return SourceEntry(key, error=NOT_FOUND)
        except OSError as exc:
            stats.errors += 1
            return SourceEntry(key, error=os_reason(exc))
        # A folder (find lists them too) is not converted whole: its files are listed.
        if not stat_mod.S_ISREG(st.st_mode) or is_temp_name(key.rpartition("/")[2]):
            return None
        if not options.wants_file(key):
            stats.excluded += 1
            return None
        stats.files += 1
        return SourceEntry(key, st.st_size, st.st_mtime_ns)


# -- optimizr's own files ------------------------------------------------------------------


#: In place with --name append, the output of ``x`` is ``x.webp`` and the other pages
#: of a multi-page ``x`` (--pages all) are ``x.p2.webp``, ``x.p3.webp``...
_OUTPUT = re.compile(r"(.+)\.webp", re.DOTALL)
_PAGE_OUTPUT = re.compile(r"(.+)\.p[0-9]+\.webp", re.DOTALL)


class OwnOutputs:
    """Takes optimizr's own files out of each source listing (issue 10, items 7 and 16).

    Per folder, in bounded memory: the outputs the manifests covering it record as
    done there (one query per folder), the summaries, and, in place, any ``x.webp``
    beside an ``x``: with --name append that is x's output whether or not a row says
    so (a kill -9 loses the last batch of rows, --rebuild-manifest starts with none).
    Outputs this run writes cannot reappear: a folder is listed whole before any of
    its files is converted, and a folder's outputs stay in that folder.
    """

    def __init__(self, layout: Layout, manifest: Manifest | None, dest: Storage) -> None:
        self._fixed: dict[str, set[str]] = {}
        for key in layout.passed_over:
            directory, name = split_key(key)
            self._fixed.setdefault(directory, set()).add(name)
        self._covering: list[tuple[Manifest, str, str]] = []
        self._opened: list[Manifest] = []
        self.warnings: list[str] = []
        if manifest is not None and layout.own_prefix is not None:
            self._covering.append((manifest, "", layout.own_prefix))
        for prefix, folder in layout.foreign:
            try:
                other = Manifest.open_readonly(folder)
            except (OptimizrError, sqlite3.Error) as exc:
                self.warnings.append(
                    f"{folder} holds an optimizr manifest that cannot be read ({exc}): "
                    "outputs it lists may be taken as sources"
                )
                continue
            if other is not None:
                self._opened.append(other)
                self._covering.append((other, prefix, ""))
        self._beside = dest if layout.in_place else None
        #: Files passed over so far.
        self.count = 0

    def drop(self, listing: DirectoryListing) -> DirectoryListing:
        kept = _without(listing, self._names_in(listing.directory, manifests=True))
        self.count += len(listing.entries) - len(kept.entries)
        return kept

    def drop_for_count(self, listing: DirectoryListing) -> DirectoryListing:
        """``drop`` for the count pass, on its own thread: without the manifests (a
        SQLite connection stays on the thread that opened it). In place that still
        finds nearly every output, each beside its source; the count is an estimate."""
        return _without(listing, self._names_in(listing.directory, manifests=False))

    def _names_in(self, directory: str, *, manifests: bool) -> set[str]:
        names = set(self._fixed.get(directory, ()))
        for manifest, source_prefix, manifest_prefix in self._covering if manifests else ():
            if source_prefix and not (directory + "/").startswith(source_prefix + "/"):
                continue
            rest = directory[len(source_prefix) :].lstrip("/")
            folder = "/".join(p for p in (manifest_prefix, rest) if p)
            for row in manifest.rows_in(folder).values():
                for output in row_outputs(row):
                    out_dir, out_name = split_key(output)
                    if out_dir == folder:
                        names.add(out_name)
        if self._beside is not None:
            present = self._beside.list_files(directory)
            for name in present:
                for pattern in (_OUTPUT, _PAGE_OUTPUT):
                    source = pattern.fullmatch(name)
                    if source is not None and source.group(1) in present:
                        names.add(name)
        return names

    def close(self) -> None:
        for manifest in self._opened:
            manifest.close()


def _without(listing: DirectoryListing, names: set[str]) -> DirectoryListing:
    if not names:
        return listing
    kept = tuple(
        e for e in listing.entries if e.error is not None or split_key(e.key)[1] not in names
    )
    return DirectoryListing(listing.directory, kept)
