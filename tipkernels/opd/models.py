"""Hugging Face causal LMs without their logits: final hidden states, lm_head weights, and the shifted TIP loss.

The lm_head of a causal LM maps the decoder body's final hidden states (after its last norm) to logits. The loop
never calls the full model: it runs the body (``model.base_model``) to ``last_hidden_state`` and hands that and
``model.get_output_embeddings().weight`` to the fused kernels, so no ``[tokens, vocab]`` tensor is ever formed.

Position convention: the hidden state at position ``i`` gives the distribution of the token at ``i + 1``. A token
mask over the *sequence* (True where a token should be scored, e.g. response tokens) therefore becomes the loss
mask ``token_mask[:, 1:]`` over hidden positions ``0 .. T-2``; the last position predicts nothing and is not run.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import copy
import math

import torch
from torch import nn

from ..inputs import IDENTITY_TRANSFORMS
from ..loss import TIPDistillationLoss
from ..types import TeacherTopK, TIPLossOutput

Tensor = torch.Tensor

# Config attributes that change logits beyond ``c·tanh(a·(h·Wᵀ + b)/c)`` (the scale ``a`` and soft-cap ``c`` are read
# by :func:`logit_transform`); the fused kernels cannot reproduce these.
_UNSUPPORTED_TRANSFORMS = ("output_multiplier_scale",)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying Hugging Face model of a DDP/FSDP/``torch.compile``/PEFT wrapper."""
    seen = 0
    while seen < 8:
        if type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()  # the HF model with adapter layers injected
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
                type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")
                and hasattr(model, "module")):
            model = model.module
        else:
            break
        seen += 1
    return model


def lm_head(model: nn.Module, who: str = "model") -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight [V, D], bias [V] or None)`` of a causal LM's output projection (tied weights included).

    Raises ValueError if the model has no linear output embedding or transforms its logits in a way the fused
    kernels cannot reproduce (a scale and a soft-cap they can: :func:`logit_transform`).
    """
    model = unwrap(model)
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{who} must be a Hugging Face causal LM (with get_output_embeddings()), "
                        f"got {type(model).__name__}")
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{who}.get_output_embeddings() must be a linear layer with a 2-D weight, got {head!r}")
    text = _text_config(model)
    if text is not None:
        for name in _UNSUPPORTED_TRANSFORMS:
            value = getattr(text, name, None)
            if value not in (None, 1, 1.0, 0, 0.0, False):
                raise ValueError(f"{who} transforms its logits ({name}={value!r}); tipkernels computes logits as "
                                 f"c·tanh(a·(h·Wᵀ+b)/c) from the final hidden states and would not match it")
    logit_transform(model, who)  # its errors too
    return weight, getattr(head, "bias", None)


def is_topk_teacher(teacher: Any) -> bool:
    """Whether ``teacher`` is a *top-k teacher* (a callable ``(input_ids, attention_mask) -> TeacherTopK``, see
    :mod:`tipkernels.opd.topk_teacher`) rather than a Hugging Face causal LM: callable, without
    ``get_output_embeddings``."""
    return callable(teacher) and not hasattr(unwrap(teacher) if isinstance(teacher, nn.Module) else teacher,
                                             "get_output_embeddings")


def teacher_topk_output(out: Any, input_ids: Tensor) -> TeacherTopK:
    """A top-k teacher's output for ``input_ids [B, T]`` as a :class:`TeacherTopK` ``[B, T-1, K]`` on
    ``input_ids``' device: TypeError when it is not an ``(ids, logprobs)`` pair of tensors, ValueError naming the
    shapes when it is not shaped like the student's hidden states ``[B, T-1, ·]`` (hidden position ``i`` holds the
    distribution of token ``i + 1``). The values are checked by the loss."""
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise TypeError(f"a top-k teacher must return a TeacherTopK (ids, logprobs) of tensors, got "
                        f"{type(out).__name__}")
    ids, logprobs = out
    B, T = input_ids.shape
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (B, T - 1) or logprobs.shape != ids.shape:
        raise ValueError(f"the top-k teacher's output must be ids and logprobs shaped [B, T-1, K] = [{B}, {T - 1}, K] "
                         f"for input_ids [{B}, {T}] (hidden position i holds the distribution of token i+1), got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    dev = input_ids.device
    return TeacherTopK(ids.to(dev), logprobs.to(dev))


def full_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` as a plain tensor: a DTensor (an FSDP2 shard outside its module's forward) is all-gathered, which
    is a collective every rank must call; anything else is returned as is. Differentiable."""
    DTensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor()
    return t


