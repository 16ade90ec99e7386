"""Crash-safe checkpoints of the OPD loop: atomic writes, a digest manifest, verified loads, retention.

Layout of ``checkpoint-<step>/``::

    student/              save_pretrained (safetensors) of the student, plus the tokenizer
    trainer_state.pt      optimizer, scheduler, step, history, config, prompt order and every RNG state
    manifest.json         format version, step, and the size and SHA-256 of every other file (written last)

A checkpoint is written into a temporary sibling directory (``.tmp-checkpoint-<step>-<token>``); every file and
directory is fsynced, the manifest is written last, and only then is the directory renamed to its final name. A
directory without a valid manifest is therefore, by definition, partial. Loading checks the manifest first (every
listed file present, with its size and digest) and reads everything before touching the trainer, so a bad
checkpoint raises :class:`CheckpointError` (a ``ValueError``) naming the file and the problem and leaves the
trainer as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

FORMAT = "tipkernels-opd-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"
WEIGHTS_DIR = "student"
TMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.tmp-checkpoint-(\d+)-")
_CHUNK = 1 << 20

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint is partial or corrupted (missing file, size or digest mismatch, unreadable content)."""


# --------------------------------------------------------------------------------------------- small helpers


def checkpoint_step(path: PathLike) -> Optional[int]:
    """The step of a directory named ``checkpoint-<step>``, else None."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _sha256(path: Path, *, fsync: bool = False) -> Tuple[int, str]:
    """Size and SHA-256 of a file; with ``fsync`` its bytes are also on disk when this returns."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _files(root: Path) -> List[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ writing


def write_atomic(path: PathLike, step: int, fill: Callable[[Path], None]) -> Path:
    """Create the checkpoint directory ``path`` atomically.

    ``fill(tmp)`` writes the content into a fresh temporary directory next to ``path``; then every file is
    fsynced and hashed, ``manifest.json`` is written (itself via a temporary file, fsynced), the directory is
    fsynced and renamed to ``path``. An existing ``path`` is replaced only after the new one is complete. If
    anything fails (or the process dies) before the rename, ``path`` is untouched and only the temporary
    directory remains (``latest`` ignores it with a warning; the next save in that directory removes it).
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{step}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        fill(tmp)
        files = {}
        for rel in _files(tmp):
            if rel == MANIFEST:
                raise RuntimeError(f"the checkpoint content may not contain {MANIFEST}")
            size, digest = _sha256(tmp / rel, fsync=True)
            files[rel] = {"size": size, "sha256": digest}
        for d in sorted({(tmp / rel).parent for rel in files}, key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                    "created_unix": time.time(), "files": files}
        part = tmp / (MANIFEST + ".part")
        with open(part, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / MANIFEST)
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = parent / f"{TMP_PREFIX}{step}-old-{uuid.uuid4().hex[:12]}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def trainer_state(trainer) -> Dict[str, Any]:
    """Everything of an :class:`OPDTrainer` besides the weights needed to continue bit-identically: optimizer,
    scheduler, step, histories, config, the prompt stream (its RNG and the rest of the current epoch's order),
    the selection generator and the global Python / NumPy / torch (CPU and CUDA) RNG states."""
    state = {
        "step": trainer.step,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "history": trainer.history,
        "eval_history": trainer.eval_history,
        "config": trainer.config.to_dict(),
        "prompt_rng": trainer._prompt_rng.getstate(),
        "prompt_order": list(trainer._order),
        "num_prompts": len(trainer.prompts),
        "selection_rng": trainer._selection_gen.get_state(),
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    try:
        import numpy as np

        state["numpy_rng"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def save_trainer(trainer, path: PathLike) -> Path:
    """Write ``trainer``'s checkpoint to ``path`` atomically (see :func:`write_atomic`)."""
    from .models import unwrap

    model = unwrap(trainer.student)
    state = trainer_state(trainer)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / WEIGHTS_DIR, safe_serialization=True)
        if hasattr(trainer.tokenizer, "save_pretrained"):
            trainer.tokenizer.save_pretrained(tmp / WEIGHTS_DIR)
        torch.save(state, tmp / STATE_FILE)

    return write_atomic(path, trainer.step, fill)


# ------------------------------------------------------------------------------------------------ checking


