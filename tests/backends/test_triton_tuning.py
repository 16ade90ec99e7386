"""Tuned Triton configs: the table lookup of ``tipkernels.backends.triton`` and the search of
``benchmarks/tune_triton.py`` (interpreted on the CPU at a tiny shape; on a GPU the same code runs compiled)."""

from __future__ import annotations

import json

import pytest
import torch

import tipkernels as tk
from tests._harness import DEVICE, build_problem, triton_backend as trb
from tipkernels.backends.triton import config as trc


def _prob(dtype=torch.float32, n=6, v=40, d=24):
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    ht, wt = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    hs, ws, ht, wt = (t.to(DEVICE, dtype) for t in (hs, ws, ht, wt))
    return build_problem(hs, ws, ht, wt)[0]


def _table(tmp_path, entries, name="tuned.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"entries": entries}))
    return str(path)


def _entry(**kw):
    e = {"device": trc.device_key(DEVICE), "dtype": "fp32", "d_min": 16, "d_max": 32, "v_min": 32, "v_max": 64,
         "config": {"block_n": 32, "block_d": 32}}
    e.update(kw)
    return e


def test_the_packaged_table_is_valid_and_consulted_last(monkeypatch, tmp_path):
    monkeypatch.delenv(trc.TUNED_CONFIGS_ENV, raising=False)
    assert trc.tuned_tables() == [trc.PACKAGED_TUNED_CONFIGS]
    with open(trc.PACKAGED_TUNED_CONFIGS) as f:
        table = json.load(f)
    assert isinstance(table["entries"], list)
    a, b = _table(tmp_path, [], "a.json"), _table(tmp_path, [], "b.json")
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, a + ":" + b)
    assert trc.tuned_tables() == [a, b, trc.PACKAGED_TUNED_CONFIGS]


def test_a_matching_entry_overrides_the_defaults_and_a_call_config_overrides_it(monkeypatch, tmp_path):
    prob = _prob()
    default = trc.resolve(prob, None)
    assert default["block_n"] == 64 and default["block_d"] == 16 and default["bwd_block_d"] == 32
    other = _entry(dtype="bf16", config={"block_n": 16})  # same shape, other dtype: never matches fp32
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, _table(tmp_path, [other, _entry(), _entry(config={"block_n": 16})]))
    cfg = trc.resolve(prob, None)
    assert cfg["block_n"] == 32  # the first matching entry wins
    assert cfg["block_d"] == 32 and cfg["bwd_block_d"] == 32  # block_d without its bwd_ twin sets both
    assert cfg["block_v"] == default["block_v"]
    assert trc.resolve(prob, {"block_n": 128})["block_n"] == 128
    # outside the ranges (vocabulary, hidden size) the defaults stay
    assert trc.resolve(_prob(v=80), None)["block_n"] == 64
    assert trc.resolve(_prob(d=48), None)["block_n"] == 64


def test_results_with_a_tuned_entry_match_the_reference(monkeypatch, tmp_path):
    prob = _prob(n=20, v=40, d=24)
    entry = _entry(config={"block_n": 16, "block_v": 16, "block_d": 16, "bwd_block_v": 16, "block_dh": 16})
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, _table(tmp_path, [entry]))
    assert trc.resolve(prob, None)["block_v"] == 16
    hs = prob.student_hidden.double().requires_grad_(True)
    want = tk.token_stats(hs, prob.student_weight.double(), prob.teacher_hidden.double(),
                          prob.teacher_weight.double(), backend="reference")
    got = tk.token_stats(prob.student_hidden, prob.student_weight, prob.teacher_hidden, prob.teacher_weight,
                         backend="triton")
    for name in ("student_lse", "teacher_lse", "entropy", "reverse_kl", "forward_kl"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=0, atol=5e-5, msg=name)
    h = prob.student_hidden.clone().requires_grad_(True)
    tk.fused_linear_divergence(h, prob.student_weight, prob.teacher_hidden, prob.teacher_weight,
                               reduction="sum", backend="triton").backward()
    tk.fused_linear_divergence(hs, prob.student_weight.double(), prob.teacher_hidden.double(),
                               prob.teacher_weight.double(), reduction="sum", backend="reference").backward()
    torch.testing.assert_close(h.grad.double(), hs.grad, rtol=0, atol=5e-5)


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot read it"),
    ('{"entries": {}}', "list 'entries'"),
    ('{"entries": [{"device": "cpu"}]}', "entry 0: expected the keys"),
])
def test_a_malformed_table_is_a_clear_error(monkeypatch, tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, str(path))
    with pytest.raises(ValueError, match=match) as err:
        trc.resolve(_prob(), None)
    assert "bad.json" in str(err.value)


