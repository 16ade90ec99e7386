"""Launch configuration of the Triton backend: defaults, validation, tuned tables, and the one resolution per call.

Precedence, lowest first: :func:`default_config`; the first matching entry of the tuned tables (:func:`tuned_config`:
the files named by ``$TIPKERNELS_TRITON_CONFIGS``, then the packaged ``tuned_configs.json`` beside this file, written
by ``benchmarks/tune_triton.py``; read once and cached); ``tk.set_options(triton_config={...})``; an entry point's
``config=`` argument. Every source is validated (:func:`validate`) with an error naming it and the key.

An op call resolves the config once (:func:`plan`, called by :mod:`tipkernels.ops.core`) and carries it on the
problem (``Problem.backend_config``) to the forward, the JSD pass and the backward. See docs/design.md §4.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import triton

from ...inputs import Problem
from ...options import options
from .strategy import STRATEGY_KEYS, strategy_defaults, validate_strategy

# tl.dot precision for fp32 inputs: "ieee" keeps fp32 results within the fp32 tolerance of docs/design.md §8
# (tf32 would not, at real hidden sizes); set to "tf32" to trade that for tensor-core speed. Read at launch.
FP32_DOT_PRECISION = "ieee"


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_config(prob: Problem, bwd_strategy: str = "matmul") -> Dict[str, object]:
    """Block sizes and launch options for Hopper, sized for the compiler and the memory system; tune on the device.

    block_n / block_v: the logit tile; block_d: the hidden-dim chunk of the logit matmul; block_dh: the
    hidden-dim block a backward program owns (its fp32 accumulator is block_n x block_dh or block_v x block_dh);
    split_v: vocabulary splits of the forward passes (None: one group of ``group_n`` row blocks fills the device);
    group_n: row blocks per group of the grouped program order of the forward passes and the dS kernel;
    bwd_block_n / bwd_block_v / bwd_block_d / bwd_num_stages / bwd_num_warps: the backward's logit tile, hidden
    chunk, pipeline depth and warps (a config that sets block_d, num_stages or num_warps but not its bwd_ twin uses
    it for both).
    num_warps, num_stages (None: Triton's default): launch options.
    bwd_strategy (linear students): ``"matmul"`` computes each gradient-logit tile once into a ``[rows, vocabulary
    chunk]`` buffer of at most ``bwd_chunk_mib`` MiB (at least one bwd_block_v wide) and leaves ``d hidden`` /
    ``d weight`` to cuBLAS, with an fp32 ``[rows, D]`` accumulator of at most 4 x ``bwd_chunk_mib`` MiB (rows in
    passes); ``"tiles"`` never allocates more than its outputs but recomputes the logit tiles ``D / block_dh`` times
    (see ``benchmarks/TUNING.md``). The backward tile follows the strategy (:func:`resolve` passes the chosen one).

    16-bit inputs, linear models (docs/design.md §4): the forward tile is 128 rows x 64 vocabulary entries at 8
    warps, so each of the two warpgroups issues wgmma m64n64k16 (64 x 64 split them into m64n32; a 128 x 128 tile
    spilled 0.8 KB); the dS kernel of "matmul" is 128 x 128 with 32-wide hidden chunks (wgmma m64n128k16; 64-wide
    chunks spilled 72 B in JSD), 128 x 64 with a bias or a soft-cap. The "tiles" kernels keep 64 x 64: their fp32
    ``d h`` / ``d W`` accumulator shares the registers (128 x 128 spilled 0.3 KB). fp32 ("ieee": no tensor cores)
    keeps the 64-row tiles. Every default compiles for sm_90 within 255 registers without spilling
    (tests/backends/test_triton_compile.py).
    """
    dtype = (prob.student_hidden if prob.student_is_linear else prob.student_logits).dtype
    wide = dtype == torch.float32 or dtype == torch.float64
    ds = prob.student_hidden.shape[1] if prob.student_is_linear else 16
    capped = prob.student_cap is not None or prob.teacher_cap is not None
    # 128-row forward tiles when every model is linear: a model given as logits makes the pass a read of [N, V]
    # logits (memory-bound, the MMA width moot) and its tile's layout conversion spilled 60-600 B at 128 x 64
    all_linear = prob.student_is_linear and (not prob.has_teacher or prob.teacher_hidden is not None)
    big_fwd = not wide and all_linear
    big_ds = not wide and bwd_strategy == "matmul"
    # a bias or a soft-cap in the dS epilogue spilled 16-712 B at 128 x 128 (JSD, Triton 3.9): 128 x 64 (n64) then
    plain = prob.student_bias is None and prob.teacher_bias is None and not capped
    return {
        "block_n": 128 if big_fwd else 64,
        # fp32 at 64: stats_kernel (both capped, Triton 3.9) spilled 88 B, jsd_kernel (3.6, grouped order) 20 B
        "block_v": 32 if wide else 64,
        "block_d": 16 if wide else 64,
        # a soft-capped 16-bit student: dhidden_kernel (JSD, both capped) spilled 24 B at 256 (Triton 3.9)
        "block_dh": min(128 if wide or prob.student_cap is not None else 256, _pow2_at_least_16(ds)),
        "split_v": None,
        "group_n": 8,  # 8 row blocks x 2 models x 128 rows x D=4096 x 2 B = 16 MiB of hidden states in L2
        "num_warps": 8,
        "num_stages": 2 if wide else None,  # fp32 forward with 3 stages: ptxas spilled (Triton 3.6)
        "bwd_block_n": 128 if big_ds else 64,
        "bwd_block_v": (128 if plain else 64) if big_ds else (32 if wide else 64),
        "bwd_block_d": 32 if (wide or big_ds) else 64,  # fp32 at 16: ptxas picked 128 registers and spilled
        "bwd_num_stages": None,  # fp32 at 2: the same in dweight
        "bwd_num_warps": None,  # None: num_warps
        "bwd_strategy": bwd_strategy,
        "bwd_chunk_mib": 32,
        **strategy_defaults(),  # the strategy keys (strategy.py)
    }


#: Every config key (with its default for a given problem in :func:`default_config`).
KEYS = ("block_n", "block_v", "block_d", "block_dh", "split_v", "group_n", "num_warps", "num_stages", "bwd_block_n",
        "bwd_block_v", "bwd_block_d", "bwd_num_stages", "bwd_num_warps", "bwd_strategy", "bwd_chunk_mib") + STRATEGY_KEYS
_TWINNED = ("block_d", "num_stages", "num_warps")
#: The backward strategies of a linear student (``bwd_strategy``); benchmarks/inspect_kernels.py compiles each.
BWD_STRATEGIES = ("matmul", "tiles")
_DOT_BLOCKS = ("block_n", "block_v", "block_d", "block_dh", "bwd_block_n", "bwd_block_v", "bwd_block_d", "epi_block_n",
               "epi_block_v")




def validate(over: Optional[Mapping], source: str = "triton config") -> Dict[str, object]:
    """Check the keys and values of a partial config ``over`` (from ``source``, named in errors); return a copy.

    KeyError for an unknown key; ValueError for a bad value: the ``_DOT_BLOCKS`` must be powers of two >= 16,
    ``bwd_strategy`` "matmul" or "tiles", ``bwd_chunk_mib`` a positive number, ``split_v`` None or a positive int,
    ``group_n`` a positive int,
    ``num_warps`` a power of two, stage counts None or positive ints."""
    if over is None:
        return {}
    if not isinstance(over, Mapping):
        raise TypeError(f"{source} must be a dict of launch options, got {type(over).__name__}")
    unknown = set(over) - set(KEYS)
    if unknown:
        raise KeyError(f"unknown {source} keys {sorted(unknown)}; known: {sorted(KEYS)}")
    for key, b in over.items():
        if key in _DOT_BLOCKS and (isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1)):
            raise ValueError(f"{source} {key}={b!r}: must be a power of two >= 16")
    if "bwd_strategy" in over and over["bwd_strategy"] not in BWD_STRATEGIES:
        raise ValueError(f"{source} bwd_strategy={over['bwd_strategy']!r}: expected 'matmul' or 'tiles'")
    validate_strategy(over, source)
    if "bwd_chunk_mib" in over:
        chunk_mib = over["bwd_chunk_mib"]
        if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, (int, float)) or not chunk_mib > 0:
            raise ValueError(f"{source} bwd_chunk_mib={chunk_mib!r}: expected a positive number")
    for key in ("split_v", "group_n", "num_stages", "bwd_num_stages", "num_warps", "bwd_num_warps"):
        b = over.get(key)
        optional = key != "group_n"
        if (b is not None or (not optional and key in over)) and (isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                                   or ("warps" in key and b & (b - 1))):
            raise ValueError(f"{source} {key}={b!r}: expected " + ("None or " if optional else "") + "a positive int"
                             + (" (a power of two)" if "warps" in key else ""))
    return dict(over)


def resolve(prob: Problem, config: Optional[Mapping] = None) -> Dict[str, object]:
    """The full config for ``prob``: defaults < tuned entry < ``options.triton_config`` < ``config``. The defaults
    are those of the ``bwd_strategy`` the sources choose (the backward tile follows it)."""
    sources = [(source, validate(over, source)) for source, over in (
        ("tuned config", tuned_config(prob)), ("tk.set_options triton_config", options.triton_config),
        ("triton config", config)) if over]
    strategy = next((over["bwd_strategy"] for _, over in reversed(sources) if "bwd_strategy" in over), "matmul")
    cfg = default_config(prob, strategy)
    for source, over in sources:
        cfg.update(over)
        for key in _TWINNED:
            if key in over and "bwd_" + key not in over:
                cfg["bwd_" + key] = over[key]
    return cfg


def for_call(prob: Problem, config: Optional[Mapping] = None) -> Dict[str, object]:
    """The config an entry point uses: the one :func:`plan` carried on ``prob``, unless ``config`` overrides."""
    if config is None and prob.backend_config is not None:
        return prob.backend_config
    return resolve(prob, config)


def plan(prob: Problem) -> Problem:
    """``prob`` carrying its resolved config (``backend_config``), so an op call resolves it once."""
    return prob if prob.backend_config is not None else replace(prob, backend_config=resolve(prob))


def launch_opts(cfg, backward: bool = False) -> dict:
    opts = {"num_warps": (cfg["bwd_num_warps"] if backward else None) or cfg["num_warps"]}
    stages = cfg["bwd_num_stages" if backward else "num_stages"]
    if stages is not None:
        opts["num_stages"] = stages
    return opts


def splits(cfg, n_rows: int, vocab: int, device: torch.device) -> Tuple[int, int]:
    """(number of vocabulary splits, tiles per split), every split non-empty.

    Automatic (``split_v`` None): one group of ``group_n`` row blocks across the splits fills the device (one program
    per SM: the forward tiles take the whole register file), so the programs resident together share ``group_n``
    row blocks (docs/design.md §4); with fewer row blocks, enough splits to fill the device."""
    tiles = triton.cdiv(vocab, cfg["block_v"])
    want = cfg["split_v"]
    if want is None:
        row_blocks = triton.cdiv(n_rows, cfg["block_n"])
        want = max(1, _num_sms(device) // min(row_blocks, cfg["group_n"]))
    want = max(1, min(int(want), tiles))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per


# ------------------------------------------------------------------------------------------ tuned configs

TUNED_CONFIGS_ENV = "TIPKERNELS_TRITON_CONFIGS"
PACKAGED_TUNED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")
_ENTRY_KEYS = {"device", "dtype", "d_min", "d_max", "v_min", "v_max", "config"}
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp32"}


def device_key(device: torch.device) -> str:
    """The name tuned-config entries are matched on: ``torch.cuda.get_device_name`` on CUDA, else the type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _read_table(path: str) -> Tuple[dict, ...]:
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"tuned triton config table {path}: cannot read it ({err})") from err
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"tuned triton config table {path}: expected an object with a list 'entries'")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not _ENTRY_KEYS <= set(e) or not isinstance(e["config"], dict):
            raise ValueError(f"tuned triton config table {path}, entry {i}: expected the keys "
                             f"{sorted(_ENTRY_KEYS)} with 'config' an object, got {e!r}")
    return tuple(entries)


