"""Student rollouts: left-padded prompts → ``generate`` → sequences with a response mask.

Layout of a rollout batch (``P`` = padded prompt width, ``G`` = generated width)::

    input_ids       [B, P + G]   pad … pad  prompt tokens | response tokens … EOS  pad … pad
    attention_mask  [B, P + G]   0  …  0    1 …         1 | 1 …               1   0  …  0
    response_mask   [B, P + G]   0 …                    0 | 1 …               1   0  …  0

The response runs up to and including the first EOS (or to ``max_new_tokens``); what ``generate`` writes after EOS
is padding. :func:`tipkernels.opd.models.sequence_tip_loss` shifts ``response_mask`` onto the hidden positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .models import unwrap

Tensor = torch.Tensor


@dataclass
class Rollouts:
    """A batch of prompts and the student's sampled responses (all int64/bool ``[B, P + G]`` on one device)."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_width: int

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(1)


def eos_ids(tokenizer, model: Optional[nn.Module] = None) -> List[int]:
    """The stop token ids: the model's generation config's EOS (may be several), else the tokenizer's."""
    ids = None
    gen = getattr(unwrap(model), "generation_config", None) if model is not None else None
    if gen is not None and getattr(gen, "eos_token_id", None) is not None:
        ids = gen.eos_token_id
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def pad_id(tokenizer) -> int:
    """The padding id (the tokenizer's pad token, else its EOS). ValueError if it has neither."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")
    return int(pid)


def encode_prompts(tokenizer, prompts: Sequence[Union[str, Sequence[int]]], device) -> tuple:
    """Left-pad prompts (strings, tokenised without adding special tokens beyond the tokenizer's defaults, or
    lists of token ids) to ``(input_ids int64 [B, P], attention_mask int64 [B, P])``."""
    rows = []
    for p in prompts:
        if isinstance(p, str):
            rows.append(list(tokenizer(p)["input_ids"]))
        else:
            rows.append([int(t) for t in p])
        if not rows[-1]:
            raise ValueError(f"prompt {p!r} tokenises to no tokens")
    width = max(len(r) for r in rows)
    pid = pad_id(tokenizer)
    ids = torch.full((len(rows), width), pid, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r):] = 1
    return ids.to(device), attn.to(device)


def response_mask(generated: Tensor, eos: Sequence[int]) -> Tensor:
    """bool ``[B, G]``: True on generated tokens up to and including the first EOS of each row (all of the row
    when it has none)."""
    if not eos:
        return torch.ones_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(list(eos), device=generated.device))
    # number of EOS strictly before each position: 0 means "not yet stopped"
    before = is_eos.long().cumsum(1) - is_eos.long()
    return before == 0


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_return_sequences: int = 1,
             device=None) -> Rollouts:
    """Sample responses with ``model.generate`` (greedy when ``temperature == 0``) and mask them.

    Uses the global torch RNG (seed it, or restore its state, for reproducible rollouts). The model is put in eval
    mode for generation and restored afterwards.
    """
    model = unwrap(model)
    device = device if device is not None else next(model.parameters()).device
    ids, attn = encode_prompts(tokenizer, prompts, device)
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, 0)
        attn = attn.repeat_interleave(num_return_sequences, 0)
    eos = eos_ids(tokenizer, model)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id(tokenizer),
                  eos_token_id=eos or None)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
    finally:
        model.train(was_training)
    seq = out if isinstance(out, Tensor) else out.sequences
    width = ids.shape[1]
    gen = seq[:, width:]
    resp = response_mask(gen, eos)
    full_resp = torch.cat([torch.zeros_like(attn, dtype=torch.bool), resp], 1)
    full_attn = torch.cat([attn, resp.long()], 1)
    return Rollouts(input_ids=seq, attention_mask=full_attn, response_mask=full_resp, prompt_width=width)


def decode_responses(tokenizer, rollouts: Rollouts) -> List[str]:
    """The response text of each row (EOS and padding removed)."""
    out = []
    gen = rollouts.input_ids[:, rollouts.prompt_width:]
    mask = rollouts.response_mask[:, rollouts.prompt_width:]
    for row, m in zip(gen.tolist(), mask.tolist()):
        out.append(tokenizer.decode([t for t, keep in zip(row, m) if keep], skip_special_tokens=True))
    return out
