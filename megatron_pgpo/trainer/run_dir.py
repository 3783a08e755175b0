"""Checkpoint directories that survive crashes and preemption.

Layout of ``run_dir/checkpoints``::

    step_00000050/          a complete checkpoint (renamed into place only after everything was written)
    step_00000100/
    step_00000150.tmp/      an interrupted save: ignored, removed by the next save
    latest                  text file naming the newest complete checkpoint (written atomically)

A save writes into a temporary directory, records every file's size (and the CRC-32 of files up to
``CHECKSUM_LIMIT`` bytes: metadata, trainer state) in ``manifest.json``, fsyncs, then renames it into place and
rewrites ``latest``; a crash at any point leaves the previous checkpoint loadable. ``resumable_checkpoint`` checks a
checkpoint against its manifest before anything loads it, and falls back to the previous complete checkpoint, with
a warning naming the damaged file, when the newest one was truncated or altered. (Tensor files above the limit are
checked by size only: hashing a 72B run's terabyte of optimizer state would take longer than the save.)

``PreemptionHandler`` turns SIGTERM / SIGUSR1 (what Slurm sends before preemption with ``--signal``) into a flag the
loop checks after each step, so it can save and exit cleanly.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import zlib
from pathlib import Path
from typing import Callable, List, Optional

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
#: files up to this size get a CRC-32 in the manifest (all get their size)
CHECKSUM_LIMIT = 64 << 20


def checkpoint_root(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: str) -> List[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str) -> Optional[Path]:
    """The newest complete checkpoint (``latest`` if it points at one, else the highest step), or None."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir() and _STEP_DIR.match(candidate.name):
            return candidate
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNNN)")
    return int(match.group(1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(run_dir: str, step: int, write: Callable[[Path], None], keep_last: int = 2,
                is_writer: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Run ``write(tmp_dir)`` (every rank, collective writers such as dist_checkpointing included), then on the
    writer rank move ``tmp_dir`` into place as ``step_NNNNNNNN``, update ``latest`` and prune old checkpoints.

    ``barrier`` synchronises ranks (e.g. ``torch.distributed.barrier``) so no rank returns before the rename.
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{step_dir_name(step)}.tmp"
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_writer:
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        write_manifest(tmp)
        _fsync_dir(tmp)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(directory: Path) -> None:
    """``directory/manifest.json``: ``{relative path: {"bytes": n[, "crc32": c]}}`` of every file under it."""
    files = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        files[str(path.relative_to(directory))] = ({"bytes": size, "crc32": _crc32(path)} if size <= CHECKSUM_LIMIT
                                                   else {"bytes": size})
    tmp = Path(directory) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    os.replace(tmp, Path(directory) / MANIFEST)


def checkpoint_problem(directory: Path) -> Optional[str]:
    """What is wrong with a checkpoint directory according to its manifest (a missing, truncated or altered
    file, naming it), or None when it matches. A checkpoint written before manifests existed has none: None."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for name, want in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size} bytes, {want['bytes']} were saved (truncated or overwritten)"
        if "crc32" in want and _crc32(path) != want["crc32"]:
            return f"{path} does not match its saved CRC-32 (corrupted)"
    return None


def resumable_checkpoint(run_dir: str) -> Optional[Path]:
    """The newest complete checkpoint that matches its manifest (``latest`` first, then the others newest first),
    warning about each damaged one it passes over; None when the run has no checkpoint.

    Raises:
        RuntimeError: every checkpoint of the run is damaged (never a silent restart from scratch).
    """
    newest = latest_checkpoint(run_dir)
    candidates = ([newest] if newest else []) + [p for p in reversed(complete_checkpoints(run_dir)) if p != newest]
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("resuming from %s instead", path.name)
            return path
        problems.append(problem)
        log.warning("checkpoint %s is damaged and will not be used: %s", path.name, problem)
    if problems:
        raise RuntimeError("every checkpoint in " + str(checkpoint_root(run_dir)) + " is damaged:\n  "
                           + "\n  ".join(problems) + "\nRestore one, or move the directory away to start afresh "
                           "(checkpoint.resume=false also starts afresh).")
    return None


class PreemptionHandler:
    """Sets ``requested`` on SIGTERM/SIGUSR1; the loop saves and exits at the next step boundary.

    A second signal while a save is pending is ignored (the save is already coming). ``restore()`` puts the
    previous handlers back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool = True):
        self.requested: Optional[int] = None
        self._previous = {}
        if enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self.requested is None:
            self.requested = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