def tuned_tables() -> List[str]:
    """The tuned-config files consulted, first match wins: ``$TIPKERNELS_TRITON_CONFIGS`` (``os.pathsep``-separated
    paths), then the packaged table."""
    paths = [p for p in os.environ.get(TUNED_CONFIGS_ENV, "").split(os.pathsep) if p]
    return paths + [PACKAGED_TUNED_CONFIGS]


@functools.lru_cache(maxsize=8)
def _tables(env_value: str) -> Tuple[Tuple[str, Tuple[dict, ...]], ...]:
    """``(path, entries)`` of every table named by ``env_value`` and the packaged one, read once per value of
    ``$TIPKERNELS_TRITON_CONFIGS`` (:func:`reload_tuned_configs` forgets them)."""
    out = []
    for path in tuned_tables():
        if not os.path.exists(path):
            if path == PACKAGED_TUNED_CONFIGS:
                continue
            raise ValueError(f"${TUNED_CONFIGS_ENV} names {path}, which does not exist")
        out.append((path, _read_table(path)))
    return tuple(out)


def reload_tuned_configs() -> None:
    """Forget the tables read so far: the next lookup reads them again (after rewriting a table in place)."""
    _tables.cache_clear()


def tuned_config(prob: Problem) -> Dict[str, object]:
    """The ``config`` of the first tuned entry matching the problem's device name, input dtype, student hidden
    size (0 for logits inputs) and vocabulary size (inclusive ranges); ``{}`` when none matches. A path named in
    ``$TIPKERNELS_TRITON_CONFIGS`` must exist; a malformed table raises ``ValueError`` naming the file. The tables
    are read on the first lookup and cached (no filesystem access afterwards)."""
    src = prob.student_hidden if prob.student_is_linear else prob.student_logits
    dev, dt = device_key(src.device), _DTYPE_KEYS.get(src.dtype)
    d = src.shape[1] if prob.student_is_linear else 0
    v = prob.vocab_size
    for _, entries in _tables(os.environ.get(TUNED_CONFIGS_ENV, "")):
        for e in entries:
            if e["device"] == dev and e["dtype"] == dt and e["d_min"] <= d <= e["d_max"] \
                    and e["v_min"] <= v <= e["v_max"]:
                return dict(e["config"])
    return {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(prob: Problem) -> str:
    """tl.dot input_precision; "upcast" (operands to fp32) for bf16 under the interpreter, whose bf16 dot is wrong."""
    src = prob.student_hidden if prob.student_is_linear else prob.student_logits
    if prob.teacher_hidden is not None:
        src = prob.teacher_hidden
    if src.dtype == torch.float32:
        return FP32_DOT_PRECISION
    return "upcast" if src.dtype == torch.bfloat16 and interpreting() else "tf32"