def _text_config(model: nn.Module):
    config = getattr(unwrap(model), "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model: nn.Module, who: str = "model") -> Tuple[float, Optional[float]]:
    """``(scale a, soft-cap c or None)`` of a causal LM whose logits are ``c·tanh(a·(h·Wᵀ+b)/c)``, read from its
    (text) config as TRL's distillation trainer reads it: ``a`` is the first of ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) that is not None, else ``1 / logits_scaling``
    (Granite, MiniCPM3; HyperCLOVA X multiplies: ``logits_scaling``), else 1; ``c`` is
    ``final_logit_softcapping`` (Gemma 2/3), None for no cap. Raises ValueError naming the attribute for a scale or
    cap that is not a positive finite number."""
    text = _text_config(model)
    if text is None:
        return 1.0, None
    scale, source = None, None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            scale, source = getattr(text, name), name
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        source, raw = "logits_scaling", getattr(text, "logits_scaling")
        if _is_positive(raw):
            scale = raw if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / raw
        else:
            scale = raw
    cap = getattr(text, "final_logit_softcapping", None)
    if scale is not None and not _is_positive(scale):
        raise ValueError(f"{who}'s config has {source}={getattr(text, source)!r}: tipkernels needs a positive "
                         f"finite logit scale")
    if cap is not None and not _is_positive(cap):
        raise ValueError(f"{who}'s config has final_logit_softcapping={cap!r}: tipkernels needs a positive finite "
                         f"soft-cap (or None)")
    return (1.0 if scale is None else float(scale)), (None if cap is None else float(cap))


def _is_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def tip_loss_for(loss_fn: TIPDistillationLoss, student: nn.Module, teacher: nn.Module) -> TIPDistillationLoss:
    """``loss_fn`` with the logit transforms of the two models (:func:`logit_transform`): as is when it already has
    them, a shallow copy carrying them when it has none (the identity); a ValueError when it has others."""
    (a_s, c_s), (a_t, c_t) = logit_transform(student, "student"), logit_transform(teacher, "teacher")
    wanted = dict(student_logit_scale=a_s, student_softcap=c_s, teacher_logit_scale=a_t, teacher_softcap=c_t)
    have = {k: getattr(loss_fn, k) for k in wanted}
    if have == wanted:
        return loss_fn
    if have != IDENTITY_TRANSFORMS:
        raise ValueError(f"the loss was built with logit transforms {have}, but the models' configs give {wanted}")
    out = copy.copy(loss_fn)
    for k, v in wanted.items():
        setattr(out, k, v)
    return out


def body(model: nn.Module, who: str = "model") -> nn.Module:
    """The decoder body of a causal LM: the module whose output's ``last_hidden_state`` feeds the lm_head."""
    model = unwrap(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get = getattr(model, "get_decoder", None)
        base = get() if callable(get) else None
    if base is None or base is model:
        raise TypeError(f"{who} ({type(model).__name__}) exposes no decoder body (base_model / get_decoder()); "
                        f"tipkernels.opd needs a Hugging Face *ForCausalLM model")
    return base


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over attended tokens only, as ``generate`` does for left-padded prompts. int64 ``[B, T]``."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                        who: str = "model") -> Tensor:
    """Final hidden states ``[B, T, D]`` (model dtype) of a causal LM's body: what its lm_head would multiply.

    Gradients flow if enabled. ``position_ids`` follow ``attention_mask`` so left-padded rows see the same
    positions as in ``generate``.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = body(model, who)(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def check_vocab(student: nn.Module, teacher: nn.Module, tokenizer=None, teacher_tokenizer=None) -> Tuple[int, int]:
    """Check that the pair can be distilled; returns ``(V_student, V_teacher)`` (lm_head rows).

    Errors (ValueError): the teacher has fewer lm_head rows than the student; the tokenizer has more tokens than the
    student's lm_head rows; a given teacher tokenizer maps some token to a different id than the student's (a
    different vocabulary; extra padding rows in either lm_head are fine). A top-k teacher (:func:`is_topk_teacher`)
    has no lm_head: ``V_teacher`` is then the student's (its ids are checked against it by the loss) and only the
    tokenizers are compared.
    """
    ws, _ = lm_head(student, "student")
    vs = ws.shape[0]
    vt = vs if is_topk_teacher(teacher) else lm_head(teacher, "teacher")[0].shape[0]
    if vt < vs:
        raise ValueError(f"the teacher's lm_head has {vt} rows, fewer than the student's {vs}: the teacher must "
                         f"cover the student's vocabulary (extra teacher rows, e.g. padding, are fine)")
    if tokenizer is not None:
        n = len(tokenizer)
        if n > vs:
            raise ValueError(f"the tokenizer has {n} tokens but the student's lm_head only {vs} rows")
    if tokenizer is not None and teacher_tokenizer is not None:
        a, b = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:5]
            raise ValueError(f"student and teacher tokenizers differ ({len(a)} vs {len(b)} tokens; first "
                             f"differences (token, id): {diff}); on-policy distillation here needs one shared "
                             f"vocabulary (padding rows beyond it are fine)")
        if len(teacher_tokenizer) > vt:
            raise ValueError(f"the teacher tokenizer has {len(teacher_tokenizer)} tokens but the teacher's lm_head "
                             f"only {vt} rows")
    return vs, vt


def sequence_tip_loss(loss_fn: TIPDistillationLoss, student: nn.Module, teacher: nn.Module, input_ids: Tensor,
                      attention_mask: Optional[Tensor], token_mask: Tensor, *,
                      generator: Optional[torch.Generator] = None) -> TIPLossOutput:
    """The TIP distillation loss of ``student`` towards ``teacher`` on given sequences.

    Args:
        loss_fn: a :class:`tipkernels.TIPDistillationLoss`. The models' logit transforms (scale, soft-cap) are
            read from their configs and applied (:func:`tip_loss_for`).
        student, teacher: Hugging Face causal LMs sharing a vocabulary (teacher lm_head rows ≥ student's); or
            ``teacher`` a top-k teacher (:func:`is_topk_teacher`): called under ``no_grad`` as
            ``teacher(input_ids, attention_mask)`` on the whole sequences, it returns a :class:`tipkernels.TeacherTopK`
            ``[B, T-1, K]`` for the hidden positions (``[b, i]``: the teacher's log-probabilities of token ``i+1``),
            which the loss takes as ``teacher_topk=`` (the loss's ``tail``; see :mod:`tipkernels.opd.topk_teacher`).
        input_ids: int64 ``[B, T]``.
        attention_mask: ``[B, T]`` (1 = attend), or None for all ones.
        token_mask: bool ``[B, T]``, True on the tokens to distil (e.g. response tokens up to and including EOS).
            Token ``j`` is scored by the hidden state at ``j - 1``; a True at ``j = 0`` is ignored.
        generator: for the sampling rules.

    Returns:
        :class:`tipkernels.TIPLossOutput` whose stats/selection are over hidden positions ``[B, T-1]``:
        position ``i`` holds token ``i+1``'s values. The teacher runs under ``no_grad``; the student's body and
        lm_head receive gradients through ``loss``.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be an int tensor [B, T], got {getattr(input_ids, 'shape', input_ids)}")
    if not isinstance(token_mask, Tensor) or token_mask.shape != input_ids.shape:
        raise ValueError(f"token_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                         f"got {getattr(token_mask, 'shape', type(token_mask).__name__)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens to score one, got T={input_ids.shape[1]}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, attn = input_ids[:, :-1], attention_mask[:, :-1]  # the last position predicts nothing
    mask = token_mask[:, 1:].bool() & attn.bool()         # hidden i scores token i+1 (attention_mask on i too)

    ws, bs = lm_head(student, "student")
    loss_fn = tip_loss_for(loss_fn, student, teacher)
    if is_topk_teacher(teacher):
        with torch.no_grad():
            topk = teacher_topk_output(teacher(input_ids, attention_mask), input_ids)
        h_s = final_hidden_states(student, ids, attn, who="student").to(ws.dtype)
        with torch.autocast(h_s.device.type, enabled=False):
            return loss_fn(h_s, ws, mask=mask, student_bias=bs, teacher_topk=topk, generator=generator)
    wt, bt = lm_head(teacher, "teacher")
    with torch.no_grad():
        h_t = final_hidden_states(teacher, ids, attn, who="teacher")
        wt, bt = full_tensor(wt), full_tensor(bt)  # a sharded teacher's lm_head, gathered for the loss
    h_s = final_hidden_states(student, ids, attn, who="student")
    # The fused ops take one dtype: the student's lm_head dtype (hidden states may come out of autocast in bf16).
    dt = ws.dtype
    h_s = h_s.to(dt)
    h_t, wt = h_t.to(dt), wt.detach().to(dt)
    bt = None if bt is None else bt.detach().to(dt)
    with torch.autocast(h_s.device.type, enabled=False):  # the kernels choose their own accumulation precision
        return loss_fn(h_s, ws, h_t, wt, mask, student_bias=bs, teacher_bias=bt, generator=generator)


def apply_weights(model: nn.Module, sd: Dict[str, Tensor], where: Any) -> None:
    """Load the full state dict ``sd`` into ``model`` in place. Keys may be missing only for parameters tied to a
    loaded one (e.g. a tied lm_head). Every key and shape is checked first: on a ValueError naming ``where`` the
    model is untouched."""
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        raise ValueError(f"checkpoint {where} has weights the model lacks: {unexpected[:5]}")
    shapes = [f"{k}: {tuple(sd[k].shape)} vs the model's {tuple(own[k].shape)}" for k in sorted(sd)
              if tuple(sd[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise ValueError(f"checkpoint {where} has weights of other shapes: {shapes[:3]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in sd if k in params}
    untied = [k for k in own if k not in sd and (k not in params or params[k].data_ptr() not in loaded_ptrs)]
    if untied:
        raise ValueError(f"checkpoint {where} lacks weights {untied[:5]}")
    model.load_state_dict(sd, strict=False)
