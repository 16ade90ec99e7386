"""Data-parallel OPD on CPU with gloo and 2 processes (``OPDConfig.parallel = "ddp" | "fsdp"``).

* 2 ranks with 2 sequences each give the loss, the gradients and the parameters after one AdamW step of 1 process
  on the 4 sequences (fixed rollouts, ``soft_or`` with the global selection statistics), under DDP and FSDP2.
* A 2-step run writes one checkpoint, from rank 0 only, and a fresh trainer resumes from it and replays step 3
  exactly as the uninterrupted run does (per-rank rollouts and RNG streams restored); checkpoints move freely
  between 1 process, DDP and FSDP2 (the format is the single-process one, with full weights and optimizer state).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tipkernels.opd import OPDTrainer
from tipkernels.opd.process import ProcessContext
from tipkernels.opd.rollout import Rollouts, generate

from tests._harness import (PROMPTS, assert_payload_is_live, opd_config as config, opd_models as models,
                            plant_code_running_state)
from tests.spawn_helpers import free_port, spawn

pytestmark = pytest.mark.slow  # spawned process groups training models

WORLD = 2
MODES = ("ddp", "fsdp")


def _tok():
    from tipkernels.opd.demo import build_tokenizer

    return build_tokenizer()


def _cfg(tmp: Path, name: str, **kw):
    base = dict(rule="soft_or", ratio=0.5, batch_size=4, lr=1e-3, warmup_steps=0, schedule="constant")
    base.update(kw)
    return config(tmp / name, **base)


def _rows(roll: Rollouts, lo: int, hi: int) -> Rollouts:
    return Rollouts(roll.input_ids[lo:hi], roll.attention_mask[lo:hi], roll.response_mask[lo:hi], roll.prompt_width)


def _full_params(trainer, mode):
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(trainer.student, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in sd.items()}
    return {n: p.detach().clone() for n, p in trainer.student.named_parameters()}


def _full_grads(trainer):
    out = {}
    for n, p in trainer.student.named_parameters():
        g = p.grad
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


# --------------------------------------------------------------------------------- 2 processes == 1 process


def _my_rollouts(tmp: Path, rank: int):
    """This rank's contiguous share of the rollouts the test saved in ``tmp``: ``(rows per rank, Rollouts)``."""
    roll = torch.load(tmp / "rollouts.pt", weights_only=False)
    per = roll.input_ids.shape[0] // WORLD
    return per, _rows(roll, rank * per, (rank + 1) * per)


def _equality_worker(rank: int, port: int, tmp: str):
    _init(rank, port)
    try:
        tmp = Path(tmp)
        tok = _tok()
        per, mine = _my_rollouts(tmp, rank)
        for mode in MODES:
            student, teacher = models(tok)
            trainer = OPDTrainer(student, teacher, tok, PROMPTS,
                                 _cfg(tmp, f"{mode}-{rank}", batch_size=per, parallel=mode))
            rec = trainer.train_step([mine])
            grads, params = _full_grads(trainer), _full_params(trainer, mode)
            if rank == 0:
                torch.save({"rec": rec, "grads": grads, "params": params}, tmp / f"{mode}.pt")
            del trainer, student
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    tok = _tok()
    student, teacher = models(tok)
    torch.manual_seed(3)
    roll = generate(student, tok, PROMPTS[:4], max_new_tokens=6, temperature=1.0)
    # the halves have different token counts, so the ranks select different numbers of tokens: plain averaging
    # of per-rank means would differ from the global mean
    lengths = roll.response_lengths.tolist()
    assert sum(lengths[:2]) != sum(lengths[2:]), lengths
    torch.save(roll, tmp_path / "rollouts.pt")

    trainer = OPDTrainer(student, teacher, tok, PROMPTS, _cfg(tmp_path, "single"))
    want_rec = trainer.train_step([roll])
    want_grads, want_params = _full_grads(trainer), _full_params(trainer, "none")

    spawn(_equality_worker, (free_port(), str(tmp_path)), nprocs=WORLD)
    for mode in MODES:
        got = torch.load(tmp_path / f"{mode}.pt", weights_only=False)
        rec = got["rec"]
        assert abs(rec["loss"] - want_rec["loss"]) < 1e-6, (mode, rec["loss"], want_rec["loss"])
        for k in ("valid_tokens", "selected_tokens"):
            assert rec[k] == want_rec[k], (mode, k)
        assert abs(rec["grad_norm"] - want_rec["grad_norm"]) < 1e-6
        assert set(got["params"]) == set(want_params)
        for n, g in want_grads.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=0, atol=1e-6, msg=f"{mode} grad {n}")
        for n, p in want_params.items():
            torch.testing.assert_close(got["params"][n], p, rtol=0, atol=1e-6, msg=f"{mode} param {n}")


# ------------------------------------------------------------------------------------ the sharded teacher


