"""The training run's output folder: who may write to it, what a previous run left there, and its
checkpoints.

- A folder holding a finished run (an adapter or ``metrics.json``) or a different run is refused
  unless ``--overwrite`` (which removes that run's files, checkpoints included) or a resume.
- A lock file (``.pstar-run.lock``, holding the owner's PID and host) is held for the run's
  lifetime, so two runs never interleave in one folder; a lock whose process is gone is taken over.
- Checkpoints are ``checkpoint-N`` folders, complete once ``trainer_state.json`` exists (written
  last); ``--checkpoints-total-limit`` keeps the newest complete ones, like transformers'
  ``save_total_limit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from pstar_plugins.contract.errors import ConfigError

logger = logging.getLogger("pstar_plugins.train")

LOCK_NAME = ".pstar-run.lock"
RUN_MARKER = "run.json"
STATE_NAME = "trainer_state.json"


def check_writable(path: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} is a file, not a folder; choose another --output-dir.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"--output-dir {path}: {existing} is a file, so the folder cannot be created; choose another --output-dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--output-dir {path}: {existing} is not writable by this user; choose a writable --output-dir."
        )
    try:  # read-only file systems refuse even root; os.access does not always say so
        probe = existing / f".pstar-write-test-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ConfigError(
            f"--output-dir {path}: cannot write in {existing} ({exc.strerror}); choose a writable --output-dir."
        ) from None


# --------------------------------------------------------------------------- lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock file in the output folder, held from before the first write to the end.

    Created with ``O_EXCL`` so that of two runs starting together exactly one gets it. A lock left
    by a process that no longer exists (on this host) is stale and taken over.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self.created_directory = False
        self.held = False

    def acquire(self) -> "RunLock":
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created_directory = True
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (
                    owner.get("host") != socket.gethostname() or _alive(int(owner.get("pid", -1)))
                ):
                    self._undo_directory()
                    raise ConfigError(
                        f"--output-dir {self.directory} is in use by another run (PID {owner.get('pid')} on "
                        f"{owner.get('host')}, lock file {self.path}); wait for it to finish or choose another "
                        "--output-dir."
                    ) from None
                logger.warning(
                    "taking over the stale lock %s of PID %s, which no longer runs",
                    self.path,
                    owner.get("pid") if owner else "?",
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(record)
            self.held = True
            return self
        raise ConfigError(
            f"--output-dir {self.directory}: could not take the lock {self.path}; another run keeps recreating it."
        )

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written or unreadable: treated as stale

    def _undo_directory(self) -> None:
        if self.created_directory:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        if self.created_directory and not any(self.directory.iterdir()):
            self.directory.rmdir()  # a run that failed before writing leaves no folder behind

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- previous runs


def finished_run_files(out_dir: Path, plot: str | None) -> list[Path]:
    """What a finished run leaves in ``out_dir`` (adapter, metrics, plot)."""
    names = ["adapter", "metrics.json"] + ([plot] if plot else [])
    return [out_dir / n for n in names if (out_dir / n).exists()]


def check_previous_run(out_dir: Path, run_id: dict, overwrite: bool, resuming: bool, plot: str | None) -> None:
    """Refuse to replace another run's results without ``--overwrite``."""
    if overwrite:
        return
    marker = out_dir / RUN_MARKER
    if marker.exists() and not resuming:
        try:
            previous = json.loads(marker.read_text())
        except ValueError:
            previous = {}
        if previous != run_id:
            raise ConfigError(
                f"--output-dir {out_dir} holds a different run ({previous.get('method')}); "
                "choose another directory or pass --overwrite."
            )
    finished = finished_run_files(out_dir, plot)
    if finished and not resuming:
        raise ConfigError(
            f"--output-dir {out_dir} holds a finished run ({', '.join(p.name for p in finished)}); pass "
            "--overwrite to replace it (its checkpoints are removed too), --resume-from-checkpoint latest "
            "with a larger --max-steps to continue it, or choose another --output-dir."
        )


def clear_previous_run(out_dir: Path, plot: str | None) -> list[str]:
    """``--overwrite``: remove what an earlier run wrote here (only the files this script writes)."""
    removed = []
    for path in [*finished_run_files(out_dir, plot), *out_dir.glob("checkpoint-*"), out_dir / RUN_MARKER]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    if removed:
        logger.info("--overwrite: removed %s from %s", ", ".join(sorted(removed)), out_dir)
    return removed


# --------------------------------------------------------------------------- checkpoints


def complete_checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob("checkpoint-*") if (p / STATE_NAME).is_file() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_to_resume(value: str | None, out_dir: Path) -> Path | None:
    if not value:
        return None
    if value in ("latest", "latest-if-any"):
        done = complete_checkpoints(out_dir) if out_dir.is_dir() else []
        if done:
            return done[-1]
        if value == "latest-if-any":
            return None
        raise ConfigError(
            f"--resume-from-checkpoint latest: no complete checkpoint-* folder in {out_dir}; "
            "use latest-if-any to start fresh when there is none."
        )
    path = Path(value)
    if not (path / STATE_NAME).is_file():
        raise ConfigError(
            f"--resume-from-checkpoint {path}: not a complete checkpoint (no {STATE_NAME}); "
            "pass a checkpoint-N folder written by this script, or 'latest'."
        )
    return path


def check_resume(checkpoint: Path, method: str, max_steps: int) -> int:
    """The step ``checkpoint`` reached; refuses a checkpoint of another method or one past ``--max-steps``."""
    config = checkpoint / "adapter" / "adapter_config.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_text()).get("method")
        except ValueError:
            saved = None
        if saved and saved != method:
            raise ConfigError(
                f"--resume-from-checkpoint {checkpoint} is a {saved!r} run, but --method is {method!r}; "
                f"pass --method {saved}, or start a new run in another --output-dir."
            )
    step = int(json.loads((checkpoint / STATE_NAME).read_text())["step"])
    if step > max_steps:
        raise ConfigError(
            f"--resume-from-checkpoint {checkpoint} is at step {step}, past --max-steps {max_steps}; "
            f"pass --max-steps {step} or more to continue that run (or --overwrite to start again)."
        )
    return step


def prune_checkpoints(out_dir: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest ``keep`` (0: keep all)."""
    if keep <= 0:
        return []
    done = complete_checkpoints(out_dir)
    old = done[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


@contextlib.contextmanager
def claimed(out_dir: Path, run_id: dict, args, resuming: bool):
    """Hold the output folder for one run: the main process takes its lock, then (under the lock,
    so a run that finished meanwhile is seen) checks the previous run and clears it with
    ``--overwrite``. Other ranks take no lock: the main process holds the folder for them."""
    main_process = os.environ.get("RANK", "0") == "0"
    lock = RunLock(out_dir) if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        if main_process:
            check_previous_run(out_dir, run_id, args.overwrite, resuming, args.plot)
            if args.overwrite and not resuming:
                clear_previous_run(out_dir, args.plot)
        yield
    finally:
        if lock is not None:
            lock.release()
