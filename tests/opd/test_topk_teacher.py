"""Top-k teachers (tipkernels.opd.topk_teacher): a local model's chunked top-k, vLLM/SGLang outputs, offline files.

Every adapter is checked against the float64 log-softmax of the teacher's real (materialised) logits: the ids are
the true top-k (plus, for served outputs, the sequence's own token), the log-probabilities equal the truth at them,
and each row sits at the hidden position that scores the next token.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import tipkernels as tk
from tipkernels.opd.models import is_topk_teacher, teacher_topk_output
from tipkernels.opd.topk_teacher import (
    HFTopKTeacher, PrecomputedTopKTeacher, ServedTopKTeacher, TopKTable, check_topk_rows,
    from_sglang_input_logprobs, from_vllm_prompt_logprobs, pack_rows, read_topk_jsonl,
    read_topk_safetensors, sequences_of, topk_logprobs, unpack_rows, write_topk_jsonl, write_topk_safetensors,
)

from tests._harness import gemma2_model, granite_model, model_logprobs64, opd_models, transform64


def _batch(vocab, seed=3):
    """Left- and right-padded rows (a prompt pad, a response that stopped early)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0
    attn[2, 7:] = 0
    return ids, attn


def scored(attn):
    """Hidden positions with a next token: both token i and token i + 1 attended."""
    return attn[:, :-1].bool() & attn[:, 1:].bool()


def _assert_rows_match_truth(ids, lp, truth, k, *, tol, exact_topk=True):
    """``ids``/``lp`` [R, K'] against truth [R, V] float64: the true top-k ids are there, and lp is the truth."""
    real = ids >= 0
    got = torch.where(real, truth.gather(-1, ids.clamp_min(0)), torch.zeros_like(truth[:, :1]))
    torch.testing.assert_close(torch.where(real, lp.double(), got), got, rtol=0, atol=tol)
    if exact_topk:
        want = truth.topk(k, -1).indices
        for r in range(ids.shape[0]):
            assert set(want[r].tolist()) <= set(ids[r][real[r]].tolist()), r


# ------------------------------------------------------------------------------------ the chunked top-k


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("scale,cap,temperature", [(1.0, None, 1.0), (0.25, None, 1.0), (1.3, 4.0, 1.0),
                                                   (1.0, None, 0.7), (1.3, 4.0, 2.0)])
def test_topk_logprobs_matches_float64_softmax(dtype, tol, scale, cap, temperature):
    g = torch.Generator().manual_seed(0)
    n, vw, v, d, k = 37, 103, 97, 16, 9
    h = torch.randn(2, n, d, generator=g, dtype=torch.float64) * 2
    w = torch.randn(vw, d, generator=g, dtype=torch.float64)
    b = torch.randn(vw, generator=g, dtype=torch.float64)
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    # odd chunks: several row tiles and vocabulary tiles, the last of each partial; a tile narrower than k too
    out = topk_logprobs(h, w, k, bias=b, logit_scale=scale, softcap=cap, temperature=temperature, vocab_size=v,
                        row_chunk=10, vocab_chunk=7)
    assert out.ids.shape == out.logprobs.shape == (2, n, k) and out.ids.dtype == torch.long
    truth = torch.log_softmax(transform64(h.double().reshape(-1, d) @ w[:v].double().T + b[:v].double(),
                                          temperature, scale, cap), -1)
    ids, lp = out.ids.reshape(-1, k), out.logprobs.reshape(-1, k)
    assert int(ids.max()) < v  # the padding rows are never ids
    _assert_rows_match_truth(ids, lp, truth, k, tol=tol)
    assert bool((lp[:, 1:] <= lp[:, :-1]).all())  # sorted, largest first


def test_topk_logprobs_refuses_bad_arguments():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="k must be an int in \\[1, 10\\]"):
        topk_logprobs(h, w, 11)
    with pytest.raises(ValueError, match="vocab_size must lie in \\[1, 10\\]"):
        topk_logprobs(h, w, 2, vocab_size=11)
    with pytest.raises(ValueError, match="agree on D"):
        topk_logprobs(h, torch.randn(10, 7), 2)
    with pytest.raises(ValueError, match="vocab_chunk"):
        topk_logprobs(h, w, 2, vocab_chunk=0)


# ------------------------------------------------------------------------------------ a local HF teacher


