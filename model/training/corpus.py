"""Offline training corpus for the tiny DiffusionGemma: the Python standard library's own source.

Why this corpus: it ships with every Python install (nothing to download), it is permissively licensed
(PSF License Agreement, the stdlib's `LICENSE.txt`), and code is the launch's flagship use.

Selection (deterministic for a given Python version):
- every `*.py` file under `sysconfig.get_paths()["stdlib"]`, walked recursively;
- excluding any path with a `test`, `tests`, `idlelib` or `site-packages` component (this also drops
  `lib2to3/tests`), the build-specific `_sysconfigdata_*.py` (its content depends on how this Python was
  compiled, not on the Python version), and files larger than 200 KB (generated tables such as
  `pydoc_data/topics.py`);
- sorted by POSIX relative path, read as UTF-8 bytes without newline translation (undecodable files skipped);
- split into train / held-out by a hash of the relative path (`sha256(path)` -> bucket in [0, 10000)),
  so a file's split never depends on which other files exist.

The trainer writes `Corpus.manifest` as `corpus_manifest.json` next to the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 200_000
HELDOUT_FRACTION = 0.02
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
EXCLUDED_PREFIXES = ("_sysconfigdata_",)
LICENCE = "PSF License Agreement (Python Software Foundation License Version 2)"
_BUCKETS = 10_000


@dataclass
class Corpus:
    """Texts for training and held-out evaluation, plus a manifest saying where they came from."""

    train_texts: list[str]
    heldout_texts: list[str]
    manifest: dict = field(default_factory=dict)

    def write_manifest(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    """Split by path hash: stable across machines and across corpus sizes."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS < round(heldout_fraction * _BUCKETS)


def _selected(rel: Path, size: int) -> bool:
    if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
        return False
    if rel.name.startswith(EXCLUDED_PREFIXES):
        return False
    return size <= MAX_FILE_BYTES


def list_source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the selected `.py` files, sorted."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune excluded directories instead of walking into them (site-packages can be huge).
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if name.endswith(".py") and path.is_file() and _selected(rel, path.stat().st_size):
                rels.append(rel.as_posix())
    return sorted(rels)


def _truncate_utf8(data: bytes, budget: int) -> str:
    """The longest prefix of whole lines within `budget` bytes (whole characters if there is no newline)."""
    cut = data[:budget]
    newline = cut.rfind(b"\n")
    if newline >= 0:
        cut = cut[: newline + 1]
    return cut.decode("utf-8", errors="ignore")


@dataclass
class _Selection:
    """What `build_corpus` read, in order, before it becomes a `Corpus`."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    heldout_paths: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    num_files: int = 0
    num_bytes: int = 0
    content_hash: Any = field(default_factory=hashlib.sha256)

    def add(self, rel: str, text: str, heldout: bool) -> None:
        data = text.encode("utf-8")
        self.num_files += 1
        self.num_bytes += len(data)
        self.content_hash.update(rel.encode("utf-8") + b"\0" + data + b"\0")
        if heldout:
            self.heldout.append(text)
            self.heldout_paths.append(rel)
        else:
            self.train.append(text)


def build_corpus(
    max_bytes: int | None = None, heldout_fraction: float = HELDOUT_FRACTION, root: Path | None = None
) -> Corpus:
    """Read the stdlib sources in sorted order; stop (cutting the last file) at `max_bytes` UTF-8 bytes."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    root = stdlib_root() if root is None else Path(root)
    sel = _Selection()
    for rel in list_source_files(root):
        if max_bytes is not None and sel.num_bytes >= max_bytes:
            break
        data = (root / rel).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            sel.skipped.append(rel)
            continue
        if max_bytes is not None and sel.num_bytes + len(data) > max_bytes:
            text = _truncate_utf8(data, max_bytes - sel.num_bytes)
        if text:
            sel.add(rel, text, is_heldout(rel, heldout_fraction))
    manifest = _manifest(root, sel, max_bytes=max_bytes, heldout_fraction=heldout_fraction)
    return Corpus(train_texts=sel.train, heldout_texts=sel.heldout, manifest=manifest)


def _nbytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def _manifest(root: Path, sel: _Selection, *, max_bytes: int | None, heldout_fraction: float) -> dict:
    licence_file = root / "LICENSE.txt"
    licence_sha = hashlib.sha256(licence_file.read_bytes()).hexdigest() if licence_file.exists() else None
    return {
        "source": f"CPython {platform.python_version()} standard library (.py sources)",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_path": str(root),
        "selection": {
            "glob": "**/*.py",
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "excluded_prefixes": list(EXCLUDED_PREFIXES),
            "max_file_bytes": MAX_FILE_BYTES,
            "order": "sorted by relative POSIX path",
            "max_bytes": max_bytes,
        },
        "licence": LICENCE,
        "licence_file": str(licence_file),
        "licence_file_sha256": licence_sha,
        "num_files": sel.num_files,
        "num_bytes": sel.num_bytes,
        "content_sha256": sel.content_hash.hexdigest(),
        "split": {
            "method": "sha256(relative path)[:8] mod 10000 < heldout_fraction * 10000 -> held-out",
            "heldout_fraction": heldout_fraction,
            "train_files": len(sel.train),
            "train_bytes": _nbytes(sel.train),
            "heldout_files": len(sel.heldout),
            "heldout_bytes": _nbytes(sel.heldout),
            "heldout_paths": sel.heldout_paths,
        },
        "skipped_undecodable": sel.skipped,
    }