def _teacher_worker(rank: int, port: int, tmp: str):
    _init(rank, port)
    try:
        from torch.distributed.tensor import DTensor

        tmp = Path(tmp)
        tok = _tok()
        per, mine = _my_rollouts(tmp, rank)
        out = {}
        for mode in MODES:
            for tp in ("replicate", "fsdp"):
                student, teacher = models(tok)
                numel = sum(p.numel() for p in teacher.parameters())
                trainer = OPDTrainer(student, teacher, tok, PROMPTS,
                                     _cfg(tmp, f"{mode}-{tp}-{rank}", batch_size=per, parallel=mode,
                                          teacher_parallel=tp))
                recs = [trainer.train_step([mine]) for _ in range(3)]
                local = [p.to_local() if isinstance(p, DTensor) else p for p in teacher.parameters()]
                out[(mode, tp)] = {
                    "recs": recs, "params": _full_params(trainer, mode),
                    # after the steps: every teacher parameter is a shard again (gathered per unit, then freed)
                    "all_dtensor": all(isinstance(p, DTensor) for p in teacher.parameters()),
                    "local_fraction": sum(t.numel() for t in local) / numel,
                    "requires_grad": any(p.requires_grad for p in teacher.parameters()),
                }
                del trainer, student, teacher
        torch.save(out, tmp / f"teacher-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_teacher_gives_the_replicated_teachers_losses(tmp_path):
    """teacher_parallel="fsdp": each rank holds half the teacher; 3 steps' losses, selections, gradient norms and
    the student's weights are those of the replicated teacher, under DDP and FSDP2 students."""
    tok = _tok()
    student, _ = models(tok)
    torch.manual_seed(3)
    roll = generate(student, tok, PROMPTS[:4], max_new_tokens=6, temperature=1.0)
    torch.save(roll, tmp_path / "rollouts.pt")
    spawn(_teacher_worker, (free_port(), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"teacher-{rank}.pt", weights_only=False)
        for mode in MODES:
            rep, sh = got[(mode, "replicate")], got[(mode, "fsdp")]
            assert not rep["all_dtensor"] and rep["local_fraction"] == 1.0
            assert sh["all_dtensor"] and not sh["requires_grad"]
            assert 0.45 < sh["local_fraction"] <= 0.55, sh["local_fraction"]  # 1/P of the teacher per rank
            assert len(sh["recs"]) == 3
            for a, b in zip(rep["recs"], sh["recs"]):
                assert a["loss"] > 0
                assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (mode, a["loss"], b["loss"])
                for k in ("valid_tokens", "selected_tokens", "reverse_kl"):
                    assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (mode, k, a[k], b[k])
                assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"]
            for n, p in rep["params"].items():
                torch.testing.assert_close(sh["params"][n], p, rtol=0, atol=1e-6, msg=f"{mode} param {n}")


def test_sharded_teacher_needs_data_parallelism(tmp_path):
    from tipkernels.opd import distributed

    cfg = _cfg(tmp_path, "x", parallel="auto", teacher_parallel="fsdp")  # auto: no process group here → none
    with pytest.raises(ValueError, match="teacher_parallel='fsdp' needs data parallelism"):
        distributed.setup(cfg)


# ------------------------------------------------------------------------------- checkpoint and resume


def _checkpoint_worker(rank: int, port: int, tmp: str):
    _init(rank, port)
    try:
        from tipkernels.opd import checkpoint

        tmp = Path(tmp)
        tok = _tok()
        plain = torch.load(tmp / "plain-params.pt")
        writes = []
        real = checkpoint.write_atomic
        checkpoint.write_atomic = lambda *a, **k: writes.append(a[0]) or real(*a, **k)
        for mode in MODES:
            cfg = lambda steps, **kw: _cfg(tmp, mode, batch_size=2, steps=steps, lr=1e-2,  # noqa: E731
                                           parallel=mode, max_new_tokens=5, **kw)
            out = Path(cfg(2).output_dir)
            student, teacher = models(tok)
            straight = OPDTrainer(student, teacher, tok, PROMPTS, cfg(2))
            hist = list(straight.train())
            assert len(hist) == 2
            dist.barrier()
            ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".tmp")))
            assert ckpts == ["checkpoint-2"], ckpts
            assert len(writes) == (1 if rank == 0 else 0), (rank, writes)
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert [x["step"] for x in lines] == [1, 2]
            dist.barrier()  # every rank has read the file before rank 0's next train() rewrites it
            straight.config.steps = 3  # the uninterrupted run goes on
            want = straight.train()[-1]
            want_params = _full_params(straight, mode)

            student2, _ = models(tok, seed=5)  # different initial weights: the checkpoint's must win
            resumed = OPDTrainer(student2, teacher, tok, PROMPTS, cfg(3, save_final=False))
            torch.manual_seed(999)  # the checkpoint's RNG states must win
            resumed.load_checkpoint(out / "checkpoint-2")
            assert resumed.step == 2 and [r["loss"] for r in resumed.history] == [r["loss"] for r in hist]
            got = resumed.train()[-1]
            assert got["loss"] == want["loss"] and got["selected_tokens"] == want["selected_tokens"], (got, want)
            for n, p in _full_params(resumed, mode).items():
                torch.testing.assert_close(p, want_params[n], rtol=0, atol=0, msg=f"{mode} {n}")
            writes.clear()
            dist.barrier()

            # a single-process checkpoint resumes under DDP and FSDP2 too
            student3, _ = models(tok, seed=6)
            again = OPDTrainer(student3, teacher, tok, PROMPTS, cfg(3, save_final=False))
            again.load_checkpoint(tmp / "plain-ckpt")
            assert again.step == 1
            for n, p in _full_params(again, mode).items():
                torch.testing.assert_close(p, plain[n], rtol=0, atol=0, msg=f"{mode} from plain: {n}")
            again.train()
    finally:
        dist.destroy_process_group()


