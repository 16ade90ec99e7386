"""Library-wide switches: ``tk.set_options(check_finite=..., deterministic=..., triton_config=...)``.

``check_finite`` (default True): every public op checks its float inputs for NaN/Inf first and raises a ValueError
naming the tensor and the first bad index (one extra read of the inputs and a host sync; turn off for speed).
``deterministic`` (default False): bitwise-identical outputs and gradients across repeated runs on the same machine
and software stack. The torch and reference backends (and the cuBLAS part of the triton backend's "matmul"
backward) then run their work inside :func:`deterministic_scope`, i.e.
under ``torch.use_deterministic_algorithms(True)`` (PyTorch picks deterministic kernels and *raises* on an op that
has none instead of silently varying; on CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` or ``:16:8`` set
before the process starts, else PyTorch raises a RuntimeError naming it). Independently of the flag, no backend uses
atomics: every output element is written by one program / one chunk, in a fixed order, so the torch backend on the
CPU and the triton backend (fixed grid, host-side merge of the vocabulary splits) are already reproducible run to
run; the flag makes that a checked guarantee for the PyTorch ops involved.
``triton_config`` (default None): a dict of Triton launch options (block sizes, warps, stages, backward strategy, the
forward/gradient strategies ``strategy`` / ``grad_strategy``; the keys of ``tipkernels.backends.triton.config.KEYS``) applied to every triton call, over the defaults and the tuned
tables; validated when set (KeyError for an unknown key, ValueError for a bad value). Needs triton installed.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class Options:
    check_finite: bool = True
    deterministic: bool = False
    triton_config: Optional[dict] = None


options = Options()


@contextlib.contextmanager
def deterministic_scope():
    """Within the block, ``torch.use_deterministic_algorithms(True)`` if ``options.deterministic`` (restored on
    exit, also on error); a no-op otherwise or when deterministic algorithms are already on."""
    if not options.deterministic or torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


def deterministic(fn):
    """Decorator: run ``fn`` inside :func:`deterministic_scope` (the flag is read at call time)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with deterministic_scope():
            return fn(*args, **kwargs)

    return wrapper


class set_options(contextlib.ContextDecorator):
    """Set options globally, or temporarily as a context manager: ``with tk.set_options(check_finite=False): ...``."""

    def __init__(self, **changes):
        known = {f.name for f in fields(Options)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        for name, value in changes.items():
            if name == "triton_config":
                if value is not None:
                    from .backends.triton.config import validate  # imports triton

                    changes[name] = validate(value, "tk.set_options triton_config")
            elif not isinstance(value, bool):
                raise TypeError(f"option {name} must be a bool, got {type(value).__name__}")
        self._previous = {name: getattr(options, name) for name in changes}
        for name, value in changes.items():
            setattr(options, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for name, value in self._previous.items():
            setattr(options, name, value)
        return False