@pytest.mark.parametrize("which", ["llama-padded", "gemma2-softcap", "granite-scale"])
def test_hf_teacher_is_the_models_topk_at_the_loops_positions(tok, which):
    V = len(tok)
    if which == "llama-padded":
        _, model = opd_models(tok)  # 3 padding rows beyond the student's vocabulary
    elif which == "gemma2-softcap":
        model = gemma2_model(V, 5.0)
    else:
        model = granite_model(V, 4.0)
    ids, attn = _batch(V)
    k = 5
    teacher = HFTopKTeacher(model, k, vocab_size=V, vocab_chunk=4, row_chunk=5)
    assert is_topk_teacher(teacher) and not is_topk_teacher(model)
    out = teacher(ids, attn)
    assert out.ids.shape == (3, 8, k)
    truth = model_logprobs64(model, ids, attn, V)  # renormalised over the first V rows, like the dense loss
    m = attn[:, :-1].bool()  # attended hidden positions
    _assert_rows_match_truth(out.ids[m], out.logprobs[m], truth[m], k, tol=2e-5)
    # the checked form the loop uses
    again = teacher_topk_output(out, ids)
    assert torch.equal(again.ids, out.ids)


def test_hf_teacher_refuses_bad_k(tok):
    _, model = opd_models(tok)
    with pytest.raises(ValueError, match="k must be an int"):
        HFTopKTeacher(model, 0)
    with pytest.raises(ValueError, match="vocab_size must lie"):
        HFTopKTeacher(model, 3, vocab_size=10 ** 6)


# ------------------------------------------------------------------------------------------ served teachers


def _served_outputs(model, seqs, V, k, fmt):
    """What vLLM / SGLang return for each sequence, built from the float64 truth: the top-k ids plus the
    sequence's own token per position (entry 0 empty), in their plain-data shapes."""
    outs = []
    for s, seq in enumerate(seqs):
        t = torch.tensor([seq])
        lp = model_logprobs64(model, t, torch.ones_like(t), V)[0]  # [n-1, V]
        entries = [None]
        tokens = [None]
        for j in range(len(seq) - 1):
            top = lp[j].topk(k)
            d = {int(i): float(v) for i, v in zip(top.indices, top.values)}
            own = seq[j + 1]
            if fmt == "vllm":
                d.setdefault(own, float(lp[j, own]))
                rank = {i: r + 1 for r, i in enumerate(sorted(d, key=lambda i: -d[i]))}
                # Logprob objects for the first sequence, plain floats for the others
                entries.append({i: SimpleNamespace(logprob=v, rank=rank[i], decoded_token="x") for i, v in d.items()}
                               if s == 0 else d)
            else:
                entries.append([(v, i, None) for i, v in d.items()])
                tokens.append((float(lp[j, own]), own, "x"))
        outs.append(entries if fmt == "vllm" else (entries, tokens))
    return outs


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_served_teacher_converts_and_places_rows(tok, fmt):
    V = len(tok)
    _, model = opd_models(tok)
    ids, attn = _batch(V)
    seqs = sequences_of(ids, attn)
    assert [len(s) for s in seqs] == [7, 9, 7]
    k = 4
    outs = _served_outputs(model, seqs, V, k, fmt)
    calls = []

    def score(sequences):
        calls.append(sequences)
        return [o if fmt == "vllm" else {"input_top_logprobs": o[0], "input_token_logprobs": o[1]} for o in outs]

    teacher = ServedTopKTeacher(score, fmt)
    got = teacher(ids, attn)
    assert calls == [seqs]
    truth = model_logprobs64(model, ids, attn, V)
    m = scored(attn)
    assert got.ids.shape[-1] == k + 1  # the own token widens rows where it is not in the top k
    _assert_rows_match_truth(got.ids[m], got.logprobs[m], truth[m], k, tol=1e-6)
    # the sequence's own next token is in every scored row
    nxt = ids[:, 1:][m]
    assert bool((got.ids[m] == nxt[:, None]).any(-1).all())
    assert bool((got.ids[~m] == -1).all())  # padding positions hold nothing
    # a cut to k keeps the true top-k exactly
    cut = ServedTopKTeacher(score, fmt, k=k)(ids, attn)
    assert cut.ids.shape[-1] == k
    _assert_rows_match_truth(cut.ids[m], cut.logprobs[m], truth[m], k, tol=1e-6)
    if fmt == "sglang":  # the bare input_top_logprobs list: the top k alone
        rows = from_sglang_input_logprobs(outs[0][0])
        assert rows.ids.shape == (len(seqs[0]) - 1, k)
        torch.testing.assert_close(rows.ids, unpack_rows(cut, attn)[0].ids)