def read_manifest(path: PathLike) -> Dict[str, Any]:
    """The parsed, structurally valid manifest of ``path`` (CheckpointError if it is missing or malformed)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path} is partial: {MANIFEST} is missing (it is written last, so the "
                              f"save did not finish, or the directory was not written by this version)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable: {e}") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT
          and isinstance(manifest.get("files"), dict) and isinstance(manifest.get("step"), int)
          and all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                  for v in manifest["files"].values()))
    if not ok:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format_version "
                              f"{manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    named = checkpoint_step(path)
    if named is not None and named != manifest["step"]:
        raise CheckpointError(f"checkpoint {path}: its name says step {named} but {MANIFEST} says "
                              f"step {manifest['step']}")
    for rel in (STATE_FILE,):
        if rel not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {rel}")
    return manifest


def verify(path: PathLike, *, digests: bool = True) -> Dict[str, Any]:
    """Check ``path`` against its manifest: every listed file present with the recorded size and (if
    ``digests``) SHA-256. Returns the manifest; raises :class:`CheckpointError` naming the first bad file."""
    path = Path(path)
    manifest = read_manifest(path)
    for rel, meta in sorted(manifest["files"].items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {rel} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: {rel} has {size} bytes, {MANIFEST} records "
                                  f"{meta['size']} (truncated or overwritten)")
        if digests:
            got = _sha256(f)[1]
            if got != meta["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {rel} is corrupted: SHA-256 {got[:16]}… does not "
                                      f"match {meta['sha256'][:16]}… recorded in {MANIFEST}")
    return manifest


def check_tensor_headers(path: PathLike, manifest: Dict[str, Any]) -> None:
    """Parse the header of every ``.safetensors`` file the manifest lists (cheap: no tensor data is read), so
    that a file that was already bad when it was hashed is caught too. CheckpointError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    for rel in sorted(manifest["files"]):
        if rel.endswith(".safetensors"):
            try:
                with safe_open(str(path / rel), framework="pt") as f:
                    list(f.keys())
            except Exception as e:
                raise CheckpointError(f"checkpoint {path}: {rel} holds unreadable tensors: "
                                      f"{type(e).__name__}: {e}") from None


def is_complete(path: PathLike, *, digests: bool = False) -> bool:
    try:
        verify(path, digests=digests)
        return True
    except (CheckpointError, OSError):
        return False


# ------------------------------------------------------------------------------------------------ reading


def _read_weights(directory: Path, manifest: Dict[str, Any], root: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index: {e}") from None
        files = [directory / n for n in names]
    else:
        raise CheckpointError(f"checkpoint {root}: no model.safetensors(.index.json) in {directory.name}/")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)
        if manifest is not None and rel not in manifest["files"]:
            raise CheckpointError(f"checkpoint {root}: {rel} is not listed in {MANIFEST}")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {root}: {rel} is missing")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise CheckpointError(f"checkpoint {root}: {rel} holds unreadable tensors: "
                                  f"{type(e).__name__}: {e}") from None
    return sd


def apply_weights(model: nn.Module, sd: Dict[str, torch.Tensor], where: PathLike) -> None:
    """Load a state dict into ``model`` in place; keys may be missing only for parameters tied to a loaded one
    (e.g. a tied lm_head)."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {where} has weights the model lacks: {unexpected[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in sd if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"checkpoint {where} lacks weights {untied[:5]}")


def load_weights(model: nn.Module, directory: PathLike) -> None:
    """Load ``save_pretrained`` safetensors weights (single file or sharded) from ``directory`` into ``model``."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file() and not (directory / "model.safetensors.index.json").is_file():
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {directory}")
    apply_weights(model, _read_weights(directory, None, directory), directory)


def read(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """Verify ``path`` and read it whole: ``(student state dict, trainer state, manifest)``.

    Raises :class:`CheckpointError` for a partial or corrupted checkpoint, FileNotFoundError if ``path`` does
    not exist. Nothing is applied anywhere."""
    path = Path(path)
    manifest = verify(path)
    sd = _read_weights(path / WEIGHTS_DIR, manifest, path)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable: {type(e).__name__}: {e}") from None
    need = ("step", "optimizer", "scheduler", "history", "config", "prompt_rng", "prompt_order", "selection_rng",
            "python_rng", "torch_rng")
    lacking = [k for k in need if not isinstance(state, dict) or k not in state]
    if lacking:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks {lacking}")
    if int(state["step"]) != manifest["step"]:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is at step {state['step']} but {MANIFEST} says "
                              f"{manifest['step']}")
    return sd, state, manifest


