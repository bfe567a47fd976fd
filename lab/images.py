"""Image files checked before training: every header opened and verified by Pillow, in parallel, cached.

`verify_tree(root)` walks `root` (an ImageFolder split), runs `PIL.Image.open(f).verify()` on every
image file in a thread pool, and returns the bad ones with the reason (truncated, not an image,
empty, unreadable). Results are cached per file by (size, mtime) in
`<cache dir>/imagecheck/<hash of root>.json`, so a second run over an unchanged ImageNet tree only
stats the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional


def check_one(path: str) -> Optional[str]:
    """None if Pillow can open and verify `path`, else why not (one line)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            im.verify()
        return None
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, SyntaxError, ValueError) as e:  # truncated/damaged data; verify() raises SyntaxError too
        return f"damaged ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        return f"unreadable ({type(e).__name__})"


def _cache_file(cache_dir: Path, root: Path) -> Path:
    return cache_dir / "imagecheck" / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16] + ".json")


def verify_files(
    files: Iterable[str],
    *,
    cache_dir: Optional[Path] = None,
    root: Optional[Path] = None,
    workers: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, str]:
    """{path: reason} of the files that do not verify."""
    files = list(files)
    cache: dict[str, list] = {}
    cfile = _cache_file(cache_dir, root) if cache_dir is not None and root is not None else None
    if cfile is not None and cfile.is_file():
        try:
            cache = json.loads(cfile.read_text())
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            cache = {}
    todo, bad, fresh = [], {}, {}
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            bad[f] = f"unreadable ({e.strerror})"
            continue
        sig = [st.st_size, st.st_mtime_ns]
        hit = cache.get(f)
        if hit is not None and hit[:2] == sig:
            fresh[f] = hit
            if hit[2]:
                bad[f] = hit[2]
        else:
            todo.append((f, sig))
    if todo:
        n = workers or min(16, (os.cpu_count() or 2) * 2)
        with ThreadPoolExecutor(max_workers=n) as pool:
            for i, ((f, sig), why) in enumerate(zip(todo, pool.map(lambda t: check_one(t[0]), todo, chunksize=64))):
                fresh[f] = [*sig, why]
                if why:
                    bad[f] = why
                if progress is not None and (i + 1) % 1000 == 0:
                    progress(i + 1, len(todo))
    if cfile is not None and todo:
        try:
            cfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = cfile.with_name(f"{cfile.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cfile)
        except OSError:
            pass  # no cache: the next run checks again
    return bad


def image_files(root: Path, is_image: Callable[[str], bool]) -> list[str]:
    out: list[str] = []
    for d, _dirs, names in os.walk(root, followlinks=True):
        out.extend(os.path.join(d, n) for n in names if is_image(n))
    return sorted(out)


def describe_bad(bad: dict[str, str], root: Path, limit: int = 5) -> str:
    items = sorted(bad.items())
    shown = "; ".join(f"{os.path.relpath(p, root)}: {why}" for p, why in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} bad image file(s): {shown}{more}"