def test_converters_refuse_malformed_outputs():
    with pytest.raises(ValueError, match="prompt_logprobs\\[0\\] must be None"):
        from_vllm_prompt_logprobs([{1: -0.1}, {2: -0.2}])
    with pytest.raises(TypeError, match="prompt_logprobs\\[1\\] must be a dict"):
        from_vllm_prompt_logprobs([None, None])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        from_vllm_prompt_logprobs([None])
    with pytest.raises(ValueError, match="prompt_logprobs: .*must be log-probabilities \\(<= 0\\).* is 0.5"):
        from_vllm_prompt_logprobs([None, {3: 0.5}])
    with pytest.raises(ValueError, match="row 0 .*sum to probability 1.72357 > 1.001"):
        from_vllm_prompt_logprobs([None, {3: -0.1, 4: -0.2}])
    with pytest.raises(TypeError, match="\\.logprob"):
        from_vllm_prompt_logprobs([None, {3: "x"}])
    with pytest.raises(ValueError, match="input_top_logprobs\\[0\\] must be None or empty"):
        from_sglang_input_logprobs([[(-0.1, 2, None)], [(-0.1, 2, None)]])
    with pytest.raises(TypeError, match="tuple"):
        from_sglang_input_logprobs([None, [-0.1]])
    with pytest.raises(ValueError, match="must give 2 rows"):
        ServedTopKTeacher(lambda s: [[None, {1: -0.1}] for _ in s])(torch.tensor([[2, 3, 4]]))
    with pytest.raises(ValueError, match="fmt must be one of"):
        ServedTopKTeacher(lambda s: s, "tgi")


# --------------------------------------------------------------------------- packing and the output check


def test_pack_and_unpack_are_inverse():
    g = torch.Generator().manual_seed(1)
    ids, attn = _batch(50)
    n = attn.sum(1).tolist()
    rows = []
    for b in range(3):
        r_ids = torch.stack([torch.randperm(50, generator=g)[:4] for _ in range(n[b] - 1)])
        r_ids[0, 3] = -1  # a padded entry
        rows.append((r_ids, torch.log_softmax(torch.randn(n[b] - 1, 50, generator=g), -1)[:, :4]))
    packed = pack_rows(rows, attn)
    assert packed.ids.shape == (3, 8, 4)
    back = unpack_rows(packed, attn)
    for (i, l), b in zip(rows, back):
        assert torch.equal(i, b.ids) and torch.equal(torch.where(i >= 0, l, 0), torch.where(i >= 0, b.logprobs, 0))
    # row b, position of its j-th attended token: sequence b's row j
    assert torch.equal(packed.ids[0, 2], rows[0][0][0])
    with pytest.raises(ValueError, match="sequence 1 has 9 attended tokens, so 8 rows"):
        pack_rows([rows[0], rows[0], rows[2]], attn)


def test_teacher_output_check_names_shapes():
    ids = torch.zeros(2, 5, dtype=torch.long)
    good = tk.TeacherTopK(torch.zeros(2, 4, 3, dtype=torch.long) - 1, torch.zeros(2, 4, 3))
    teacher_topk_output(good, ids)
    with pytest.raises(ValueError, match="\\[B, T-1, K\\] = \\[2, 4, K\\].*got \\(2, 5, 3\\)"):
        teacher_topk_output((torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, 3)), ids)
    with pytest.raises(TypeError, match="must return a TeacherTopK"):
        teacher_topk_output(torch.zeros(2, 4, 3), ids)
    with pytest.raises(ValueError, match="x: .*= 7, expected 0 <= id < 7"):
        check_topk_rows("x", torch.full((2, 4, 3), 7), torch.zeros(2, 4, 3), vocab_size=7)
    with pytest.raises(ValueError, match="distinct"):
        check_topk_rows("x", torch.tensor([[1, 1]]), torch.tensor([[-1.0, -2.0]]))
    with pytest.raises(TypeError, match="integer"):
        check_topk_rows("x", torch.tensor([[1.0]]), torch.tensor([[-1.0]]))


# ----------------------------------------------------------------------------------------- offline files


@pytest.mark.parametrize("suffix", [".safetensors", ".jsonl"])
def test_files_round_trip_and_feed_the_precomputed_teacher(tok, tmp_path, suffix):
    V = len(tok)
    _, model = opd_models(tok)
    ids, attn = _batch(V)
    source = HFTopKTeacher(model, 6, vocab_size=V)
    want = source(ids, attn)
    seqs, rows = sequences_of(ids, attn), unpack_rows(want, attn)
    path = tmp_path / f"teacher{suffix}"
    (write_topk_safetensors if suffix == ".safetensors" else write_topk_jsonl)(path, seqs, rows, vocab_size=V)
    table = read_topk_safetensors(path) if suffix == ".safetensors" else read_topk_jsonl(path)
    assert len(table) == 3 and table.k == 6 and table.vocab_size == V
    teacher = PrecomputedTopKTeacher.from_file(path)
    got = teacher(ids, attn)
    a = scored(attn)  # the rows a file holds; the other positions are padding
    assert torch.equal(got.ids[a], want.ids[a]) and bool((got.ids[~a] == -1).all())
    assert torch.equal(got.logprobs[a], want.logprobs[a])  # float32 values survive both formats exactly
    truth = model_logprobs64(model, ids, attn, V)
    _assert_rows_match_truth(got.ids[a], got.logprobs[a], truth[a], 6, tol=2e-5)
    # a batch in another order finds the same sequences
    flip = torch.flip(ids, [0]), torch.flip(attn, [0])
    assert torch.equal(teacher(*flip).ids, torch.flip(got.ids, [0]))
    with pytest.raises(KeyError, match="row 0: no precomputed rows for the sequence of 9 tokens"):
        teacher(torch.cat([ids[1:2, :-1], ids[1:2, :1]], 1), torch.ones(1, 9, dtype=torch.long))


