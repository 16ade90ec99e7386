"""Teachers seen through their top-k log-probabilities: a local model, a served one (vLLM, SGLang), offline files.

**The top-k teacher contract.** A *top-k teacher* is any callable ::

    teacher(input_ids [B, T] int64, attention_mask [B, T]) -> tipkernels.TeacherTopK  # ids, logprobs [B, T-1, K]

that :class:`~tipkernels.opd.OPDTrainer` (and :func:`~tipkernels.opd.sequence_tip_loss`) accepts in place of a
Hugging Face teacher. It receives the whole padded batch of sequences (prompt + response, the attention mask 0 on
padding) and returns, for every *hidden position* ``i`` in ``0 .. T-2``, the teacher's distribution of the token at
``i + 1`` given the attended tokens ``0 .. i``: the same positions as the student's final hidden states
``h_s [B, T-1, D]`` that the loss compares it with (hidden ``i`` scores token ``i + 1``, docs/design.md §9).
``ids`` are vocabulary ids (``-1`` pads a row with fewer than ``K``), ``logprobs`` the teacher's log-softmax over
its full vocabulary at those ids, after its own logit transforms (scale, soft-cap) and at temperature 1. Positions
the loss does not score (prompt, padding) may hold anything valid; the adapters here leave them all ``-1``.

**Adapters** (each one tested against a float64 full-softmax truth):

- :class:`HFTopKTeacher`: a local Hugging Face causal LM; the top-k of its log-softmax is taken over vocabulary
  chunks (hidden states × an lm_head chunk, a running top-k and a running logsumexp), never a ``[tokens, vocab]``
  tensor (:func:`topk_logprobs`).
- :class:`ServedTopKTeacher`: a function scoring token sequences elsewhere (vLLM's ``prompt_logprobs``, SGLang's
  ``input_top_logprobs``, or rows already as tensors), converted by :func:`from_vllm_prompt_logprobs` /
  :func:`from_sglang_input_logprobs` and placed into the batch layout by :func:`pack_rows`.
- :class:`PrecomputedTopKTeacher`: a :class:`TopKTable` read from a safetensors file (:func:`read_topk_safetensors`)
  or a JSONL file (:func:`read_topk_jsonl`), looked up by each row's attended tokens; the writers
  (:func:`write_topk_safetensors`, :func:`write_topk_jsonl`) take sequences and per-sequence rows, e.g. from
  :func:`unpack_rows` of a teacher's output.

**Per-sequence rows.** A sequence of ``n`` tokens has ``n - 1`` rows: row ``j`` is the distribution of token
``j + 1`` (vLLM's ``prompt_logprobs[j + 1]``; its entry 0 is None). Files store exactly these rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..backends.chunked import transform_logits
from ..inputs import check_teacher_topk, check_temperature
from ..types import TeacherTopK
from .models import final_hidden_states, lm_head, logit_transform, unwrap

Tensor = torch.Tensor
#: A top-k teacher (see the module docstring).
TopKTeacherFn = Callable[[Tensor, Tensor], TeacherTopK]

FORMAT = "tipkernels.teacher_topk"
VERSION = "1"


# --------------------------------------------------------------------------------------------- validation


def check_topk_rows(name: str, ids: Tensor, logprobs: Tensor, *, vocab_size: Optional[int] = None) -> None:
    """Check one top-k block ``ids``/``logprobs`` ``[..., K]`` by the loss's own rules
    (:func:`tipkernels.inputs.check_teacher_topk`: integer ids in ``[0, vocab_size)`` or ``-1``, distinct within a
    row; float log-probabilities ``≤ 0`` up to rounding, not NaN, a row's mass at most 1), before anything is
    written or packed. TypeError/ValueError prefixed with ``name``. Without ``vocab_size`` any id ``≥ 0`` passes."""
    lead = ids.shape[:-1] if isinstance(ids, Tensor) and ids.dim() >= 1 else torch.Size([])
    vocab = vocab_size
    if vocab is None:
        vocab = int(ids.max()) + 1 if isinstance(ids, Tensor) and ids.numel() and not ids.is_floating_point() else 1
    try:
        check_teacher_topk((ids, logprobs), lead, max(1, vocab), ids.device if isinstance(ids, Tensor) else None)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


# --------------------------------------------------------------------------------- a local Hugging Face teacher


@torch.no_grad()
def topk_logprobs(hidden: Tensor, weight: Tensor, k: int, *, bias: Optional[Tensor] = None,
                  logit_scale: float = 1.0, softcap: Optional[float] = None, temperature: float = 1.0,
                  vocab_size: Optional[int] = None, row_chunk: int = 512, vocab_chunk: int = 4096) -> TeacherTopK:
    """The top-``k`` of ``log_softmax(c·tanh(a·(hidden·weightᵀ + bias)/c) / T)`` per row, never forming ``[N, V]``.

    Args:
        hidden: ``[..., D]`` float. weight: ``[V_w, D]``; bias: ``[V_w]`` or None.
        k: ids per row, ``1 ≤ k ≤ V``.
        logit_scale, softcap: the model's logit transform (docs/design.md §1; ``softcap`` None: no tanh).
        temperature: ``T > 0``; the loss takes a top-k teacher's log-probabilities as final, so a loss at
            temperature ``T`` wants the teacher's at ``T`` too.
        vocab_size: use only the first ``V`` rows of ``weight`` (a padded lm_head: the distribution is then over
            the shared vocabulary, as the dense teacher's in the loss); default all ``V_w``.
        row_chunk, vocab_chunk: the tile ``[row_chunk, vocab_chunk]`` of logits formed at a time.

    Returns:
        :class:`TeacherTopK` with ids int64 and logprobs ``[..., k]``, sorted by decreasing log-probability;
        logprobs are float32 (float64 for float64 inputs), accumulated in that precision. Not differentiable.
    """
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor) or weight.dim() != 2 or hidden.dim() < 1 \
            or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] and weight [V, D] must agree on D, got {tuple(getattr(hidden, 'shape', ()))}"
                         f" and {tuple(getattr(weight, 'shape', ()))}")
    V = weight.shape[0] if vocab_size is None else int(vocab_size)
    if not 1 <= V <= weight.shape[0]:
        raise ValueError(f"vocab_size must lie in [1, {weight.shape[0]}] (the lm_head's rows), got {vocab_size}")
    if not (isinstance(k, int) and 1 <= k <= V):
        raise ValueError(f"k must be an int in [1, {V}] (the vocabulary), got {k!r}")
    temperature = check_temperature(temperature)
    for name, n in (("row_chunk", row_chunk), ("vocab_chunk", vocab_chunk)):
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{name} must be an int ≥ 1, got {n!r}")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out_ids = torch.empty(h.shape[0], k, dtype=torch.long, device=h.device)
    out_lp = torch.empty(h.shape[0], k, dtype=cd, device=h.device)
    for r0 in range(0, h.shape[0], row_chunk):
        hr = h[r0:r0 + row_chunk].to(cd)
        best_v = torch.empty(hr.shape[0], 0, dtype=cd, device=h.device)
        best_i = torch.empty(hr.shape[0], 0, dtype=torch.long, device=h.device)
        lse = torch.full((hr.shape[0],), -math.inf, dtype=cd, device=h.device)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            z = hr @ weight[v0:v1].to(cd).T
            if bias is not None:
                z += bias[v0:v1].to(cd)
            z = transform_logits(z, logit_scale, softcap, temperature)
            lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
            cand_v = torch.cat([best_v, z], 1)
            cand_i = torch.cat([best_i, torch.arange(v0, v1, device=h.device).expand(hr.shape[0], -1)], 1)
            best_v, pos = cand_v.topk(min(k, cand_v.shape[1]), -1)
            best_i = cand_i.gather(1, pos)
        out_ids[r0:r0 + hr.shape[0]] = best_i
        out_lp[r0:r0 + hr.shape[0]] = best_v - lse[:, None]
    return TeacherTopK(out_ids.reshape(*lead, k), out_lp.reshape(*lead, k))


class HFTopKTeacher:
    """A local Hugging Face causal LM as a top-k teacher (the module docstring's contract).

    ``teacher(input_ids [B, T], attention_mask [B, T]) -> TeacherTopK [B, T-1, k]``: the body runs under
    ``no_grad`` on ``input_ids[:, :-1]`` (on the model's device), then :func:`topk_logprobs` with the model's logit
    transforms (:func:`tipkernels.opd.models.logit_transform`) and ``temperature`` (give the loss's: a top-k
    teacher's log-probabilities are final), restricted to the first ``vocab_size`` lm_head rows when given (pass
    the student's lm_head rows for a teacher with a padded vocabulary, as the dense loss does).
    The result is on ``input_ids``' device. The model is put in eval mode with gradients off.
    """

    def __init__(self, model: nn.Module, k: int, *, vocab_size: Optional[int] = None, temperature: float = 1.0,
                 row_chunk: int = 512, vocab_chunk: int = 4096):
        weight, _ = lm_head(model, "teacher")  # raises for a model without a linear head
        self.scale, self.cap = logit_transform(model, "teacher")
        V = weight.shape[0] if vocab_size is None else vocab_size
        if not (isinstance(k, int) and 1 <= k <= V):
            raise ValueError(f"k must be an int in [1, {V}] (the teacher's vocabulary), got {k!r}")
        if not (isinstance(V, int) and 1 <= V <= weight.shape[0]):
            raise ValueError(f"vocab_size must lie in [1, {weight.shape[0]}] (the teacher's lm_head rows), "
                             f"got {vocab_size!r}")
        self.model, self.k, self.vocab_size = model, k, V
        self.temperature = check_temperature(temperature)
        self.row_chunk, self.vocab_chunk = row_chunk, vocab_chunk
        model.eval()
        model.requires_grad_(False)

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TeacherTopK:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dev = next(self.model.parameters()).device
        w, b = lm_head(self.model, "teacher")
        with torch.no_grad():
            h = final_hidden_states(self.model, input_ids[:, :-1].to(dev), attention_mask[:, :-1].to(dev),
                                    who="teacher")
            out = topk_logprobs(h, w, self.k, bias=b, logit_scale=self.scale, softcap=self.cap,
                                temperature=self.temperature, vocab_size=self.vocab_size, row_chunk=self.row_chunk,
                                vocab_chunk=self.vocab_chunk)
        return TeacherTopK(out.ids.to(input_ids.device), out.logprobs.to(input_ids.device))

    def __repr__(self) -> str:
        return f"HFTopKTeacher({type(unwrap(self.model)).__name__}, k={self.k}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------- per-sequence rows <-> batches


def _attended(attention_mask: Tensor, b: int) -> Tensor:
    return attention_mask[b].nonzero().flatten()


def pack_rows(rows: Sequence[Tuple[Tensor, Tensor]], attention_mask: Tensor, *,
              k: Optional[int] = None) -> TeacherTopK:
    """Per-sequence rows into the batch layout ``[B, T-1, K]`` of the top-k teacher contract.

    ``rows[b]``: ``(ids, logprobs)`` of sequence ``b``'s ``n_b - 1`` rows ``[n_b - 1, K_b]``, where ``n_b`` is the
    number of attended tokens of row ``b`` of ``attention_mask [B, T]``; row ``j`` goes to the hidden position of
    the ``j``-th attended token (the one that predicts the next attended token). ``K`` is ``k`` or the largest
    ``K_b``; shorter rows are padded with ``-1``, longer ones raise. Unfilled positions are all ``-1``. Returns
    ids int64 and logprobs float32 (float64 if any input is) on ``attention_mask``'s device."""
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a tensor [B, T], got {getattr(attention_mask, 'shape', None)}")
    B, T = attention_mask.shape
    if len(rows) != B:
        raise ValueError(f"got rows for {len(rows)} sequences but the batch has {B}")
    widths = []
    for b, (ids, lp) in enumerate(rows):
        check_topk_rows(f"rows[{b}]", ids, lp)
        if ids.dim() != 2:
            raise ValueError(f"rows[{b}] must be [n - 1, K], got {tuple(ids.shape)}")
        widths.append(ids.shape[1])
    K = k if k is not None else max(widths, default=1)
    if any(w > K for w in widths):
        raise ValueError(f"rows have up to {max(widths)} ids per position, more than k={K}")
    dt = torch.float64 if any(lp.dtype == torch.float64 for _, lp in rows) else torch.float32
    dev = attention_mask.device
    out_ids = torch.full((B, T - 1, K), -1, dtype=torch.long, device=dev)
    out_lp = torch.zeros((B, T - 1, K), dtype=dt, device=dev)
    for b, (ids, lp) in enumerate(rows):
        pos = _attended(attention_mask, b)
        if ids.shape[0] != max(0, len(pos) - 1):
            raise ValueError(f"sequence {b} has {len(pos)} attended tokens, so {max(0, len(pos) - 1)} rows, got "
                             f"{ids.shape[0]}")
        at = pos[:-1]
        out_ids[b, at, :ids.shape[1]] = ids.to(device=dev, dtype=torch.long)
        out_lp[b, at, :ids.shape[1]] = lp.to(device=dev, dtype=dt)
    return TeacherTopK(out_ids, out_lp)


def unpack_rows(topk: Tuple[Tensor, Tensor], attention_mask: Tensor) -> List[TeacherTopK]:
    """The inverse of :func:`pack_rows`: sequence ``b``'s rows ``[n_b - 1, K]`` (on the CPU) from a batch
    ``[B, T-1, K]`` (e.g. a teacher's output), at the positions of its attended tokens but the last."""
    ids, lp = topk
    if ids.dim() != 3 or ids.shape[:2] != (attention_mask.shape[0], attention_mask.shape[1] - 1):
        raise ValueError(f"topk must be [B, T-1, K] for attention_mask {tuple(attention_mask.shape)}, got "
                         f"{tuple(ids.shape)}")
    out = []
    for b in range(ids.shape[0]):
        at = _attended(attention_mask, b)[:-1].to(ids.device)
        out.append(TeacherTopK(ids[b, at].cpu(), lp[b, at].cpu()))
    return out


def sequences_of(input_ids: Tensor, attention_mask: Tensor) -> List[List[int]]:
    """Each row's attended tokens (prompt + response, padding dropped), as lists of ints."""
    return [input_ids[b, _attended(attention_mask, b).to(input_ids.device)].tolist()
            for b in range(input_ids.shape[0])]


# ----------------------------------------------------------------------------------- served teachers (no import)


def _rows(entries: List[List[Tuple[int, float]]], k: Optional[int], where: str) -> TeacherTopK:
    """``entries[j]``: (id, logprob) pairs of row j → a [len, K] block, each row sorted by decreasing logprob and
    cut to ``k``."""
    width = k if k is not None else max((len(e) for e in entries), default=1)
    width = max(width, 1)
    ids = torch.full((len(entries), width), -1, dtype=torch.long)
    lp = torch.zeros((len(entries), width), dtype=torch.float32)
    for j, pairs in enumerate(entries):
        pairs = sorted(pairs, key=lambda p: -p[1])[:width]
        if pairs:
            ids[j, :len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            lp[j, :len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    check_topk_rows(where, ids, lp)
    return TeacherTopK(ids, lp)


def _logprob_value(v: Any, where: str) -> float:
    x = getattr(v, "logprob", v)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{where}: expected a float or an object with .logprob, got {type(v).__name__}")
    return float(x)


def _check_k(k) -> None:
    if k is not None and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be None or an int ≥ 1, got {k!r}")


def from_vllm_prompt_logprobs(prompt_logprobs: Sequence[Optional[Dict[int, Any]]], *,
                              k: Optional[int] = None) -> TeacherTopK:
    """One sequence's rows ``[n - 1, K]`` from vLLM's ``RequestOutput.prompt_logprobs`` (plain data; vLLM is not
    imported).

    ``prompt_logprobs``: a list of ``n`` entries, one per prompt token: entry 0 is None (the first token has no
    distribution), entry ``j ≥ 1`` a dict ``token_id -> Logprob`` (any object with ``.logprob``; ``.rank`` and
    ``.decoded_token`` are ignored) or ``token_id -> float``. vLLM puts the top ``prompt_logprobs`` ids *and* the
    prompt's own token in each dict, so a row holds K or K + 1 ids. Row ``j - 1`` of the result holds entry ``j``,
    sorted by decreasing log-probability and cut to ``k`` (default: the widest entry; narrower rows padded with
    -1). Request the sequence (prompt + response) as the prompt, with ``SamplingParams(prompt_logprobs=K,
    max_tokens=1)``, to score every response token."""
    _check_k(k)
    if isinstance(prompt_logprobs, (str, bytes, dict)) or not isinstance(prompt_logprobs, Sequence):
        raise TypeError(f"prompt_logprobs must be a list (one entry per token), got {type(prompt_logprobs).__name__}")
    if len(prompt_logprobs) < 2:
        raise ValueError(f"prompt_logprobs must cover at least 2 tokens to score one, got {len(prompt_logprobs)}")
    if prompt_logprobs[0] is not None and len(prompt_logprobs[0]) != 0:
        raise ValueError("prompt_logprobs[0] must be None (vLLM gives the first token no distribution); pass the "
                         "whole list, starting at the sequence's first token")
    entries = []
    for j, d in enumerate(prompt_logprobs[1:], 1):
        if not isinstance(d, dict):
            raise TypeError(f"prompt_logprobs[{j}] must be a dict token_id -> Logprob or float, got "
                            f"{type(d).__name__}")
        pairs = []
        for tid, v in d.items():
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"prompt_logprobs[{j}] has a key {tid!r} that is not a token id")
            pairs.append((tid, _logprob_value(v, f"prompt_logprobs[{j}][{tid}]")))
        entries.append(pairs)
    return _rows(entries, k, "prompt_logprobs")


def from_sglang_input_logprobs(input_top_logprobs: Sequence[Optional[Sequence[Sequence[Any]]]],
                               input_token_logprobs: Optional[Sequence[Optional[Sequence[Any]]]] = None, *,
                               k: Optional[int] = None) -> TeacherTopK:
    """One sequence's rows ``[n - 1, K]`` from SGLang's ``meta_info["input_top_logprobs"]`` (plain data).

    ``input_top_logprobs``: a list of ``n`` entries, one per input token (request with ``return_logprob=True``,
    ``logprob_start_len=0``, ``top_logprobs_num=K``): entry 0 is None or empty (no distribution for the first
    token), entry ``j ≥ 1`` a list of ``(logprob, token_id, text)`` tuples (``text`` may be None).
    ``input_token_logprobs`` (optional, the same length, entries ``(logprob, token_id, text)``): the input tokens'
    own log-probabilities, merged into their rows when not among the top ids. Row ``j - 1`` holds entry ``j``,
    sorted by decreasing log-probability and cut to ``k`` (default: the widest row)."""
    _check_k(k)
    if isinstance(input_top_logprobs, (str, bytes, dict)) or not isinstance(input_top_logprobs, Sequence):
        raise TypeError(f"input_top_logprobs must be a list (one entry per token), got "
                        f"{type(input_top_logprobs).__name__}")
    n = len(input_top_logprobs)
    if n < 2:
        raise ValueError(f"input_top_logprobs must cover at least 2 tokens to score one, got {n}")
    if input_top_logprobs[0]:
        raise ValueError("input_top_logprobs[0] must be None or empty (no distribution for the first token); pass "
                         "the whole list with logprob_start_len=0")
    if input_token_logprobs is not None and len(input_token_logprobs) != n:
        raise ValueError(f"input_token_logprobs has {len(input_token_logprobs)} entries, input_top_logprobs {n}")

    def triple(t, where):
        if not isinstance(t, (tuple, list)) or len(t) < 2:
            raise TypeError(f"{where} must be a (logprob, token_id, text) tuple, got {t!r:.60}")
        lp, tid = t[0], t[1]
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
            raise ValueError(f"{where} has token id {tid!r}")
        return tid, _logprob_value(lp, where)

    entries = []
    for j in range(1, n):
        top = input_top_logprobs[j]
        if top is None or isinstance(top, (str, bytes)) or not isinstance(top, Sequence):
            raise TypeError(f"input_top_logprobs[{j}] must be a list of (logprob, token_id, text) tuples, got "
                            f"{type(top).__name__}")
        pairs = dict(triple(t, f"input_top_logprobs[{j}][{i}]") for i, t in enumerate(top))
        if input_token_logprobs is not None and input_token_logprobs[j] is not None:
            tid, lp = triple(input_token_logprobs[j], f"input_token_logprobs[{j}]")
            pairs.setdefault(tid, lp)
        entries.append(list(pairs.items()))
    return _rows(entries, k, "input_top_logprobs")


CONVERTERS: Dict[str, Callable[..., TeacherTopK]] = {
    "vllm": lambda out, k: from_vllm_prompt_logprobs(out, k=k),
    "sglang": lambda out, k: (from_sglang_input_logprobs(out.get("input_top_logprobs"),
                                                         out.get("input_token_logprobs"), k=k)
                              if isinstance(out, dict) else from_sglang_input_logprobs(out, k=k)),
    "rows": lambda out, k: TeacherTopK(*out),
}


class ServedTopKTeacher:
    """A teacher served elsewhere as a top-k teacher (the module docstring's contract).

    ``score(sequences: List[List[int]]) -> list``: called once per batch with each row's attended tokens (prompt +
    response, no padding); returns one output per sequence in ``fmt``:

    - ``"vllm"``: ``RequestOutput.prompt_logprobs`` (:func:`from_vllm_prompt_logprobs`); e.g.
      ``[o.prompt_logprobs for o in llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
      SamplingParams(max_tokens=1, prompt_logprobs=K))]``.
    - ``"sglang"``: the response's ``meta_info`` dict (its ``input_top_logprobs``, and ``input_token_logprobs``
      when present, go to :func:`from_sglang_input_logprobs`) or the ``input_top_logprobs`` list alone.
    - ``"rows"``: ``(ids, logprobs)`` tensors ``[n - 1, K]`` per sequence.

    ``k``: ids kept per position (default: the widest row; vLLM's rows are K or K + 1 wide). The rows are placed
    with :func:`pack_rows` and returned on ``input_ids``' device.
    """

    def __init__(self, score: Callable[[List[List[int]]], Sequence[Any]], fmt: str = "vllm", *,
                 k: Optional[int] = None):
        if not callable(score):
            raise TypeError(f"score must be callable, got {type(score).__name__}")
        if fmt not in CONVERTERS:
            raise ValueError(f"fmt must be one of {tuple(CONVERTERS)}, got {fmt!r}")
        _check_k(k)
        self.score, self.fmt, self.k = score, fmt, k

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TeacherTopK:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        seqs = sequences_of(input_ids, attention_mask)
        outs = list(self.score(seqs))
        if len(outs) != len(seqs):
            raise ValueError(f"score returned {len(outs)} outputs for {len(seqs)} sequences")
        rows = []
        for b, o in enumerate(outs):
            r = CONVERTERS[self.fmt](o, self.k)
            if r.ids.dim() != 2 or r.ids.shape[0] != len(seqs[b]) - 1:
                raise ValueError(f"the output for sequence {b} ({len(seqs[b])} tokens) must give "
                                 f"{len(seqs[b]) - 1} rows, got {tuple(r.ids.shape)}")
            rows.append(r)
        out = pack_rows(rows, attention_mask.to(input_ids.device), k=self.k)
        return out


# ------------------------------------------------------------------------------------------- offline files


@dataclass
class TopKTable:
    """Precomputed top-k rows of whole sequences, looked up by their tokens.

    ``sequences[s]``: the tokens of sequence ``s`` (``n_s ≥ 2``); ``rows[s]``: its rows ``(ids, logprobs)``
    ``[n_s - 1, K]`` (row ``j``: the distribution of token ``j + 1``); ``vocab_size``: optional, checked against
    the ids. Build with :meth:`build` (checked) or the readers."""

    sequences: List[Tuple[int, ...]]
    rows: List[TeacherTopK]
    k: int
    vocab_size: Optional[int] = None

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]], rows: Sequence[Tuple[Tensor, Tensor]], *,
              vocab_size: Optional[int] = None, where: str = "the table") -> "TopKTable":
        """Check and assemble: as many rows blocks as sequences, each ``[n_s - 1, K]`` with one ``K``; token ids
        non-negative ints (below ``vocab_size`` if given); rows as :func:`check_topk_rows`. A sequence given
        twice must carry the same rows."""
        if len(sequences) != len(rows):
            raise ValueError(f"{where}: {len(sequences)} sequences but {len(rows)} row blocks")
        if not sequences:
            raise ValueError(f"{where} holds no sequences")
        seqs, blocks, K = [], [], None
        for s, (seq, r) in enumerate(zip(sequences, rows)):
            seq = tuple(int(t) for t in seq)
            if len(seq) < 2 or min(seq) < 0 or (vocab_size is not None and max(seq) >= vocab_size):
                raise ValueError(f"{where}: sequence {s} must hold ≥ 2 token ids in [0, {vocab_size or 'V'}), got "
                                 f"{list(seq)[:8]}{'...' if len(seq) > 8 else ''}")
            ids, lp = r
            check_topk_rows(f"{where}: rows of sequence {s}", ids, lp, vocab_size=vocab_size)
            if ids.dim() != 2 or ids.shape[0] != len(seq) - 1:
                raise ValueError(f"{where}: sequence {s} has {len(seq)} tokens, so its rows must be "
                                 f"[{len(seq) - 1}, K], got {tuple(ids.shape)}")
            if K is None:
                K = ids.shape[1]
            elif ids.shape[1] != K:
                raise ValueError(f"{where}: sequence {s}'s rows have K={ids.shape[1]}, the first's K={K}")
            seqs.append(seq)
            blocks.append(TeacherTopK(ids.to(torch.long).cpu(), lp.cpu()))
        table = cls(seqs, blocks, K, vocab_size)
        table._index()
        return table

    def _index(self) -> None:
        self._by_seq: Dict[Tuple[int, ...], int] = {}
        for s, seq in enumerate(self.sequences):
            prev = self._by_seq.setdefault(seq, s)
            if prev != s and not (torch.equal(self.rows[prev].ids, self.rows[s].ids)
                                  and torch.equal(self.rows[prev].logprobs, self.rows[s].logprobs)):
                raise ValueError(f"sequences {prev} and {s} are the same tokens with different rows")

    def lookup(self, seq: Sequence[int]) -> TeacherTopK:
        """The rows of the sequence with exactly these tokens (KeyError naming its length and first tokens)."""
        s = self._by_seq.get(tuple(int(t) for t in seq))
        if s is None:
            raise KeyError(f"no precomputed rows for the sequence of {len(seq)} tokens starting {list(seq)[:8]}")
        return self.rows[s]

    def __len__(self) -> int:
        return len(self.sequences)


class PrecomputedTopKTeacher:
    """A :class:`TopKTable` as a top-k teacher (offline distillation): each row of the batch is looked up by its
    attended tokens (a KeyError, naming the row, for a sequence the table lacks) and placed with
    :func:`pack_rows`. Use it with fixed sequences (``OPDTrainer.train_step(rollouts=...)`` or
    :func:`tipkernels.opd.sequence_tip_loss`): on-policy rollouts are new sequences no file holds."""

    def __init__(self, table: TopKTable):
        if not isinstance(table, TopKTable):
            raise TypeError(f"table must be a TopKTable, got {type(table).__name__}")
        self.table = table

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "PrecomputedTopKTeacher":
        """Read ``path``: ``*.safetensors`` (:func:`read_topk_safetensors`) or JSON lines
        (:func:`read_topk_jsonl`)."""
        path = Path(path)
        return cls(read_topk_safetensors(path) if path.suffix == ".safetensors" else read_topk_jsonl(path))

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TeacherTopK:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = []
        for b, seq in enumerate(sequences_of(input_ids, attention_mask)):
            try:
                rows.append(self.table.lookup(seq))
            except KeyError as e:
                raise KeyError(f"row {b}: {e.args[0]}") from None
        return pack_rows(rows, attention_mask.to(input_ids.device), k=self.table.k)


def write_topk_safetensors(path: Union[str, Path], sequences: Sequence[Sequence[int]],
                           rows: Sequence[Tuple[Tensor, Tensor]], *, vocab_size: Optional[int] = None) -> Path:
    """Write sequences and their top-k rows (checked as :meth:`TopKTable.build`) to a safetensors file.

    Layout (format ``tipkernels.teacher_topk``, version 1), ``S`` sequences of ``n_s`` tokens, ``R = Σ (n_s - 1)``:

    - ``input_ids``: int64 ``[Σ n_s]``, the sequences' tokens concatenated (no padding);
    - ``offsets``: int64 ``[S + 1]``, sequence ``s`` is ``input_ids[offsets[s]:offsets[s+1]]``;
    - ``topk_ids``: int64 ``[R, K]``, ``-1`` pads; sequence ``s``'s rows are ``[offsets[s] - s, offsets[s+1] - s - 1)``,
      row ``j`` of a sequence the distribution of its token ``j + 1``;
    - ``topk_logprobs``: ``[R, K]`` in the rows' dtype (float32, bfloat16, float16 or float64);
    - metadata: ``format``, ``version``, ``k``, and ``vocab_size`` when given.
    """
    from safetensors.torch import save_file

    table = TopKTable.build(sequences, rows, vocab_size=vocab_size, where=f"writing {path}")
    lens = torch.tensor([len(s) for s in table.sequences], dtype=torch.long)
    dts = {r.logprobs.dtype for r in table.rows}
    dt = dts.pop() if len(dts) == 1 else torch.float32
    meta = {"format": FORMAT, "version": VERSION, "k": str(table.k)}
    if vocab_size is not None:
        meta["vocab_size"] = str(int(vocab_size))
    tensors = {"input_ids": torch.tensor([t for s in table.sequences for t in s], dtype=torch.long),
               "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
               "topk_ids": torch.cat([r.ids for r in table.rows]).contiguous(),
               "topk_logprobs": torch.cat([r.logprobs.to(dt) for r in table.rows]).contiguous()}
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_topk_safetensors(path: Union[str, Path]) -> TopKTable:
    """Read a file written by :func:`write_topk_safetensors`, checking its format, version, tensor names, dtypes,
    shapes, offsets and rows (ValueError naming the file and the problem)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (metadata format={meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: version {meta.get('version')!r}, this reader knows {VERSION!r}")
        names = set(f.keys())
        want = {"input_ids", "offsets", "topk_ids", "topk_logprobs"}
        if names != want:
            raise ValueError(f"{path}: tensors {sorted(names)}, expected {sorted(want)}")
        t = {n: f.get_tensor(n) for n in want}
    vocab = int(meta["vocab_size"]) if "vocab_size" in meta else None
    ids, offsets = t["input_ids"], t["offsets"]
    if ids.dtype != torch.long or offsets.dtype != torch.long or ids.dim() != 1 or offsets.dim() != 1 \
            or offsets.numel() < 2:
        raise ValueError(f"{path}: input_ids and offsets must be 1-D int64 (offsets [S + 1], S ≥ 1), got "
                         f"{ids.dtype} {tuple(ids.shape)} and {offsets.dtype} {tuple(offsets.shape)}")
    lens = offsets[1:] - offsets[:-1]
    S = lens.numel()
    if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel() or bool((lens < 2).any()):
        raise ValueError(f"{path}: offsets must start at 0, end at {ids.numel()} (input_ids' length) and step by "
                         f"≥ 2, got {offsets.tolist()[:8]}...")
    R = ids.numel() - S
    tid, tlp = t["topk_ids"], t["topk_logprobs"]
    if tid.dim() != 2 or tid.shape[0] != R or tid.shape != tlp.shape or str(tid.shape[1]) != meta.get("k"):
        raise ValueError(f"{path}: topk_ids {tuple(tid.shape)} and topk_logprobs {tuple(tlp.shape)} must both be "
                         f"[R, K] = [{R}, {meta.get('k')}]")
    bounds = (offsets - torch.arange(S + 1)).tolist()
    seqs = [ids[offsets[s]:offsets[s + 1]].tolist() for s in range(S)]
    rows = [TeacherTopK(tid[bounds[s]:bounds[s + 1]], tlp[bounds[s]:bounds[s + 1]]) for s in range(S)]
    return TopKTable.build(seqs, rows, vocab_size=vocab, where=str(path))


def write_topk_jsonl(path: Union[str, Path], sequences: Sequence[Sequence[int]],
                     rows: Sequence[Tuple[Tensor, Tensor]], *, vocab_size: Optional[int] = None) -> Path:
    """Write sequences and their top-k rows (checked as :meth:`TopKTable.build`) as JSON lines, one sequence per
    line::

        {"input_ids": [n ints], "topk_ids": [[≤ K ints] × (n - 1)], "topk_logprobs": [[floats] × (n - 1)]}

    Row ``j`` is the distribution of token ``j + 1``; padding (``-1``) is dropped, so rows may be ragged; ``-inf``
    is written ``-Infinity`` (Python's ``json``). ``vocab_size``, when given, goes into every line
    (``"vocab_size"``) and is checked on reading."""
    table = TopKTable.build(sequences, rows, vocab_size=vocab_size, where=f"writing {path}")
    path = Path(path)
    with open(path, "w") as f:
        for seq, r in zip(table.sequences, table.rows):
            keep = r.ids >= 0
            line = {"input_ids": list(seq),
                    "topk_ids": [i[m].tolist() for i, m in zip(r.ids, keep)],
                    "topk_logprobs": [v[m].double().tolist() for v, m in zip(r.logprobs, keep)]}
            if vocab_size is not None:
                line["vocab_size"] = int(vocab_size)
            f.write(json.dumps(line) + "\n")
    return path


def read_topk_jsonl(path: Union[str, Path], *, k: Optional[int] = None) -> TopKTable:
    """Read JSON lines written by :func:`write_topk_jsonl` (or any producer of that layout): every line an object
    with ``input_ids``, ``topk_ids``, ``topk_logprobs`` (ragged rows padded to ``k``, default the widest row in
    the file) and optionally ``vocab_size``. ValueError naming the file and line for anything malformed."""
    _check_k(k)
    path = Path(path)
    seqs, entries, vocab = [], [], None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not {"input_ids", "topk_ids", "topk_logprobs"} <= set(rec):
                raise ValueError(f"{where}: each line must be an object with input_ids, topk_ids, topk_logprobs")
            seq, tids, tlps = rec["input_ids"], rec["topk_ids"], rec["topk_logprobs"]
            if not (isinstance(seq, list) and all(type(t) is int for t in seq)):
                raise ValueError(f"{where}: input_ids must be a list of ints")
            if not (isinstance(tids, list) and isinstance(tlps, list) and len(tids) == len(tlps) == len(seq) - 1):
                raise ValueError(f"{where}: topk_ids and topk_logprobs must be lists of {len(seq) - 1} rows "
                                 f"(one per token after the first)")
            pairs = []
            for j, (a, b) in enumerate(zip(tids, tlps)):
                if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                        and all(type(x) is int for x in a)
                        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b)):
                    raise ValueError(f"{where}: row {j}: topk_ids must be a list of ints and topk_logprobs a list "
                                     f"of numbers of the same length")
                pairs.append(list(zip(a, (float(x) for x in b))))
            if "vocab_size" in rec:
                if vocab is not None and rec["vocab_size"] != vocab:
                    raise ValueError(f"{where}: vocab_size {rec['vocab_size']!r}, earlier lines {vocab}")
                vocab = rec["vocab_size"]
            seqs.append(seq)
            entries.append((where, pairs))
    width = k if k is not None else max((len(p) for _, e in entries for p in e), default=1)
    rows = []
    for where, e in entries:
        if any(len(p) > width for p in e):
            raise ValueError(f"{where}: a row has more than k={width} ids")
        ids = torch.full((len(e), width), -1, dtype=torch.long)
        lp = torch.zeros((len(e), width), dtype=torch.float32)
        for j, p in enumerate(e):
            if p:
                ids[j, :len(p)] = torch.tensor([a for a, _ in p], dtype=torch.long)
                lp[j, :len(p)] = torch.tensor([b for _, b in p], dtype=torch.float32)
        rows.append(TeacherTopK(ids, lp))
    if not seqs:
        raise ValueError(f"{path}: no sequences")
    return TopKTable.build(seqs, rows, vocab_size=vocab, where=str(path))
