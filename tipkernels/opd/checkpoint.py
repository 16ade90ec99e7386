"""Crash-safe checkpoint storage for the OPD loop: atomic writes, a digest manifest, verified and safe loads,
retention, finding the newest complete checkpoint (docs/design.md §9).

This module stores what it is given and knows nothing of the trainer: the trainer hands it a state dict
(:meth:`tipkernels.opd.OPDTrainer.state_dict`) and a function that writes the weights; it hands back the weights
and that state dict. Layout of ``checkpoint-<step>/``::

    student/              save_pretrained (safetensors) of the student, plus the tokenizer
    trainer_state.json    the state's plain-data entries (those that survive a JSON round trip unchanged)
    trainer_state.pt      the other entries (tensors, int-keyed dicts, tuples), read with weights_only=True
    manifest.json         format, format version, step, and the size and SHA-256 of every other file (written last)

**Nothing in a checkpoint can run code when it is loaded.** The weights are safetensors, the plain data is JSON,
and ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``, whose restricted unpickler builds only
tensors and plain containers (a file naming any other class or function is refused with :class:`CheckpointError`).
Checkpoints of format version 1 held a full pickle; they are refused, naming the file, and
:func:`convert_legacy` converts one you trust.

A checkpoint is written into a temporary sibling directory (``.tmp-checkpoint-<step>-<token>``); every file and
directory is fsynced, the manifest is written last, and only then is the directory renamed to its final name. A
directory without a valid manifest is therefore, by definition, partial. Loading checks the manifest first (every
listed file present, with its size and digest) and reads everything before returning, so a bad checkpoint raises
:class:`CheckpointError` (a ``ValueError``) naming the file and the problem before anything is applied.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

FORMAT = "tipkernels-opd-checkpoint"
FORMAT_VERSION = 2  # 1: trainer_state.pt was a full pickle (refused; see convert_legacy)
LEGACY_VERSIONS = (1,)
MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_FILE = "trainer_state.pt"  # the tensor part (format 2); the whole pickled state in format 1
WEIGHTS_DIR = "student"
TMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.tmp-checkpoint-(\d+)-")
_CHUNK = 1 << 20

PathLike = Union[str, Path]
State = Dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint is partial, corrupted, of an unsupported format, or holds content that is refused."""


def convert_command(path: PathLike) -> str:
    """The documented one-liner that converts the trusted legacy checkpoint ``path`` in place."""
    return f"python -c \"from tipkernels.opd.checkpoint import convert_legacy; convert_legacy('{path}')\""


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


def _is_json(value: Any) -> bool:
    """Whether ``value`` comes back unchanged from a JSON round trip: None, bool, str, int, float, and lists and
    str-keyed dicts of those (not tuples, int keys, numpy scalars or tensors)."""
    if value is None or type(value) in (bool, str, int, float):
        return True
    if type(value) is list:
        return all(_is_json(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_json(v) for k, v in value.items())
    return False


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


def write_state(directory: PathLike, step: int, state: State) -> None:
    """Write ``state`` (a dict with str keys) into ``directory``: the entries that are plain JSON data to
    ``trainer_state.json``, the others to ``trainer_state.pt`` (``torch.save``). Both files carry ``step``. The
    other entries may hold only what ``torch.load(weights_only=True)`` rebuilds (tensors, numbers, strings,
    None, lists, tuples, dicts, ``torch.Size``...); anything else is refused here rather than at load time."""
    directory = Path(directory)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise TypeError(f"a checkpoint state must be a dict with str keys, got {type(state).__name__}")
    plain = {k: v for k, v in state.items() if _is_json(v)}
    rest = {k: v for k, v in state.items() if k not in plain}
    _check_plain(rest, "state")
    with open(directory / STATE_JSON, "w") as f:
        json.dump({"format": FORMAT, "step": int(step), "entries": plain}, f)
    torch.save({"step": int(step), "entries": rest}, directory / STATE_FILE)


# what torch.load(weights_only=True) rebuilds without an allow-list (containers are walked)
_LEAVES = (torch.Tensor, torch.Size, torch.dtype, torch.device, bool, int, float, complex, str, bytes, type(None))


def _check_plain(value: Any, where: str) -> None:
    """TypeError unless ``value`` is made of tensors, numbers, strings, None, and lists, tuples and dicts of them:
    a state the weights-only reader would refuse is refused when it is written, not when it is needed."""
    if isinstance(value, _LEAVES):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise TypeError(f"checkpoint {where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint "
                        f"state holds only tensors, numbers, strings, None and lists, tuples and dicts of them")


def save(path: PathLike, step: int, state: State, write_weights: Callable[[Path], None]) -> Path:
    """Write a checkpoint to ``path`` atomically (:func:`write_atomic`): ``write_weights(dir)`` fills
    ``student/`` (``save_pretrained`` in safetensors), :func:`write_state` the state files."""

    def fill(tmp: Path) -> None:
        write_weights(tmp / WEIGHTS_DIR)
        write_state(tmp, step, state)

    return write_atomic(path, step, fill)


# ------------------------------------------------------------------------------------------------ checking


def _parse_manifest(path: Path) -> Dict[str, Any]:
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
    named = checkpoint_step(path)
    if named is not None and named != manifest["step"]:
        raise CheckpointError(f"checkpoint {path}: its name says step {named} but {MANIFEST} says "
                              f"step {manifest['step']}")
    return manifest


def read_manifest(path: PathLike) -> Dict[str, Any]:
    """The parsed, structurally valid manifest of ``path`` (CheckpointError if it is missing or malformed, or of
    another format version: a legacy one names its pickled ``trainer_state.pt`` and how to convert it)."""
    path = Path(path)
    manifest = _parse_manifest(path)
    version = manifest.get("format_version")
    if version in LEGACY_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path}: {STATE_FILE} is in the legacy format (manifest format_version {version}): a full "
            f"pickle, which is never loaded because unpickling it can run arbitrary code. If you trust this file "
            f"(you wrote it), convert the checkpoint once with: {convert_command(path)}")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format_version {version!r}; this version "
                              f"reads {FORMAT_VERSION}")
    return manifest


