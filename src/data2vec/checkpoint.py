"""Crash-safe checkpoints.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_00001000/`:

    student.safetensors   the student (front-end, encoder, head or decoder)
    teacher.safetensors   the EMA teacher
    config.json           the fully resolved RunConfig
    state.pt              optimizer state, step, RNG state; plain tensors and containers,
                          loaded with torch.load(weights_only=True)
    manifest.json         format version, step, and the SHA-256 of every file above

A checkpoint is written into a temporary folder, every file is fsynced, and the folder
is renamed into place, so a crash mid-save leaves at worst a stray temporary folder,
never a half-written checkpoint. On resume, the newest checkpoint whose manifest and
checksums verify is used (`select_resume`); one that does not verify is never deleted: it is moved
to `checkpoints/set-aside/`, and rotation (`keep_last`) removes only checkpoints that verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from data2vec.writes import writing

FORMAT_VERSION = 1
FILES = ("student.safetensors", "teacher.safetensors", "config.json", "state.pt")


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    path: Path
    step: int
    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    config: dict[str, Any]
    state: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(final: Path, write: Callable[[Path], None], what: str = "a folder") -> None:
    """Create or replace the folder `final` atomically: `write(tmp)` fills a temporary sibling,
    which is fsynced and renamed into place; the old folder is removed only after the swap. If
    `write` or the swap fails, the temporary folder is removed and an existing `final` stays."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final, what, f"{final} is as it was" if final.exists() else ""):
            tmp.mkdir()
            write(tmp)
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _contiguous(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    config: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Atomically write checkpoint `step` and remove all but the newest `keep_last`: an older
    checkpoint that verifies is deleted, one that does not is set aside (never deleted)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with writing(final, "a checkpoint", "the previous checkpoint is intact"):
            save_file(_contiguous(student), str(tmp / "student.safetensors"))
            save_file(_contiguous(teacher), str(tmp / "teacher.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            with open(tmp / "state.pt", "wb") as f:  # a file object: a full disk surfaces as OSError(ENOSPC)
                torch.save(state, f)
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "sha256": {name: _sha256(tmp / name) for name in FILES},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for name in (*FILES, "manifest.json"):
                _fsync_file(tmp / name)
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if verify_checkpoint(old) is None:
            shutil.rmtree(old, ignore_errors=True)
        else:
            set_aside(old)
    return final


SET_ASIDE = "set-aside"


def set_aside(path: Path) -> Path:
    """Move a checkpoint that does not verify out of the way (`checkpoints/set-aside/`), where
    neither resume nor rotation touches it; returns where it went."""
    dest_root = path.parent / SET_ASIDE
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / path.name
    n = 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{path.name}.{n}"
    os.replace(path, dest)
    return dest


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary folders left by a process killed while saving."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for tmp in root.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and its checksums match, else what is wrong."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"unknown format version {manifest.get('format_version')!r}"
    for name in FILES:
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if _sha256(file) != manifest.get("sha256", {}).get(name):
            return f"checksum mismatch: {name} does not match its SHA-256 in manifest.json (truncated or corrupt)"
    return None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds: its manifest's, else its name's (step_00001000)."""
    try:
        return int(json.loads((path / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return int(path.name.removeprefix("step_").split(".")[0])
        except ValueError:
            why = "no readable manifest.json, no step_N name"
            raise CheckpointError(f"{path}: not a checkpoint folder ({why})") from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", *, verify: bool = True) -> Checkpoint:
    """Load one checkpoint folder without unpickling any code. `verify=False` skips the checksums
    (never the safe loading)."""
    if verify:
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
    for name in FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}")
    step = checkpoint_step(path)
    state = safe_torch_load(path / "state.pt", map_location)

    def weights(name: str) -> dict[str, Tensor]:
        try:
            return load_file(str(path / name), device=str(map_location))
        except SafetensorError as e:  # reached with verify=False only: a verified file reads
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({e})") from None

    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    return Checkpoint(
        path=path,
        step=step,
        student=weights("student.safetensors"),
        teacher=weights("teacher.safetensors"),
        config=config,
        state=state,
    )


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load that only accepts tensors and plain containers: no pickled code ever runs. A
    refused pickle, a file that is not torch's and a torn one each raise CheckpointError, one line
    naming the file and what was found (never torch's advice on loading the file unsafely)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not refused_globals(e) and torch_file_format(path) is None:
            raise CheckpointError(f"{path}: {NOT_A_TORCH_FILE}") from None
        raise CheckpointError(
            f"{path}: refused to load: {refusal_reason(e)}; only tensors and plain containers are read, "
            "and nothing from the file was executed"
        ) from None
    except Exception as e:  # torn, corrupt or not torch's: RuntimeError, EOFError, IndexError, KeyError, ...
        problem = NOT_A_TORCH_FILE if torch_file_format(path) is None else unreadable_torch_file(e)
        raise CheckpointError(f"{path}: {problem}") from None


TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The number a file in torch's legacy (non-zip) format starts with, pickled."""

NOT_A_TORCH_FILE = "not a torch checkpoint file (neither a zip archive nor torch's legacy format)"

_TORCH_ADVICE = ("weights_only", "can still be loaded", "trust", "safe_globals", "file an issue", "PyTorch 2.6")
"""Phrases of torch's hints on loading a refused file anyway: never repeated to the user."""


def torch_file_format(path: Path) -> str | None:
    """'zip' or 'legacy' for a file in one of torch.save's formats, else None; read without
    unpickling (the legacy format's first pickle, a few bytes, holds its magic number).
    FileNotFoundError if there is no such file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        return "zip"
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        first = [arg for _, arg, _ in pickletools.genops(head)]
    except Exception:  # not a pickle: random bytes, text, another format
        return None
    return "legacy" if TORCH_LEGACY_MAGIC in first else None


def refused_globals(e: Exception) -> list[str]:
    """The globals torch's weights-only reader names in its error `e` (sorted; empty if none)."""
    # torch writes a builtin without its module ("GLOBAL exec"): put it back
    return sorted({n if "." in n else f"builtins.{n}" for n in re.findall(r"GLOBAL ([\w.]+)", str(e))})


def refusal_reason(e: Exception) -> str:
    """What torch's weights-only reader refused, from its error: the globals it names, else the
    reader's own complaint; without torch's advice on loading the file with weights_only=False."""
    names = refused_globals(e)
    if names:
        return f"it pickles {', '.join(names)}"
    text = str(e)
    detail = text.rsplit("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load", 1)[0]
    lines = [ln.strip().removeprefix("Weights only load failed.").strip() for ln in detail.splitlines()]
    lines = [ln for ln in lines if ln and not any(a in ln for a in _TORCH_ADVICE)]
    found = re.search(r"but got (.+)$", lines[0]) if lines else None
    what = f"an unsupported {found.group(1)}" if found else lines[0] if lines else "an unsupported construct"
    return f"its pickle holds what the safe reader does not accept ({what})"


def unreadable_torch_file(e: Exception) -> str:
    """A torn or corrupt torch file's problem, in one line (torch's first sentence)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = first.split(". ", 1)[0].rstrip(".")
    return f"unreadable torch file, truncated or corrupt ({type(e).__name__}{': ' + first if first else ''})"


@dataclass
class ResumeChoice:
    """What a resume starts from: `path` (None: step 0), and the newer checkpoints that did not
    verify (to be set aside, with the reason for each)."""

    path: Path | None
    verified: bool
    rejected: list[tuple[Path, str]]


RESUME_WAYS_OUT = (
    "resume from a checkpoint you trust with --resume-from STEP_DIR, load the newest one without its "
    "checksums with --ignore-checksums, or start over from step 0 with --force-fresh (every checkpoint is "
    "kept in checkpoints/set-aside/)"
)


@dataclass(frozen=True)
class ResumeOptions:
    """How a resume picks its checkpoint (`select_resume`)."""

    resume_from: Path | None = None
    ignore_checksums: bool = False
    force_fresh: bool = False


def select_resume(run_dir: Path, options: ResumeOptions = ResumeOptions()) -> ResumeChoice:
    """Which checkpoint `--resume` continues from. Reads only; nothing is moved or deleted here.

    `resume_from`: that checkpoint folder (verified unless `ignore_checksums`). Otherwise the newest
    checkpoint that verifies; when none does: the newest one as it is with `ignore_checksums`, step 0
    with `force_fresh`, else a CheckpointError naming each checkpoint and its problem."""
    resume_from, ignore_checksums, force_fresh = options.resume_from, options.ignore_checksums, options.force_fresh
    if resume_from is not None:
        resume_from = Path(resume_from)
        if not (resume_from / "manifest.json").is_file() and not (resume_from / "student.safetensors").is_file():
            raise CheckpointError(f"{resume_from}: not a checkpoint folder (no manifest.json)")
        problem = None if ignore_checksums else verify_checkpoint(resume_from)
        if problem is not None:
            raise CheckpointError(f"{resume_from}: {problem}; pass --ignore-checksums to load it as it is")
        step = checkpoint_step(resume_from)
        newer = [(p, f"newer than --resume-from {resume_from}") for p in list_checkpoints(run_dir)]
        newer = [(p, why) for p, why in newer if checkpoint_step(p) >= step and p.resolve() != resume_from.resolve()]
        return ResumeChoice(resume_from, not ignore_checksums, newer)
    rejected: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return ResumeChoice(path, True, rejected)
        rejected.append((path, problem))
    if rejected and ignore_checksums:
        return ResumeChoice(rejected[0][0], False, [])
    if force_fresh:
        return ResumeChoice(None, False, rejected)
    if rejected:
        found = "; ".join(f"{p}: {why}" for p, why in rejected)
        raise CheckpointError(f"{run_dir}: no checkpoint verifies ({found}). Nothing was changed: {RESUME_WAYS_OUT}")
    raise CheckpointError(
        f"{run_dir}: no checkpoint to resume from yet. Pass --force-fresh to start it from step 0 "
        "(a job script that requeues may always pass it: it never discards a checkpoint)"
    )


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return load_checkpoint(path, map_location)
        warnings.warn(f"skipping corrupt checkpoint {path}: {problem}", stacklevel=2)
    return None
