"""The output folder is owned: claimed, locked, staged and swapped in whole.

A build writes only into an empty folder or one an earlier bsafe-data build made (its marker
``.bsafe/build.json`` names the recipe); a folder built from another recipe is replaced only with
``force``; ``/`` and the home folder never. Beside the folder (same file system) live its lock
``.NAME.bsafe-lock``, the chunk work folder ``.NAME.bsafe-work/`` (kept until the dataset is in
place, so a killed build resumes) and the staging folder ``.NAME.bsafe-staging/``, where the whole
dataset is written before two renames swap it in. A failure at any point (disk full, read-only
file system, SIGKILL) leaves the previous complete dataset, or none: never a mixture. Files an
earlier build kept in ``.bsafe/`` (e.g. the audit store) move into the new folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bsafe_data.errors import BuildError

STATE_DIR = ".bsafe"
MARKER = f"{STATE_DIR}/build.json"


class OutputError(BuildError):
    """The output folder cannot be used (not ours, locked, not writable, disk full)."""


def os_error_message(exc: OSError, action: str) -> str:
    """One line for an OSError: what failed, where, and the errno name."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    where = exc.filename or ""
    return f"{action} failed: {exc.strerror or exc} ({name}){f': {where}' if where else ''}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The identity an earlier bsafe-data build left in ``folder`` (None when there is none)."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


class OutputFolder:
    """One build's claim on its output folder."""

    def __init__(self, target: Path, recipe_name: str, *, force: bool = False):
        self.target = Path(os.path.abspath(target))
        self.recipe_name = recipe_name
        self.force = force
        parent, name = self.target.parent, self.target.name
        self.work = parent / f".{name}.bsafe-work"
        self.staging = parent / f".{name}.bsafe-staging"
        self.previous = parent / f".{name}.bsafe-old"
        self.lock_path = parent / f".{name}.bsafe-lock"

    # -- claim --------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse folders this build must not touch (with a message that says why)."""
        home = Path.home().resolve()
        resolved = self.target.resolve()
        if resolved == Path(resolved.anchor) or resolved == home:
            raise OutputError(f"refusing to build into {resolved}: choose a folder of its own (--out DIR)")
        self.recover()
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"{self.target} exists and is not a folder")
        if not self.target.is_dir() or not any(self.target.iterdir()):
            return
        marker = read_marker(self.target)
        if marker is None:
            raise OutputError(
                f"{self.target} is not empty and was not made by bsafe-data: refusing to replace its "
                "files; choose an empty or new folder (--out DIR)"
            )
        if marker.get("recipe") != self.recipe_name and not self.force:
            raise OutputError(
                f"{self.target} holds a build of recipe {marker.get('recipe')!r}, not "
                f"{self.recipe_name!r}: pass --force to replace it"
            )

    def recover(self) -> None:
        """Finish or undo a swap a killed run left half done."""
        if self.previous.exists():
            if self.target.exists():
                shutil.rmtree(self.previous, ignore_errors=True)
            else:
                os.replace(self.previous, self.target)  # the killed run had moved the old one away

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock; a second build of the same folder is refused."""
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_path, "a+")  # noqa: SIM115 - held for the whole build
        except OSError as exc:
            raise OutputError(os_error_message(exc, f"locking {self.target}")) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                message = f"{self.target} is being built by {holder}: wait for it to finish"
                raise OutputError(message) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            handle.close()

    # -- staging and swap ---------------------------------------------------------------------
    def new_staging(self) -> Path:
        """An empty staging folder for the dataset."""
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.staging.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(os_error_message(exc, f"creating {self.staging}")) from None
        return self.staging

    def write_marker(self, folder: Path, recipe_sha256: str) -> None:
        """Mark ``folder`` as this build's."""
        (folder / STATE_DIR).mkdir(exist_ok=True)
        identity = {"tool": "bsafe-data", "recipe": self.recipe_name, "recipe_sha256": recipe_sha256}
        (folder / MARKER).write_text(json.dumps({**identity, "built_at": time.time()}) + "\n")

    def commit(self) -> None:
        """Swap the staged dataset in: the old folder aside, the new one in place, the old removed."""
        old_state = self.target / STATE_DIR
        if old_state.is_dir():
            for entry in old_state.iterdir():
                if not (self.staging / STATE_DIR / entry.name).exists():
                    os.replace(entry, self.staging / STATE_DIR / entry.name)
        if self.target.exists():
            os.replace(self.target, self.previous)
        os.replace(self.staging, self.target)
        shutil.rmtree(self.previous, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder (after a failure)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def finish(self) -> None:
        """The dataset is in place: chunks and lock file are no longer needed."""
        shutil.rmtree(self.work, ignore_errors=True)
        try:
            self.lock_path.unlink()
        except OSError:
            pass