def _verify_files(path: Path, manifest: Dict[str, Any], digests: bool) -> None:
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


def verify(path: PathLike, *, digests: bool = True) -> Dict[str, Any]:
    """Check ``path`` against its manifest: every listed file present with the recorded size and (if
    ``digests``) SHA-256. Returns the manifest; raises :class:`CheckpointError` naming the first bad file.

    A matching digest shows the files are the ones the manifest lists, not that the manifest is honest: whoever
    can write the directory can rewrite both. Safety when loading comes from the readers (:func:`read`)."""
    path = Path(path)
    manifest = read_manifest(path)
    _verify_files(path, manifest, digests)
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


def read_weights(path: PathLike, manifest: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The student's state dict from ``path/student/`` (safetensors, single file or sharded; every file must be
    listed in ``manifest``). CheckpointError naming a missing or unreadable file."""
    from safetensors.torch import load_file

    root = Path(path)
    directory = root / WEIGHTS_DIR
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index: {e}") from None
        files = [directory / n for n in names]
    else:
        raise CheckpointError(f"checkpoint {root}: no model.safetensors(.index.json) in {WEIGHTS_DIR}/")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        try:  # a "../" or absolute shard name is never listed
            rel = f"{WEIGHTS_DIR}/{f.relative_to(directory).as_posix()}"
        except ValueError:
            rel = str(f)
        if rel not in manifest["files"]:
            raise CheckpointError(f"checkpoint {root}: {rel} is not listed in {MANIFEST}")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {root}: {rel} is missing")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise CheckpointError(f"checkpoint {root}: {rel} holds unreadable tensors: "
                                  f"{type(e).__name__}: {e}") from None
    return sd


def read_state(path: PathLike, manifest: Dict[str, Any]) -> State:
    """The state dict stored by :func:`write_state` in ``path``, without unpickling anything arbitrary:
    ``trainer_state.json`` with ``json``, ``trainer_state.pt`` with ``torch.load(weights_only=True)``.
    CheckpointError naming the file if one is missing from the manifest, unreadable, refused (it names objects
    other than tensors and plain containers, e.g. a pickle that would run code), or at another step."""
    path = Path(path)
    step = manifest["step"]
    for rel in (STATE_JSON, STATE_FILE):
        if rel not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {rel}")
    try:
        plain = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON or UTF-8 decoding
        raise CheckpointError(f"checkpoint {path}: {STATE_JSON} is unreadable: {e}") from None
    try:
        tensors = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a refused global, RuntimeError for a bad archive, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path}: {STATE_FILE} is refused: it is not a plain tensor file that "
            f"torch.load(weights_only=True) can read ({type(e).__name__}: {first[:300]}); nothing in it was "
            f"executed. This version never writes such a file: it was replaced or damaged") from None
    for rel, part in ((STATE_JSON, plain), (STATE_FILE, tensors)):
        if not (isinstance(part, dict) and isinstance(part.get("entries"), dict)
                and all(isinstance(k, str) for k in part["entries"])):
            raise CheckpointError(f"checkpoint {path}: {rel} is not a {FORMAT} state file")
        if part.get("step") != step:
            raise CheckpointError(f"checkpoint {path}: {rel} is at step {part.get('step')!r} but {MANIFEST} says "
                                  f"{step}")
    both = sorted(set(plain["entries"]) & set(tensors["entries"]))
    if both:
        raise CheckpointError(f"checkpoint {path}: {both} are stored in both {STATE_JSON} and {STATE_FILE}")
    return {**plain["entries"], **tensors["entries"]}


def read(path: PathLike) -> Tuple[Dict[str, torch.Tensor], State, Dict[str, Any]]:
    """Verify ``path`` and read it whole: ``(student state dict, state, manifest)``.

    Raises :class:`CheckpointError` for a partial, corrupted, legacy or refused checkpoint, FileNotFoundError if
    ``path`` does not exist. Nothing is applied anywhere and nothing arbitrary is unpickled."""
    path = Path(path)
    manifest = verify(path)
    sd = read_weights(path, manifest)
    state = read_state(path, manifest)
    return sd, state, manifest


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


def _newest(output_dir: PathLike, check: Callable[[Path], Any]) -> Tuple[Path, Any]:
    """The newest ``checkpoint-<step>`` for which ``check`` does not raise CheckpointError, with its result;
    the others are skipped with a warning naming them and the reason."""
    output_dir = Path(output_dir)
    skipped = []
    for step, p in candidates(output_dir):
        try:
            got = check(p)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {p}: {e}")
            skipped.append((p.name, str(e)))
            continue
        _warn_partial_writes(output_dir, step)
        return p, got
    _warn_partial_writes(output_dir, -1)
    extra = ""
    if skipped:
        extra = (f" (skipped as partial, corrupted or refused: {', '.join(n for n, _ in skipped)}; the newest "
                 f"because {skipped[0][1]})")
    raise FileNotFoundError(f"no complete checkpoint-<step>/ in {output_dir}{extra}")


def latest(output_dir: PathLike, *, digests: bool = True) -> Path:
    """The newest complete checkpoint of ``output_dir`` (manifest valid, files with their recorded sizes and, if
    ``digests``, SHA-256, tensor headers readable); partial or corrupted ones are skipped with a warning naming
    them. FileNotFoundError if there is none."""
    return _newest(output_dir, lambda p: check_tensor_headers(p, verify(p, digests=digests)))[0]


def read_latest(output_dir: PathLike) -> Tuple[Path, Dict[str, torch.Tensor], State]:
    """``(path, student state dict, state)`` of the newest checkpoint of ``output_dir`` that verifies and reads
    cleanly (:func:`read`); partial, corrupted or refused ones are skipped with a warning naming them.
    FileNotFoundError if there is none."""
    path, (sd, state, _) = _newest(output_dir, read)
    return path, sd, state


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


# ------------------------------------------------------------------------------------------ legacy format


def convert_legacy(path: PathLike, dest: Optional[PathLike] = None) -> Path:
    """Convert a checkpoint of format version 1 (``trainer_state.pt`` a full pickle) to the current format.

    **Only for a checkpoint you trust**: this is the one place that unpickles ``trainer_state.pt`` in full
    (``weights_only=False``), which runs whatever code the file names. The files are first checked against the
    old manifest (sizes and SHA-256). The result is written atomically to ``dest`` (default: ``path`` itself,
    replaced once the converted copy is complete) and returned. The old state's layout is mapped to the current
    one by :func:`tipkernels.opd.trainer.legacy_state`."""
    from .trainer import legacy_state  # the trainer owns its state's layout, old and new

    path = Path(path)
    dest = Path(dest) if dest is not None else path
    manifest = _parse_manifest(path)
    if manifest.get("format_version") not in LEGACY_VERSIONS:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format_version "
                              f"{manifest.get('format_version')!r}, not a legacy one {list(LEGACY_VERSIONS)}")
    _verify_files(path, manifest, digests=True)
    old = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # trusted by the caller
    if not isinstance(old, dict) or old.get("step") != manifest["step"]:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not a step-{manifest['step']} trainer state")
    state = legacy_state(old)
    src = path / WEIGHTS_DIR

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp / WEIGHTS_DIR)
        write_state(tmp, manifest["step"], state)

    return write_atomic(dest, manifest["step"], fill)
