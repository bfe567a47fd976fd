"""Every file path built from user text goes through here.

User text (variant keys made from grid values, spec names, MLflow experiment names) never
becomes a path component as is: `slug()` keeps letters, digits and `_ . = -`, never yields
`.`/`..`/an empty name, and appends a short hash of the original text whenever it changed
anything (so `a/b` and `a_b` never share a folder). Every write and every delete under a root
checks that the resolved target stays under that root (`inside`, `safe_rmtree`), and raises
`PathEscape` otherwise: a bug or a hostile spec can never touch files elsewhere.

Layout under a store directory (see lab.track.store_dir):
  checkpoints/<slug(experiment)>-<h(experiment)>/<slug(variant key)>-<variant hash>/
so two MLflow experiments never share a checkpoint folder, even with one spec name and hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from lab.errors import LabError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=\-]+")
MAX_SLUG = 80


class PathEscape(LabError):
    """A path built from user text would leave its root."""


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def slug(text: str, max_len: int = MAX_SLUG) -> str:
    """A single, safe path component for `text`: `[A-Za-z0-9_.=-]`, no leading dot or dash, never
    empty/'.'/'..'; a hash of the original is appended when anything had to change."""
    text = str(text)
    s = _UNSAFE.sub("_", text)
    s = re.sub(r"\.{2,}", "_", s)  # no '..' anywhere
    s = s.lstrip(".-_") or "_"
    changed = s != text
    if len(s) > max_len:
        s, changed = s[:max_len], True
    if changed:
        s = f"{s}~{short_hash(text)}"
    return s


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` resolved; raises PathEscape unless it is `root` itself or below it (symlinks resolved)."""
    r = Path(root).resolve()
    p = Path(path).resolve()
    if p != r and r not in p.parents:
        raise PathEscape(f"refusing to touch {p}: it is outside {r}")
    return p


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """root / slug(part) / ...; asserted to stay under root."""
    p = Path(root)
    for part in parts:
        p = p / slug(part)
    return inside(root, p)


def safe_rmtree(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Delete `path` (a folder) only if it lies strictly below `root`."""
    p = inside(root, path)
    if p == Path(root).resolve():
        raise PathEscape(f"refusing to delete the root folder {p} itself")
    if p.is_symlink():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def safe_unlink(path: str | os.PathLike, root: str | os.PathLike) -> None:
    p = Path(path)
    inside(root, p.parent)
    if p.is_symlink() or p.exists():
        p.unlink()


def experiment_dirname(experiment: str) -> str:
    """The folder of an MLflow experiment: its slug plus a hash of the exact name."""
    return f"{slug(experiment, 60)}-{short_hash(experiment)}"


def variant_dirname(key: str, variant_hash: str) -> str:
    return f"{slug(key, 80)}-{slug(variant_hash, 40)}"


def checkpoint_root(store: str | os.PathLike) -> Path:
    return Path(store) / "checkpoints"


def variant_checkpoint_dir(store: str | os.PathLike, experiment: str, key: str, variant_hash: str) -> Path:
    """<store>/checkpoints/<experiment dir>/<variant dir>, asserted to stay under checkpoints/."""
    root = checkpoint_root(store)
    p = root / experiment_dirname(experiment) / variant_dirname(key, variant_hash)
    inside(root, p)
    return p


def output_stem(root: str | os.PathLike, name: str) -> Path:
    """A file stem under `root` (e.g. out/) for a name built from experiment names (as given: relative
    stays relative), asserted to stay under `root`."""
    p = Path(root) / slug(name, 120)
    inside(root, p)
    return p