def restore_trainer(trainer, sd: Dict[str, torch.Tensor], state: Dict[str, Any], where: PathLike) -> None:
    """Apply what :func:`read` returned to ``trainer`` (weights, optimizer, scheduler, step, history, RNGs)."""
    from .config import OPDConfig
    from .models import unwrap

    if "num_prompts" in state and state["num_prompts"] != len(trainer.prompts):
        warnings.warn(f"checkpoint {where} was written with {state['num_prompts']} prompts, this trainer has "
                      f"{len(trainer.prompts)}: the data order will not continue the original run's")
    if any(i >= len(trainer.prompts) for i in state["prompt_order"]):
        raise ValueError(f"checkpoint {where}: its prompt order indexes past this trainer's "
                         f"{len(trainer.prompts)} prompts")
    saved = OPDConfig.from_dict({k: v for k, v in state["config"].items()
                                 if k in OPDConfig.__dataclass_fields__})
    for name in ("rule", "ratio", "divergence", "batch_size", "grad_accum", "rollouts_per_prompt", "seed"):
        if getattr(saved, name) != getattr(trainer.config, name):
            warnings.warn(f"resuming with {name}={getattr(trainer.config, name)!r}, checkpoint used "
                          f"{getattr(saved, name)!r}")
    apply_weights(unwrap(trainer.student), sd, where)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step = int(state["step"])
    trainer.history = list(state["history"])
    trainer.eval_history = list(state.get("eval_history", []))
    trainer._prompt_rng.setstate(state["prompt_rng"])
    trainer._order = list(state["prompt_order"])
    trainer._selection_gen.set_state(state["selection_rng"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state.get("numpy_rng") is not None:
        import numpy as np

        np.random.set_state(state["numpy_rng"])


def load_trainer(trainer, path: PathLike) -> None:
    """Verify, read and apply the checkpoint ``path`` to ``trainer`` (the trainer is untouched on error)."""
    sd, state, _ = read(path)
    restore_trainer(trainer, sd, state, path)


# ------------------------------------------------------------------------------------- finding and pruning


def candidates(output_dir: PathLike) -> List[Tuple[int, Path]]:
    """``(step, dir)`` of every ``checkpoint-<step>`` directory in ``output_dir``, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda t: t[0], reverse=True)


def partial_writes(output_dir: PathLike) -> List[Path]:
    """Temporary directories of saves that never finished (e.g. the process was killed while writing)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and _TMP_NAME.match(p.name))


def _warn_partial_writes(output_dir: Path, newer_than: int) -> None:
    for p in partial_writes(output_dir):
        step = int(_TMP_NAME.match(p.name).group(1))
        if step > newer_than:
            warnings.warn(f"ignoring partial checkpoint {p} (step {step}): its save was interrupted before "
                          f"completion")


def latest(output_dir: PathLike, *, digests: bool = True) -> Path:
    """The newest complete checkpoint of ``output_dir`` (manifest valid, files with their recorded sizes and, if
    ``digests``, SHA-256, tensor headers readable); partial or corrupted ones are skipped with a warning naming
    them. FileNotFoundError if there is none."""
    output_dir = Path(output_dir)
    skipped = []
    for step, p in candidates(output_dir):
        try:
            check_tensor_headers(p, verify(p, digests=digests))
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {p}: {e}")
            skipped.append(p.name)
            continue
        _warn_partial_writes(output_dir, step)
        return p
    _warn_partial_writes(output_dir, -1)
    extra = f" (skipped as partial or corrupted: {', '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"no complete checkpoint-<step>/ in {output_dir}{extra}")


def load_latest(trainer, output_dir: PathLike) -> Path:
    """Load the newest checkpoint of ``output_dir`` that verifies and reads cleanly; partial or corrupted ones
    are skipped with a warning naming them. Returns its path (FileNotFoundError if there is none)."""
    output_dir = Path(output_dir)
    skipped = []
    for step, p in candidates(output_dir):
        try:
            sd, state, _ = read(p)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {p}: {e}")
            skipped.append(p.name)
            continue
        _warn_partial_writes(output_dir, step)
        restore_trainer(trainer, sd, state, p)
        return p
    _warn_partial_writes(output_dir, -1)
    extra = f" (skipped as partial or corrupted: {', '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"no complete checkpoint-<step>/ in {output_dir}{extra}")


def prune(output_dir: PathLike, keep: int, current: int) -> List[Path]:
    """Retention, run after checkpoint ``current`` is complete: keep it and the ``keep - 1`` newest complete
    checkpoints before it (``keep=0``: keep all); delete the other ``checkpoint-<step>`` directories with a lower
    step (complete or not) and leftover temporary directories of saves up to ``current``. Checkpoints with a
    higher step (from an earlier run that went further) are left alone. Returns what was deleted."""
    output_dir = Path(output_dir)
    deleted = []
    for p in partial_writes(output_dir):
        if int(_TMP_NAME.match(p.name).group(1)) <= current:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    if keep <= 0:
        return deleted
    older = [(s, p) for s, p in candidates(output_dir) if s < current]
    kept = 1
    for s, p in older:  # newest first
        if kept < keep and is_complete(p):
            kept += 1
            continue
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
    return deleted
