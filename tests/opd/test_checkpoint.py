"""Crash-safe OPD checkpoints: a killed run resumes with no lost step and the same data order; partial or
corrupted checkpoints are refused with a clear message (or skipped by ``resume_from="latest"``); retention.

Tiny Hugging Face models built in code, CPU only.
"""

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from tipkernels.opd import OPDConfig, OPDTrainer
from tipkernels.opd import checkpoint as ckpt
from tipkernels.opd.checkpoint import CheckpointError
from tipkernels.opd.demo import build_model

from tests._harness import (BIG_MODEL as BIG, ROOT, SMALL_MODEL as SMALL, RunsCode, assert_payload_is_live,
                            plant_code_running_state, rehash, save_cli_inputs)

# 7 prompts, batch 3: epochs straddle steps, so the saved mid-epoch order matters
PROMPTS = ["3>", "5301>", "98>", "4417>", "271>", "6>", "05>"]
VOLATILE = ("step_time_s", "peak_mem_mb")  # wall-clock and RSS: the only fields allowed to differ


def models(tok, seed=0):
    return build_model(SMALL, len(tok), seed=seed), build_model(BIG, len(tok) + 3, seed=100)


def config(out, **kw):
    base = dict(rule="entropy_sample", ratio=0.5, max_new_tokens=5, batch_size=3, steps=5, lr=3e-3,
                warmup_steps=1, seed=0, output_dir=str(out), progress=False, plot=False, backend="torch",
                save_interval=1, keep_checkpoints=0)
    base.update(kw)
    return OPDConfig(**base)


def record_rollouts(trainer, log):
    """Wrap ``trainer.rollout`` to log (step, prompts, digest of the sampled token ids) of every rollout."""
    inner = trainer.rollout

    def rollout(prompts=None):
        if prompts is None:
            prompts = trainer._next_prompts(trainer.config.batch_size)
        roll = inner(prompts)
        log.append([trainer.step + 1, list(prompts), hashlib.sha256(roll.input_ids.numpy().tobytes()).hexdigest()])
        return roll

    trainer.rollout = rollout


def stable(history):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in history]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(model, want):
    got = dict(model.named_parameters())
    assert got.keys() == want.keys()
    for n, p in got.items():
        assert torch.equal(p, want[n]), n


@pytest.fixture(scope="module")
def straight(tok, tmp_path_factory):
    """The uninterrupted reference run: 5 steps, a checkpoint every step, retention 2."""
    out = tmp_path_factory.mktemp("straight")
    student, teacher = models(tok)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, keep_checkpoints=2))
    log = []
    record_rollouts(trainer, log)
    history = trainer.train()
    return {"out": out, "history": history, "params": params(student), "rollouts": log,
            "optimizer": trainer.optimizer.state_dict(), "teacher": teacher}


# ------------------------------------------------------------------------------ (a) a killed run resumes exactly