def test_safetensors_reader_refuses_malformed_files(tmp_path):
    from safetensors.torch import save_file

    seqs = [[2, 3, 4], [5, 6]]
    rows = [(torch.tensor([[3, -1], [4, 9]]), torch.tensor([[-0.1, 0.0], [-0.5, -1.5]])),
            (torch.tensor([[6, 2]]), torch.tensor([[-0.2, -3.0]]))]
    good = write_topk_safetensors(tmp_path / "good.safetensors", seqs, rows)
    table = read_topk_safetensors(good)
    assert table.sequences == [(2, 3, 4), (5, 6)] and torch.equal(table.rows[0].ids, rows[0][0])
    base = {"input_ids": torch.tensor([2, 3, 4, 5, 6]), "offsets": torch.tensor([0, 3, 5]),
            "topk_ids": torch.tensor([[3, -1], [4, 9], [6, 2]]), "topk_logprobs": torch.tensor([[-0.1, 0.0],
                                                                                               [-0.5, -1.5],
                                                                                               [-0.2, -3.0]])}
    meta = {"format": "tipkernels.teacher_topk", "version": "1", "k": "2"}

    def bad(name, match, tensors=None, metadata=None):
        p = tmp_path / f"{name}.safetensors"
        save_file(dict(base, **(tensors or {})), str(p), metadata=dict(meta, **(metadata or {})))
        with pytest.raises(ValueError, match=match):
            read_topk_safetensors(p)

    bad("fmt", "not a tipkernels.teacher_topk file", metadata={"format": "other"})
    bad("ver", "version '2'", metadata={"version": "2"})
    bad("offsets", "offsets must start at 0", tensors={"offsets": torch.tensor([0, 3, 4])})
    bad("rows", "must both be \\[R, K\\] = \\[3, 2\\]", tensors={"topk_ids": torch.tensor([[3, -1], [4, 9]])})
    bad("dup", "distinct", tensors={"topk_ids": torch.tensor([[3, 3], [4, 9], [6, 2]])})
    bad("pos", "rows of sequence 0: .*\\(<= 0\\)", tensors={"topk_logprobs": torch.tensor([[0.1, 0.0], [-0.5, -1.5], [-0.2, -3.0]])})
    bad("vocab", "= 9, expected 0 <= id < 8", metadata={"vocab_size": "8"})
    with pytest.raises(ValueError, match="sequence 1 has 2 tokens, so its rows must be \\[1, K\\]"):
        write_topk_safetensors(tmp_path / "x.safetensors", seqs, [rows[0], rows[0]])
    with pytest.raises(ValueError, match="same tokens with different rows"):
        TopKTable.build([seqs[0], seqs[0]], [rows[0], (rows[0][0], rows[0][1] - 0.1)])


def test_jsonl_reader_refuses_malformed_lines(tmp_path):
    good = {"input_ids": [2, 3, 4], "topk_ids": [[3], [4, 9]], "topk_logprobs": [[-0.1], [-0.5, -math.inf]]}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n\n")
    table = read_topk_jsonl(p)
    assert table.k == 2 and table.rows[0].ids.tolist() == [[3, -1], [4, 9]]
    assert table.rows[0].logprobs[1, 1] == -math.inf

    def bad(rec, match, **kw):
        p.write_text(json.dumps(rec) + "\n")
        with pytest.raises(ValueError, match=match):
            read_topk_jsonl(p, **kw)

    bad(dict(good, topk_ids=[[3]]), "t.jsonl:1: topk_ids and topk_logprobs must be lists of 2 rows")
    bad(dict(good, topk_logprobs=[[-0.1], [-0.5]]), "row 1: topk_ids must be a list of ints")
    bad(dict(good, input_ids=[2, "3", 4]), "input_ids must be a list of ints")
    bad(dict(good, topk_logprobs=[[-0.1], [-0.5, float("nan")]]), "rows of sequence 0: .*has a NaN at \\[1, 1\\]")
    bad(good, "more than k=1", k=1)
    bad(dict(good, vocab_size=6), "= 9, expected 0 <= id < 6")
    bad(dict(good, vocab_size=4), "sequence 0 must hold ≥ 2 token ids in \\[0, 4\\)")
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="t.jsonl:1: not JSON"):
        read_topk_jsonl(p)
