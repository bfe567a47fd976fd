"""Checkpoint files you can trust: atomic writes, a checksum beside each file, one previous kept.

`write_atomic(path, write)`: `write(tmp)` fills a temporary file next to `path`; it is fsynced,
its SHA-256 goes to `<path>.sha256`, the current `path` (if any) becomes `<stem>.prev<suffix>`
(with its checksum) and the temporary file is renamed over `path` (an atomic rename on POSIX),
then the folder is fsynced. A crash at any point leaves either the old or the new file whole.

`pick_resume(folder)`: the newest checkpoint that verifies (`last.ckpt`, else `last.prev.ckpt`).
A file that does not verify (truncated, empty, garbage, checksum mismatch) is moved aside as
`<name>.corrupt-<YYYYmmdd-HHMMSS>` and reported with its path; the caller records the notes on
the run. Files without a checksum (written by older versions) are checked as zip archives
(what `torch.save` writes), member CRCs included, without unpickling anything.

`owner(folder)` / `set_owner(folder, run_id, experiment)`: the MLflow run a checkpoint folder belongs
to (its `run.json`); only that run may resume from it. `resume_tags(tags, last, notes)`: what a
resumed run records (how often, from which file, what was unreadable).

`apply_retention(folder, keep)`: after a FINISHED run, `tracking.keep`:
  final  (default) keep only the final weights, once: `final.pt` here unless it was logged to
         MLflow (tracking.log_checkpoint), then the folder goes; resume checkpoints are deleted
  last   also keep `last.ckpt` (to continue training later)
  all    keep everything
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lab import record as R

LAST = "last.ckpt"
PREV = "last.prev.ckpt"
FINAL = "final.pt"
SUFFIX = ".sha256"
KEEP = ("final", "last", "all")


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, write: Callable[[Path], None], keep_previous: bool = True) -> Path:
    """Write `path` through `write(tmp)` atomically with a checksum; the old file becomes the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        if keep_previous and path.is_file():
            prev = path.with_name(PREV) if path.name == LAST else path.with_name(f"{path.stem}.prev{path.suffix}")
            os.replace(path, prev)
            if sidecar(path).is_file():
                os.replace(sidecar(path), sidecar(prev))
            else:
                sidecar(prev).unlink(missing_ok=True)
        os.replace(tmp, path)
        _write_text_atomic(sidecar(path), f"{digest}  {path.name}\n")
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def verify(path: Path) -> Optional[str]:
    """None when `path` is a whole checkpoint, else why not (one line)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    side = sidecar(path)
    if side.is_file():
        want = side.read_text().split()[0] if side.read_text().split() else ""
        got = sha256_file(path)
        return None if got == want else f"checksum mismatch (sha256 {got[:12]}..., recorded {want[:12]}...)"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"damaged member {bad}"
    except zipfile.BadZipFile:
        return f"not a torch checkpoint archive ({size} bytes)"
    except OSError as e:
        return f"unreadable: {e}"


def move_aside(path: Path) -> Path:
    dst = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dst.exists():
        dst = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, dst)
    sidecar(path).unlink(missing_ok=True)
    return dst


def pick_resume(folder: Path) -> tuple[Optional[Path], list[str]]:
    """(checkpoint to resume from or None, notes on files found unreadable and moved aside)."""
    notes: list[str] = []
    for name in (LAST, PREV):
        p = Path(folder) / name
        if not p.exists():
            continue
        why = verify(p)
        if why is None:
            if name == PREV and notes:
                notes.append(f"resuming from the previous checkpoint {p}")
            return p, notes
        moved = move_aside(p)
        notes.append(f"{p} is unreadable ({why}); moved to {moved.name}")
    return None, notes


OWNER_FILE = "run.json"


def owner(folder: Path) -> Optional[str]:
    """The run id the checkpoint folder belongs to, None when unknown (missing or unreadable run.json)."""
    try:
        return json.loads((folder / OWNER_FILE).read_text()).get("run_id")
    except Exception:  # noqa: BLE001 - missing or unreadable: owned by nobody
        return None


def set_owner(folder: Path, run_id: str, experiment: str) -> None:
    (folder / OWNER_FILE).write_text(json.dumps({"run_id": run_id, "experiment": experiment}))


def resume_tags(tags: Mapping[str, str], last: Path, notes: list[str]) -> dict[str, Any]:
    """The tags of a run resumed from checkpoint `last`, given its current `tags`: one more resume, the
    file, and the recovery `notes` of `pick_resume` when there are any."""
    out: dict[str, Any] = {R.RESUMED: int(tags.get(R.RESUMED, "0")) + 1, R.RESUMED_FROM: last.name}
    if notes:
        out[R.CHECKPOINT_RECOVERY] = "; ".join(notes)[:5000]
    return out


def apply_retention(folder: Path, keep: str, final_logged: bool, root: Path) -> list[Path]:
    """Delete what `keep` does not ask for after a FINISHED run; returns what was deleted."""
    from lab import paths

    folder = Path(folder)
    if keep == "all" or not folder.is_dir():
        return []
    gone: list[Path] = []
    drop = [PREV, PREV + SUFFIX]
    if keep == "final":
        drop += [LAST, LAST + SUFFIX]
    for name in drop:
        p = folder / name
        if p.exists():
            paths.safe_unlink(p, root)
            gone.append(p)
    if keep == "final" and final_logged:
        if (folder / FINAL).exists():
            gone.append(folder / FINAL)
        paths.safe_rmtree(folder, root)
    return gone