CHILD = textwrap.dedent("""
    import json, os, signal, sys, hashlib
    import torch
    from tipkernels.opd import OPDConfig, OPDTrainer, checkpoint
    from tipkernels.opd.demo import ModelSize, build_model, build_tokenizer

    out, where = sys.argv[1], sys.argv[2]
    cfg = OPDConfig(**json.loads(sys.argv[3]))
    tok = build_tokenizer()
    student = build_model(ModelSize(hidden=32, layers=1, heads=2, ffn=64), len(tok), seed=0)
    teacher = build_model(ModelSize(hidden=48, layers=2, heads=2, ffn=96), len(tok) + 3, seed=100)
    trainer = OPDTrainer(student, teacher, tok, json.loads(sys.argv[4]), cfg)
    log = open(os.path.join(out, "rollouts.jsonl"), "a")
    inner_rollout = trainer.rollout

    def rollout(prompts=None):
        if prompts is None:
            prompts = trainer._next_prompts(trainer.config.batch_size)
        roll = inner_rollout(prompts)
        log.write(json.dumps([trainer.step + 1, list(prompts),
                              hashlib.sha256(roll.input_ids.numpy().tobytes()).hexdigest()]) + "\\n")
        log.flush()
        if where == "step" and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of step 3, after its rollout
        return roll

    trainer.rollout = rollout
    real_save = torch.save

    def save(obj, f, *a, **k):
        if where == "save" and isinstance(obj, dict) and obj.get("step") == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # checkpoint-3 half-written: weights there, no state/manifest
        return real_save(obj, f, *a, **k)

    checkpoint.torch.save = save
    trainer.train()
    sys.exit(3)  # not reached
""")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["save", "step"])
def test_sigkilled_run_resumes_with_no_lost_step_and_the_same_data_order(tok, tmp_path, straight, where):
    out = tmp_path / "run"
    out.mkdir()
    cfg = config(out, keep_checkpoints=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-c", CHILD, str(out), where, json.dumps(cfg.to_dict()),
                          json.dumps(PROMPTS)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and "checkpoint-3" not in names, names
    partial = [n for n in names if n.startswith(".tmp-checkpoint-3-")]
    assert len(partial) == (1 if where == "save" else 0), names
    child_log = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    # the child saw exactly the reference's prompts and rollouts up to the kill (step 3's rollout included)
    assert child_log == straight["rollouts"][:len(child_log)] and child_log[-1][0] == 3

    # a fresh process's view: a differently initialised student, a perturbed global RNG
    student, _ = models(tok, seed=7)
    trainer = OPDTrainer(student, straight["teacher"], tok, PROMPTS, cfg)
    log = []
    record_rollouts(trainer, log)
    torch.manual_seed(12345)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.train(resume_from="latest")
    msgs = [str(w.message) for w in caught]
    if where == "save":
        assert any("partial checkpoint" in m and partial[0] in m for m in msgs), msgs

    assert trainer.step == 5 and [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert stable(history) == stable(straight["history"])  # every metric, bitwise (floats compared with ==)
    assert log == straight["rollouts"][2:]  # steps 3..5: same prompts, same sampled tokens
    assert_same_params(student, straight["params"])
    for a, b in zip(trainer.optimizer.state_dict()["state"].values(), straight["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert stable(lines) == stable(straight["history"])  # no lost or duplicated step in the log
    # retention and cleanup: the last two checkpoints, no leftover temporary directory
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt / a signal handler raising while a checkpoint is half-written."""


@pytest.mark.slow
def test_interrupted_save_leaves_previous_checkpoints_and_resumes_exactly(tok, tmp_path, straight, monkeypatch):
    out = tmp_path / "run"
    cfg = config(out, keep_checkpoints=1)
    student, teacher = models(tok)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, cfg)
    real_save = student.save_pretrained

    def save_pretrained(path, **kw):
        real_save(path, **kw)
        if trainer.step == 3:
            raise Interrupted  # weights written, trainer_state.pt and manifest not yet

    monkeypatch.setattr(student, "save_pretrained", save_pretrained)
    with pytest.raises(Interrupted):
        trainer.train()
    # retention runs only after a checkpoint is complete: checkpoint-2 survives, the half-written one is gone
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    monkeypatch.undo()

    student2, _ = models(tok, seed=3)
    resumed = OPDTrainer(student2, teacher, tok, PROMPTS, cfg)
    history = resumed.train(resume_from="latest")
    assert stable(history) == stable(straight["history"])
    assert_same_params(student2, straight["params"])
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-5"]


# ------------------------------------------------------------------ (b) partial or corrupted checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    student, teacher = models(tok)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, steps=2))
    trainer.train()
    assert ckpt.verify(out / "checkpoint-2")["step"] == 2
    return out, teacher


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _flip(p, where=0.6):
    data = bytearray(p.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    p.write_bytes(bytes(data))


def _unreadable_but_listed(ck):
    """The tensor file was already bad when hashed: sizes and digests match, the content does not parse."""
    st = ck / "student" / "model.safetensors"
    st.write_bytes(b"\x00" * 8 + b"not a safetensors header")
    m = json.loads((ck / "manifest.json").read_text())
    m["files"]["student/model.safetensors"] = {"size": st.stat().st_size,
                                               "sha256": hashlib.sha256(st.read_bytes()).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "truncated safetensors": (lambda ck: _truncate(ck / "student" / "model.safetensors"),
                              r"student/model\.safetensors has \d+ bytes, manifest\.json records \d+"),
    "flipped byte in safetensors": (lambda ck: _flip(ck / "student" / "model.safetensors"),
                                    r"student/model\.safetensors is corrupted: SHA-256"),
    "flipped byte in trainer_state.pt": (lambda ck: _flip(ck / "trainer_state.pt", 0.3),
                                         r"trainer_state\.pt is corrupted: SHA-256"),
    "missing trainer_state.pt": (lambda ck: (ck / "trainer_state.pt").unlink(),
                                 r"trainer_state\.pt is missing"),
    "missing manifest": (lambda ck: (ck / "manifest.json").unlink(),
                         r"partial: manifest\.json is missing"),
    "garbled manifest": (lambda ck: (ck / "manifest.json").write_text('{"format": "tipkern'),
                         r"manifest\.json is unreadable"),
    "unreadable tensors": (_unreadable_but_listed, r"student/model\.safetensors holds unreadable tensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_by_name_and_skipped_by_latest(tok, tmp_path, two_checkpoints, damage):
    src, teacher = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ck = out / "checkpoint-2"
    hurt, pattern = DAMAGE[damage]
    hurt(ck)

    student, _ = models(tok, seed=5)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, steps=2))
    before = params(student)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=pattern) as e:
        trainer.load_checkpoint(ck)
    assert isinstance(e.value, ValueError) and str(ck) in str(e.value)
    # nothing was loaded: weights, step, history, RNG are as before
    assert trainer.step == 0 and trainer.history == [] and torch.equal(torch.get_rng_state(), rng)
    assert_same_params(student, before)

    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*checkpoint-2: .*{pattern}"):
        assert trainer.latest_checkpoint() == out / "checkpoint-1"
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*checkpoint-2"):
        assert trainer.load_checkpoint("latest") == out / "checkpoint-1"
    assert trainer.step == 1 and len(trainer.history) == 1


@pytest.mark.slow
def test_no_complete_checkpoint_and_not_a_checkpoint(tok, tmp_path, two_checkpoints):
    src, teacher = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for n in (1, 2):
        (out / f"checkpoint-{n}" / "manifest.json").unlink()
    student, _ = models(tok)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, steps=2))
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        with pytest.raises(FileNotFoundError, match=r"no complete checkpoint.*checkpoint-2, checkpoint-1"):
            trainer.train(resume_from="latest")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.load_checkpoint(tmp_path / "nowhere")
    # a copy renamed to another step's name is refused too
    shutil.copytree(src / "checkpoint-1", out / "checkpoint-7")
    with pytest.raises(CheckpointError, match="its name says step 7 but manifest.json says step 1"):
        trainer.load_checkpoint(out / "checkpoint-7")


# ------------------------------------------------------------------------------------------- (c) retention


def _fake(out, step):
    def fill(tmp):
        (tmp / "student").mkdir()
        (tmp / "student" / "model.safetensors").write_bytes(b"w%d" % step)
        (tmp / "trainer_state.pt").write_bytes(b"s%d" % step)

    return ckpt.write_atomic(out / f"checkpoint-{step}", step, fill)


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_retention_keeps_the_last_k_complete_checkpoints(tmp_path, keep):
    out = tmp_path / "run"
    for step in range(1, 7):
        _fake(out, step)
        deleted = ckpt.prune(out, keep, step)
        left = sorted(s for s, _ in ckpt.candidates(out))
        want = list(range(1, step + 1)) if keep == 0 else list(range(max(1, step - keep + 1), step + 1))
        assert left == want, (step, deleted)
    assert not ckpt.partial_writes(out)
    for s, p in ckpt.candidates(out):
        assert ckpt.verify(p)["step"] == s


def test_retention_never_counts_partial_ones_and_spares_later_steps(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2, 3, 9):
        _fake(out, step)
    (out / "checkpoint-3" / "manifest.json").unlink()  # partial: not one of the kept
    stale = out / ".tmp-checkpoint-4-deadbeef0000"  # a save killed before its rename
    stale.mkdir()
    (stale / "trainer_state.pt").write_bytes(b"half")
    _fake(out, 4)
    ckpt.prune(out, 2, 4)
    # keeps 4 and the newest complete one before it (2); 3 (partial), 1 and the stale write go; 9 is left alone
    assert sorted(s for s, _ in ckpt.candidates(out)) == [2, 4, 9]
    assert not stale.exists()


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    out = tmp_path / "run"
    _fake(out, 1)
    (out / "checkpoint-1" / "stray.txt").write_text("from an older run")
    (out / "checkpoint-1" / "manifest.json").unlink()
    _fake(out, 1)
    assert not (out / "checkpoint-1" / "stray.txt").exists() and ckpt.verify(out / "checkpoint-1")["step"] == 1
    assert [p.name for p in out.iterdir()] == ["checkpoint-1"]


@pytest.mark.slow
def test_straight_run_keeps_two_checkpoints_by_default(straight):
    assert OPDConfig().keep_checkpoints == 2
    names = sorted(p.name for p in straight["out"].iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-4", "checkpoint-5"]
    m = ckpt.verify(straight["out"] / "checkpoint-5")
    assert m["format_version"] == ckpt.FORMAT_VERSION and m["step"] == 5
    assert {"trainer_state.pt", "student/model.safetensors", "student/config.json"} <= set(m["files"])
    with pytest.raises(ValueError, match="keep_checkpoints"):
        OPDConfig(keep_checkpoints=-1)


# ------------------------------------------------------------------- (d) resuming never executes checkpoint code


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_state_file_that_would_run_code_is_refused_on_resume(tok, tmp_path, two_checkpoints, how):
    src, teacher = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ck = out / "checkpoint-2"
    marker = tmp_path / "pwned"
    st = plant_code_running_state(ck, marker, how)

    student, _ = models(tok, seed=5)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, steps=2))
    before = params(student)
    rng = torch.get_rng_state()
    refused = r"checkpoint-2: trainer_state\.pt is refused: it is not a plain tensor file"
    with pytest.raises(CheckpointError, match=refused) as e:
        trainer.load_checkpoint(ck)
    assert str(ck) in str(e.value) and "nothing in it was executed" in str(e.value)
    assert not marker.exists()
    assert trainer.step == 0 and trainer.history == [] and torch.equal(torch.get_rng_state(), rng)
    assert_same_params(student, before)
    with pytest.raises(CheckpointError, match=refused):  # the storage reader on its own
        ckpt.read(ck)
    assert not marker.exists()

    # resume_from="latest" skips it with a warning naming the file and resumes the one before
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*{refused}"):
        assert trainer.load_checkpoint("latest") == out / "checkpoint-1"
    assert trainer.step == 1 and not marker.exists()
    assert_payload_is_live(st, marker)


def test_cli_resume_refuses_a_state_file_that_would_run_code(tok, tmp_path, two_checkpoints, capsys):
    from tipkernels.opd.cli import main as cli_main

    src, teacher = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    marker = tmp_path / "pwned"
    plant_code_running_state(out / "checkpoint-2", marker)
    s_dir, t_dir, prompts = save_cli_inputs(tmp_path, tok, models(tok)[0], teacher, PROMPTS)
    capsys.readouterr()
    assert cli_main(["opd", "--student", str(s_dir), "--teacher", str(t_dir), "--prompts", str(prompts),
                     "--steps", "3", "--batch-size", "3", "--max-new-tokens", "5", "--output-dir", str(out),
                     "--no-progress", "--device", "cpu", "--backend", "torch",
                     "--resume", str(out / "checkpoint-2")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2: trainer_state.pt is refused" in err and not marker.exists()


def v1_state(trainer):
    """What format 1 pickled as trainer_state.pt (its trainer_state(), copied): tuples and a NumPy array."""
    import numpy as np

    return {"step": trainer.step, "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "history": trainer.history,
            "eval_history": trainer.eval_history, "config": trainer.config.to_dict(),
            "prompt_rng": trainer._prompt_rng.getstate(), "prompt_order": list(trainer._order),
            "num_prompts": len(trainer.prompts), "selection_rng": trainer._selection_gen.get_state(),
            "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(), "cuda_rng": None,
            "numpy_rng": np.random.get_state()}


def make_v1(ck, state):
    """Turn the checkpoint ``ck`` into a format-1 one holding ``state`` (a full pickle) with a matching manifest."""
    (ck / "trainer_state.json").unlink()
    torch.save(state, ck / "trainer_state.pt")
    m = json.loads((ck / "manifest.json").read_text())
    del m["files"]["trainer_state.json"]
    m["format_version"] = 1
    (ck / "manifest.json").write_text(json.dumps(m))
    rehash(ck, "trainer_state.pt")


def test_legacy_pickle_checkpoint_is_refused_then_converted_and_resumed_exactly(tok, tmp_path, two_checkpoints):
    src, teacher = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    new, old = out / "checkpoint-2", tmp_path / "legacy" / "checkpoint-2"
    shutil.copytree(new, old)
    student, _ = models(tok, seed=5)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, steps=3))
    trainer.load_checkpoint(new)
    make_v1(old, v1_state(trainer))
    want = trainer.train()  # the reference: step 3 from the format-2 checkpoint

    student2, _ = models(tok, seed=6)
    resumed = OPDTrainer(student2, teacher, tok, PROMPTS, config(tmp_path / "legacy", steps=3))
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt is in the legacy format .*format_version 1.*"
                                              r"full pickle.*convert_legacy") as e:
        resumed.load_checkpoint(old)
    assert str(old) in str(e.value) and ckpt.convert_command(old) in str(e.value)
    assert resumed.step == 0
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*legacy format"):
        with pytest.raises(FileNotFoundError, match=r"no complete checkpoint.*legacy format.*convert_legacy"):
            resumed.load_checkpoint("latest")

    assert ckpt.convert_legacy(old) == old  # the documented one-liner's call, on a trusted file
    m = ckpt.verify(old)
    assert m["format_version"] == ckpt.FORMAT_VERSION == 2
    assert {"trainer_state.json", "trainer_state.pt"} <= set(m["files"])
    torch.manual_seed(4321)
    assert resumed.load_checkpoint(old) == old
    got = resumed.train()
    assert stable(got) == stable(want)
    assert_same_params(student2, params(student))


def test_legacy_checkpoint_with_a_code_running_pickle_is_refused_before_reading(tok, tmp_path, two_checkpoints):
    src, teacher = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ck = out / "checkpoint-2"
    marker = tmp_path / "pwned"
    make_v1(ck, {"step": 2, "optimizer": RunsCode(marker)})
    student, _ = models(tok, seed=5)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(out, steps=2))
    with pytest.raises(CheckpointError, match=r"checkpoint-2: trainer_state\.pt is in the legacy format"):
        trainer.load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="legacy format"):
        ckpt.read(ck)
    assert not marker.exists() and trainer.step == 0
    assert_payload_is_live(ck / "trainer_state.pt", marker)


def test_state_is_json_plus_a_weights_only_tensor_file(straight, tmp_path):
    ck = straight["out"] / "checkpoint-5"
    plain = json.loads((ck / "trainer_state.json").read_text())
    assert plain["step"] == 5
    assert {"step", "scheduler", "history", "eval_history", "config", "num_prompts", "prompt_order",
            "prompt_rng", "world_size", "parallel"} <= set(plain["entries"])
    assert stable(plain["entries"]["history"]) == stable(straight["history"])
    assert plain["entries"]["config"]["rule"] == "entropy_sample"
    tensors = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert tensors["step"] == 5 and set(tensors["entries"]) == {"optimizer", "rng"}
    (rank0,) = tensors["entries"]["rng"]
    assert isinstance(rank0["python"], list) and isinstance(rank0["numpy"], list)
    assert rank0["torch"].dtype == torch.uint8 and rank0["selection"].dtype == torch.uint8
    # a state the weights-only reader would refuse is refused when written
    with pytest.raises(TypeError, match=r"state\['bad'\].*RunsCode"):
        ckpt.write_state(tmp_path, 5, {"bad": [RunsCode("/nonexistent")], "ok": 1})
    assert not any(tmp_path.iterdir())


def test_state_dict_round_trip_continues_identically(tok, tmp_path):
    cfg = config(tmp_path / "a", steps=3, save_interval=0, save_final=False)
    student, teacher = models(tok)
    a = OPDTrainer(student, teacher, tok, PROMPTS, cfg)
    a.train_step()
    state = copy.deepcopy(a.state_dict())  # like torch's, it references the live optimizer tensors
    weights = params(student)
    want = a.train_step()  # b restores the global RNG to where a drew its second step from

    student2, _ = models(tok, seed=8)
    b = OPDTrainer(student2, teacher, tok, PROMPTS, config(tmp_path / "b", steps=3, save_interval=0,
                                                           save_final=False))
    with torch.no_grad():
        for n, p in student2.named_parameters():
            p.copy_(weights[n])
    bad = dict(state, prompt_order=[99])
    with pytest.raises(ValueError, match="prompt order indexes past"):
        b.load_state_dict(bad)
    assert b.step == 0
    b.load_state_dict(state)
    assert b.step == 1
    got = b.train_step()
    assert {k: v for k, v in got.items() if k not in VOLATILE} == {k: v for k, v in want.items() if k not in VOLATILE}
    assert_same_params(student2, params(student))