def test_missing_table_and_unknown_keys_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, str(tmp_path / "nowhere.json"))
    with pytest.raises(ValueError, match="nowhere.json.*does not exist"):
        trc.resolve(_prob(), None)
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, _table(tmp_path, [_entry(config={"blok_n": 32})], "unknown_key.json"))
    with pytest.raises(KeyError, match="unknown tuned config keys.*blok_n"):
        trc.resolve(_prob(), None)
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, _table(tmp_path, [_entry(config={"block_n": 48})], "bad_block.json"))
    with pytest.raises(ValueError, match="block_n=48"):
        trc.resolve(_prob(), None)


# ------------------------------------------------------------------------------------------------ the search


@pytest.mark.slow
def test_the_search_keeps_the_start_when_nothing_is_faster_and_rejects_wrong_candidates(monkeypatch, tmp_path):
    from benchmarks import tune_triton as tt

    monkeypatch.delenv(trc.TUNED_CONFIGS_ENV, raising=False)
    real = trb.forward_stats
    strategies = set()

    def corrupt_when_block_v_is_16(prob, *, config=None):
        strategies.add(config["strategy"])
        out = real(prob, config=config)
        if config and config["block_v"] == 16:
            out["reverse_kl"] = out["reverse_kl"] + 0.1
        return out

    monkeypatch.setattr(trb, "forward_stats", corrupt_when_block_v_is_16)
    # a fake clock: time = the product of the factors a config matches; block_n=16 halves it, block_v=16 is
    # faster still but wrong, bwd_block_v=16 doubles it
    speed = {("block_n", 16): 0.5, ("block_v", 16): 0.2, ("bwd_block_v", 16): 2.0}

    def fake_timeit(fn, *, device, warmup, repeats):
        fn()
        t = 1.0
        for (k, v), f in speed.items():
            t *= f if fake_timeit.cfg.get(k) == v else 1.0
        return t

    real_measure = tt.measure

    def measure(p, cfg, device, repeats):
        fake_timeit.cfg = cfg
        return real_measure(p, cfg, device, repeats)

    monkeypatch.setattr(tt, "timeit", fake_timeit)
    monkeypatch.setattr(tt, "measure", measure)
    res = tt.tune(n=40, v=48, d_s=16, d_t=16, dtype=torch.float32, device=DEVICE, space="quick", sweeps=1,
                  repeats=1, log=lambda _msg: None)
    outcomes = {(r["p"], r["change"]): r["outcome"] for r in res["rows"]}
    assert outcomes[("forward", "block_n=16")] == "kept"
    assert outcomes[("forward", "block_v=16")].startswith("wrong (error")
    assert outcomes[("backward", "bwd_block_v=16")] == "slower"
    assert res["best"]["block_n"] == 16 and res["best"]["block_v"] == res["start"]["block_v"]
    assert res["best"]["bwd_block_v"] == res["start"]["bwd_block_v"]
    assert res["passes"]["forward"] == pytest.approx({"start": 1.0, "best": 0.5, "start_err": res["rows"][0]["err"]})
    assert strategies == {"fused"}  # what is tuned is the fused kernels' config, whatever "auto" would pick
    assert res["best"]["strategy"] == res["start"]["strategy"] == "auto"  # the entry keeps the start's choice


@pytest.mark.slow
def test_the_command_writes_a_table_the_backend_reads(monkeypatch, tmp_path):
    from benchmarks import tune_triton as tt

    monkeypatch.delenv(trc.TUNED_CONFIGS_ENV, raising=False)
    out = tmp_path / "t.json"
    old = _entry(device="elsewhere")
    out.write_text(json.dumps({"entries": [old]}))
    argv = ["--device", DEVICE.type, "--quick", "--out", str(out), "--merge", "--v-range", "32,64"]
    assert tt.main(argv) == 0
    assert tt.main(argv) == 0  # the same device, dtype and ranges: replaced, not added
    entries = json.loads(out.read_text())["entries"]
    assert len(entries) == 2 and entries[1] == old
    new = entries[0]
    assert (new["device"], new["dtype"], new["d_min"], new["d_max"], new["v_min"], new["v_max"]) == \
        (trc.device_key(DEVICE), "fp32", 16, 64, 32, 64)
    assert set(new["config"]) == set(trc.default_config(_prob()))
    assert new["measured"]["forward"]["tuned_ms"] <= new["measured"]["forward"]["start_ms"]
    notes = (tmp_path / "t.md").read_text()
    assert "| forward | start |" in notes and "block_n=16" in notes
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, str(out))
    assert trc.tuned_config(_prob(v=48, d=32)) == new["config"]


