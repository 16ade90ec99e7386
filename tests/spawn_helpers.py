"""Helpers for the tests that run several gloo processes with ``torch.multiprocessing.spawn``."""

from __future__ import annotations

import os
import socket
import sys

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_exit(rank: int, fn, *args) -> None:
    fn(rank, *args)
    # The worker's checks all passed. Leave without the interpreter's finalisation: gloo's C++ threads can still
    # hold objects then, and tearing them down races with it (seen as a rare SIGABRT, "terminate called without an
    # active exception", after every assertion had passed). A failure above still raises and reaches spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, args, nprocs: int) -> None:
    """``mp.spawn(fn, args, nprocs)`` whose workers exit hard once ``fn`` has returned."""
    mp.spawn(_run_then_exit, args=(fn, *args), nprocs=nprocs, join=True)
