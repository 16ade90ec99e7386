"""Ahead-of-time compiles of exactly what the backend launches, for a GPU this machine need not have.

Used by ``tests/backends/test_triton_compile.py`` (sm_90 checks: spills, registers, shared memory, wgmma) and by
``benchmarks/inspect_kernels.py`` (the per-kernel table and the .ptx/.cubin dumps); written once here.

Flow: run the backend's entry points under :func:`.launch.recorded_launches` (kernels, arguments, constexprs and
launch options exactly the backend's own); :func:`specialise` turns each launch into a signature with Triton's own JIT
binder (the same int / alignment specialisation as a real launch); :func:`distinct` drops repeats; :func:`compile_all`
compiles them with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (TTIR -> TTGIR -> LLVM -> PTX
-> cubin with the ptxas bundled in the wheel; no CUDA driver needed).

Compiling needs ``TRITON_INTERPRET=0`` when triton is first imported (under the interpreter ``@triton.jit`` functions
cannot be compiled) and ``TRITON_DUMP_PTXAS_LOG=1`` for ptxas' register/spill report; a fresh ``TRITON_CACHE_DIR``
makes every run really compile (:func:`compile_env` gives the three). Works with Triton 3.6 - 3.9.
"""

from __future__ import annotations

import contextlib
import inspect as _inspect
import io
import os
import re
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: Hopper: sm_90 (the PTX target is sm_90a, which wgmma needs), warp size 32.
TARGET_SM90 = ("cuda", 90, 32)
H100_SMEM_PER_BLOCK = 227 * 1024
REGISTER_FILE = 64 * 1024


def compile_env(cache_dir: str) -> Dict[str, str]:
    """Environment variables a compiling process needs (set before triton is imported)."""
    return dict(TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1",
                TRITON_DEFAULT_FP_FUSION="1")


def specialise(kernel, backend, args, kwargs):
    """``(signature, constexprs, attrs, options)`` of ``kernel[grid](*args, **kwargs)``, as the JIT would compile it.

    Triton 3.6 - 3.9 share this path (the JIT's binder, then ``_pack_args``); versions without it get a plain
    signature built here (no int / alignment specialisation; still a valid compile)."""
    from triton.runtime import jit

    if hasattr(jit, "create_function_from_signature") and hasattr(kernel, "_pack_args"):
        binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
        return sig, constexprs, attrs, dict(options.__dict__)
    import torch

    def type_of(value):
        if isinstance(value, tuple):  # a per-model argument tuple
            return tuple(type_of(v) for v in value)
        if isinstance(value, torch.Tensor):
            return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                          torch.int64: "i64", torch.int32: "i32"}[value.dtype]
        if isinstance(value, bool):
            return "i1"
        if isinstance(value, int):
            return "i32" if -2**31 <= value < 2**31 else "i64"
        return "fp32"

    names = kernel.arg_names
    sig, constexprs, launch_opts = {}, {}, {}
    for name, value in zip(names, args):
        sig[name] = type_of(value)
    for name, value in kwargs.items():
        if name in names:
            sig[name], constexprs[name] = "constexpr", value
        else:
            launch_opts[name] = value
    return {n: sig[n] for n in names}, constexprs, {}, launch_opts


def ast_source(kernel, sig, constexprs, attrs):
    """ASTSource across versions: 3.2+ take ``constexprs=``/``attrs=`` (3.0/3.1 named them ``constants=``)."""
    from triton.compiler import ASTSource

    params = _inspect.signature(ASTSource.__init__).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    return ASTSource(kernel, sig, **{key: constexprs, "attrs": attrs})