@pytest.mark.parametrize("over, err, match", [
    ({"blok_n": 32}, KeyError, "unknown triton config keys.*blok_n"),
    ({"block_v": 24}, ValueError, "block_v=24: must be a power of two"),
    ({"bwd_block_d": 8}, ValueError, "bwd_block_d=8"),
    ({"bwd_strategy": "atomics"}, ValueError, "bwd_strategy='atomics'"),
    ({"bwd_chunk_mib": 0}, ValueError, "bwd_chunk_mib=0"),
    ({"bwd_chunk_mib": "64"}, ValueError, "bwd_chunk_mib='64'"),
])
def test_a_bad_call_config_is_a_clear_error(monkeypatch, over, err, match):
    monkeypatch.delenv(trc.TUNED_CONFIGS_ENV, raising=False)
    with pytest.raises(err, match=match):
        trc.resolve(_prob(), over)


def test_set_options_triton_config_is_validated_and_applied_over_the_tables(monkeypatch, tmp_path):
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, _table(tmp_path, [_entry(config={"block_n": 32, "block_v": 16})]))
    prob = _prob()
    with tk.set_options(triton_config={"block_n": 16, "bwd_strategy": "tiles"}):
        cfg = trc.resolve(prob)
        assert cfg["block_n"] == 16 and cfg["bwd_strategy"] == "tiles"  # over the tuned entry
        assert cfg["block_v"] == 16  # the tuned entry's other keys still apply
        assert trc.resolve(prob, {"block_n": 64})["block_n"] == 64  # a call's config wins
    assert trc.resolve(prob)["block_n"] == 32  # restored on exit
    with pytest.raises(KeyError, match="unknown tk.set_options triton_config keys.*blok_n"):
        tk.set_options(triton_config={"blok_n": 16})
    with pytest.raises(ValueError, match="block_v=24: must be a power of two"):
        tk.set_options(triton_config={"block_v": 24})
    with pytest.raises(TypeError, match="triton_config must be a dict"):
        tk.set_options(triton_config=[("block_n", 16)])


def test_tables_are_read_once_and_a_call_resolves_its_config_once(monkeypatch, tmp_path):
    path = _table(tmp_path, [_entry(config={"block_n": 16})], "once.json")
    monkeypatch.setenv(trc.TUNED_CONFIGS_ENV, path)
    assert trc.resolve(_prob())["block_n"] == 16
    import os

    os.remove(path)  # cached: no filesystem access after the first lookup
    assert trc.resolve(_prob())["block_n"] == 16
    trc.reload_tuned_configs()
    with pytest.raises(ValueError, match="once.json.*does not exist"):
        trc.resolve(_prob())
    monkeypatch.delenv(trc.TUNED_CONFIGS_ENV)
    calls = []
    real = trc.resolve
    monkeypatch.setattr(trc, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(5, 24, generator=g, device=DEVICE, requires_grad=True)
    ws, wt = (torch.randn(40, 24, generator=g, device=DEVICE) / 5 for _ in range(2))
    ht = torch.randn(5, 24, generator=g, device=DEVICE)
    tk.fused_linear_divergence(hs, ws, ht, wt, divergence="jsd", reduction="sum", backend="triton").backward()
    assert len(calls) == 1  # forward stats, the JSD pass and the backward share one resolution


@pytest.mark.slow
def test_screen_skips_candidates_that_spill(monkeypatch):
    """The tuner's compile screening (``--screen``): a candidate whose sm_90 kernels spill at the shape is found
    before any timing (a 128 x 128 forward tile spills in the statistics kernel), one that compiles cleanly is not
    (a 64-wide hidden chunk in the reverse-KL dS kernel). Compiles in a subprocess, as on a GPU machine."""
    from benchmarks import tune_triton as tt

    monkeypatch.setitem(tt.SPACES, "screen-test", ({"block_v": [64, 128]}, {"bwd_block_d": [64]}))
    z = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)  # noqa: E731
    prob, _ = build_problem(z(64, 4096), z(1000, 4096), z(64, 4096), z(1000, 4096))
    start = trc.resolve(prob)
    assert start["block_v"] == 64 and start["bwd_block_d"] == 32
    bad = tt.screen_candidates(64, 1000, 4096, 4096, torch.bfloat16, start, "screen-test", log=lambda m: None)
    assert set(bad) == {("block_v", 128)}, bad
    assert "stats_kernel" in bad["block_v", 128][0] and "spills" in bad["block_v", 128][0]