def _one_step_trainer(tmp_path):
    """A single-process trainer (seed 4, batch 2) after one OPD step: the source of the checkpoints below."""
    tok = _tok()
    student, teacher = models(tok, seed=4)
    single = OPDTrainer(student, teacher, tok, PROMPTS, _cfg(tmp_path, "one", batch_size=2, steps=1))
    single.train_step()
    return single


def test_checkpoint_from_rank_0_and_resume_under_ddp_and_fsdp(tmp_path):
    single = _one_step_trainer(tmp_path)
    single.save_checkpoint(tmp_path / "plain-ckpt")
    torch.save(_full_params(single, "none"), tmp_path / "plain-params.pt")
    spawn(_checkpoint_worker, (free_port(), str(tmp_path)), nprocs=WORLD)
    # the checkpoint is the single-process format: a plain trainer loads it
    tok = single.tokenizer
    student, teacher = models(tok, seed=9)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, _cfg(tmp_path, "plain", batch_size=2))
    trainer.load_checkpoint(tmp_path / "fsdp" / "run" / "checkpoint-3")
    assert trainer.step == 3


def test_parallel_without_a_process_group_is_a_clear_error(tmp_path):
    tok = _tok()
    student, teacher = models(tok)
    for key in ("WORLD_SIZE", "RANK"):
        assert key not in os.environ
    with pytest.raises(ValueError, match="torchrun"):
        OPDTrainer(student, teacher, tok, PROMPTS, _cfg(tmp_path, "x", parallel="ddp"))
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, _cfg(tmp_path, "y", parallel="auto"))
    assert type(trainer.process) is ProcessContext and trainer.process.world == 1 and trainer.process.is_main


def test_a_process_group_the_trainer_creates_is_destroyed_at_exit():
    # launched by torchrun (its variables set), the trainer creates the group itself and must tear it down while
    # the interpreter is whole; the handler registered first runs last and sees the result
    import subprocess
    import sys

    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
            "from tipkernels.opd.distributed import Distributed\n"
            "d = Distributed('ddp', 'cpu')\n"
            "print('world', d.world, 'rank', d.rank)\n")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split("\n")[:2] == [f"world 2 rank {r}", "initialized at exit: False"], out


# ------------------------------------------------------------------- a tampered checkpoint under DDP and FSDP2


def _tampered_worker(rank: int, port: int, tmp: str):
    _init(rank, port)
    try:
        from tipkernels.opd.checkpoint import CheckpointError

        tmp = Path(tmp)
        tok = _tok()
        ck, marker = tmp / "ckpts" / "checkpoint-1", tmp / "pwned"
        for mode in MODES:
            student, teacher = models(tok, seed=5)
            trainer = OPDTrainer(student, teacher, tok, PROMPTS, _cfg(tmp, f"t-{mode}", batch_size=2, parallel=mode))
            for where in (ck, "latest"):
                trainer.output_dir = ck.parent
                try:
                    trainer.load_checkpoint(where)
                except (CheckpointError, FileNotFoundError) as e:
                    assert f"{ck}: trainer_state.pt is refused" in str(e), (mode, where, str(e))
                else:
                    raise AssertionError(f"{mode}: the tampered checkpoint was loaded from {where}")
                assert not marker.exists() and trainer.step == 0, (mode, where)
            dist.barrier()
            del trainer, student
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp_refuse_a_state_file_that_would_run_code(tmp_path):
    single = _one_step_trainer(tmp_path)
    ck = single.save_checkpoint(tmp_path / "ckpts" / "checkpoint-1")
    marker = tmp_path / "pwned"
    st = plant_code_running_state(ck, marker)
    spawn(_tampered_worker, (free_port(), str(tmp_path)), nprocs=WORLD)
    assert not marker.exists()
    assert_payload_is_live(st, marker)