def distinct(launch_lists: Dict[str, Sequence], target=TARGET_SM90) -> Tuple[list, Dict[str, List[int]]]:
    """``(work, uses)``: the distinct specialisations ``(kernel, sig, constexprs, attrs, options)`` of the recorded
    launches (``{label: [Launch, ...]}``), and for each label the indices into ``work`` of its launches, in order."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget(*target))
    work, keys, uses = [], {}, {}
    for label, launches in launch_lists.items():
        uses[label] = []
        for launch in launches:
            sig, constexprs, attrs, options = specialise(launch.kernel, backend, launch.args, launch.kwargs)
            key = repr((launch.kernel.__name__, sorted(sig.items()), sorted(constexprs.items(), key=repr),
                        sorted(attrs.items(), key=repr), sorted(options.items(), key=repr)))
            if key not in keys:
                keys[key] = len(work)
                work.append((launch.kernel, sig, constexprs, attrs, options))
            uses[label].append(keys[key])
    return work, uses


_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_MMA = re.compile(r"\b(wgmma\.mma_async\.\S+|mma\.sync\.\S+)")
_SHAPE = re.compile(r"\.(m\d+n\d+k\d+)\.")


def mma_shapes(mma: Iterable[str]) -> List[str]:
    """``["wgmma m64n128k16 bf16", ...]`` from the MMA instructions of a PTX (``wgmma.mma_async.sync.aligned.
    m64n128k16.f32.bf16.bf16`` and ``mma.sync.aligned.m16n8k16...``)."""
    out = set()
    for m in mma:
        shape = _SHAPE.search(m + ".")
        op = "wgmma" if m.startswith("wgmma") else "mma.sync"
        kind = m.rstrip(";,").split(".")[-1]
        out.add(f"{op} {shape[1] if shape else '?'} {kind}")
    return sorted(out)


def wgmma_n(mma: Iterable[str]) -> List[int]:
    """The N of every wgmma shape in ``mma`` (empty when the kernel has no wgmma)."""
    return sorted({int(s[1]) for m in mma if m.startswith("wgmma") for s in [re.search(r"m64n(\d+)k", m)] if s})


def describe(kernel, sig, constexprs, options) -> dict:
    """Kernel name, its upper-case constexprs, pointer types and warps: what a report row names."""
    names = kernel.arg_names
    const = {(names[k[0]] if isinstance(k, tuple) else k): v for k, v in constexprs.items()}

    def leaves(types):
        for t in types:
            if isinstance(t, (tuple, list)):
                yield from leaves(t)
            else:
                yield t

    ptr_types = sorted({t for t in leaves(sig.values()) if t.startswith("*")})
    return dict(kernel=kernel.__name__, constexprs={k: (v if isinstance(v, (bool, int, float, str)) else repr(v))
                                                    for k, v in const.items() if k.isupper()},
                pointer_types=ptr_types, num_warps=options.get("num_warps"))


_WORK: list = []  # (kernel, signature, constexprs, attrs, options, target, dump stem); forked workers index it


def _compile_one(index: int) -> dict:
    """Compile one specialisation; a dict of its resources (or the error). Writes .ptx/.cubin when given a stem."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel, sig, constexprs, attrs, options, target, stem = _WORK[index]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v goes to stdout
            compiled = triton.compile(ast_source(kernel, sig, constexprs, attrs), target=GPUTarget(*target),
                                      options=options)
    except Exception as e:  # noqa: BLE001  (reported; the callers assert on it)
        return dict(ok=False, error=f"{type(e).__name__}: {e}"[-4000:], seconds=time.perf_counter() - start)
    ptx, text = compiled.asm["ptx"], log.getvalue()
    regs, spills, stack = _PTXAS_INFO.search(text), _SPILLS.search(text), _STACK.search(text)
    md = compiled.metadata
    files = []
    if stem:
        for ext, data, mode in (("ptx", ptx, "w"), ("cubin", compiled.asm["cubin"], "wb")):
            with open(f"{stem}.{ext}", mode) as f:
                f.write(data)
            files.append(f"{stem}.{ext}")
    mma = sorted(set(_MMA.findall(ptx)))
    return dict(
        ok=True, seconds=time.perf_counter() - start, shared=int(md.shared), num_warps=int(md.num_warps),
        num_stages=int(md.num_stages), cubin_bytes=len(compiled.asm["cubin"]),
        ptx_target=(re.search(r"\.target\s+(\S+)", ptx) or [None, None])[1],
        registers=int(regs[1]) if regs else None,
        spill_bytes=int(spills[1]) + int(spills[2]) if spills else None,
        stack_bytes=int(stack[1]) if stack else None,
        mma=mma, mma_shapes=mma_shapes(mma), files=files,
    )


def compile_all(work: list, *, target=TARGET_SM90, jobs: int = 2, dump_dir: Optional[str] = None) -> List[dict]:
    """Compile every specialisation of ``work`` (from :func:`distinct`) in ``jobs`` forked processes; one dict per
    item: :func:`describe` plus the resources (``ok``, ``registers``, ``spill_bytes``, ``shared``, ``mma``,
    ``mma_shapes``, ``files``). With ``dump_dir``, item i's PTX and cubin go to ``dump_dir/<kernel>_<i>.{ptx,cubin}``.
    Requires a compiling Triton (:func:`compile_env`)."""
    import multiprocessing

    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("0", "", "false", "off", "no"):
        raise RuntimeError("ahead-of-time compiles need TRITON_INTERPRET=0 when triton is imported")
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    _WORK[:] = [(k, s, c, a, o, tuple(target), os.path.join(dump_dir, f"{k.__name__}_{i}") if dump_dir else None)
                for i, (k, s, c, a, o) in enumerate(work)]
    # heaviest kernels first, so the workers finish together
    order = sorted(range(len(work)), key=lambda i: work[i][0].__name__ not in ("stats_kernel", "dweight_kernel"))
    if jobs <= 1:
        results = {i: _compile_one(i) for i in order}
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = dict(zip(order, pool.map(_compile_one, order, chunksize=1)))
    return [dict(describe(k, s, c, o), **results[i]) for i, (k, s, c, a, o) in enumerate(work)]


def check_resources(spec: dict) -> List[str]:
    """What is wrong with one compiled specialisation for an H100 (empty when nothing): it must compile for
    sm_90a, fit a block's shared memory, use at most 255 registers with one block's warps fitting the register
    file, and spill nothing."""
    what = f"{spec['kernel']} {spec['constexprs']} {spec['pointer_types']}"
    if not spec["ok"]:
        return [f"{what} does not compile for sm_90:\n{spec['error']}"]
    bad = []
    if spec["ptx_target"] != "sm_90a" or spec["cubin_bytes"] <= 0:
        bad.append(f"{what}: target {spec['ptx_target']}, cubin {spec['cubin_bytes']} bytes")
    if spec["shared"] > H100_SMEM_PER_BLOCK:
        bad.append(f"{what}: {spec['shared']} bytes of shared memory")
    if spec["registers"] is None or spec["spill_bytes"] is None:
        bad.append(f"{what}: no ptxas -v report")
    elif spec["registers"] > 255 or spec["registers"] * 32 * spec["num_warps"] > REGISTER_FILE:
        bad.append(f"{what}: {spec['registers']} registers x {spec['num_warps']} warps")
    elif spec["spill_bytes"]:
        bad.append(f"{what}: ptxas spills {spec['spill_bytes']} bytes ({spec['registers']} registers)")
    return bad
