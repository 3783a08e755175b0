"""Checkpoint directories that survive crashes and preemption.

Layout of ``run_dir/checkpoints``::

    step_00000050/          a complete checkpoint (renamed into place only after everything was written)
    step_00000100/
    step_00000150.tmp-<pid>/  an interrupted save: ignored, removed by the next save
    latest                  text file naming the newest complete checkpoint (written atomically)

A save writes into a temporary directory, fsyncs, then renames it into place and rewrites ``latest``; a crash at
any point leaves the previous checkpoint loadable. ``PreemptionHandler`` turns SIGTERM / SIGUSR1 (what Slurm sends
before preemption with ``--signal``) into a flag the loop checks after each step, so it can save and exit cleanly.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable, List, Optional

_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
