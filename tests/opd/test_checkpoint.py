"""Crash-safe OPD checkpoints: a killed run resumes with no lost step and the same data order; partial or
corrupted checkpoints are refused with a clear message (or skipped by ``resume_from="latest"``); retention.

Tiny Hugging Face models built in code, CPU only.
"""

import hashlib
import json
import os
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

from tests._harness import BIG_MODEL as BIG, ROOT, SMALL_MODEL as SMALL

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
        assert ckpt.load_latest(trainer, out) == out / "checkpoint-1"
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
