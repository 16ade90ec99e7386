"""tipkernels.opd: the OPD loop, its shift/mask convention, checkpoints, the CLI, the demo and the TRL adapter.

Tiny Hugging Face models are built in code (no downloads); everything runs on the CPU (torch backend).
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tipkernels as tk
from tipkernels.opd import OPDConfig, OPDTrainer, load_prompts, sequence_tip_loss
from tipkernels.opd.cli import main as cli_main
from tipkernels.opd.demo import build_model, build_tokenizer
from tipkernels.opd.models import check_vocab, position_ids
from tipkernels.opd.rollout import generate, response_mask

from tests._harness import BIG_MODEL as BIG, PROMPTS, ROOT, SMALL_MODEL as SMALL, opd_config as config, \
    opd_models as models, save_cli_inputs


# --------------------------------------------------------------------------------------- masks and the shift


def test_response_mask_stops_at_first_eos():
    eos = 1
    gen = torch.tensor([[5, 6, 1, 0, 0], [1, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 1, 5, 1, 0]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(gen, [eos]), want)
    assert response_mask(gen, []).all()


def _materialised(model, ids, attn):
    """Full float64 log-probabilities [B, T, V] of a model, the same positions as the loop uses."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_shift_and_mask_match_materialised_logits(tok, divergence):
    torch.manual_seed(0)
    student, teacher = models(tok)
    roll = generate(student, tok, PROMPTS, max_new_tokens=6, temperature=1.0)
    ids, attn, resp = roll.input_ids, roll.attention_mask, roll.response_mask
    # left padding, EOS-stopped rows and padding after EOS all occur in this batch
    assert (attn[:, 0] == 0).any() and (resp.sum(1) < 6).any()

    loss_fn = tk.TIPDistillationLoss(rule="all", divergence=divergence, backend="torch")
    out = sequence_tip_loss(loss_fn, student, teacher, ids, attn, resp)

    # the truth: full logits, float64; hidden i scores token i+1; teacher renormalised over the shared vocabulary
    V = student.get_output_embeddings().weight.shape[0]
    ls = _materialised(student, ids, attn)[:, :-1]
    lt = torch.log_softmax(_materialised(teacher, ids, attn)[:, :-1, :V], -1)
    mask = resp[:, 1:]
    if divergence == "reverse_kl":
        per_tok = (ls.exp() * (ls - lt)).sum(-1)
    else:
        per_tok = (lt.exp() * (lt - ls)).sum(-1)
    want = per_tok[mask].mean()
    assert torch.equal(out.selection.mask, mask)
    assert abs(float(out.loss.detach()) - float(want)) < 1e-5 * max(1.0, float(want))
    # per-token values at the right positions, and every response token (incl. EOS) is scored exactly once
    field = out.stats.reverse_kl if divergence == "reverse_kl" else out.stats.forward_kl
    torch.testing.assert_close(field[mask].double(), per_tok[mask], rtol=1e-5, atol=1e-6)
    assert int(mask.sum()) == int(resp.sum())
    # label log-probs of the sampled tokens under the same shift
    h = student.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1],
                      position_ids=position_ids(attn[:, :-1])).last_hidden_state
    st = tk.token_stats(h.detach(), student.lm_head.weight.detach(), labels=ids[:, 1:], backend="torch")
    lp = ls.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(st.label_logprob[mask].double(), lp[mask], rtol=1e-5, atol=1e-5)


def test_greedy_rollout_tokens_are_the_students_argmax_at_the_previous_position(tok):
    """Ties generate's positions (left padding) to the loop's: hidden i's argmax is the token generated at i+1."""
    student, teacher = models(tok)
    roll = generate(student, tok, PROMPTS, max_new_tokens=6, temperature=0.0)
    out = sequence_tip_loss(tk.TIPDistillationLoss(rule="all", backend="torch"), student, teacher,
                            roll.input_ids, roll.attention_mask, roll.response_mask)
    mask = roll.response_mask[:, 1:]
    assert torch.equal(out.stats.student_argmax[mask], roll.input_ids[:, 1:][mask])


def test_gradients_match_materialised_loss(tok):
    torch.manual_seed(1)
    student, teacher = models(tok)
    roll = generate(student, tok, PROMPTS, max_new_tokens=5, temperature=1.0)
    ids, attn, resp = roll.input_ids, roll.attention_mask, roll.response_mask
    out = sequence_tip_loss(tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, backend="torch"), student, teacher,
                            ids, attn, resp)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    V = student.lm_head.weight.shape[0]
    logits = student(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits[:, :-1]
    with torch.no_grad():
        lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=attn,
                                       position_ids=position_ids(attn)).logits[:, :-1, :V], -1)
    ls = torch.log_softmax(logits, -1)
    sel = out.selection.mask
    ((ls.exp() * (ls - lt)).sum(-1)[sel]).mean().backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(tok, tmp_path):
    torch.manual_seed(0)
    student, teacher = models(tok)
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, config(tmp_path, rule="all", lr=1e-2, steps=20))
    fixed = [trainer.rollout(PROMPTS)]
    losses = [trainer.train_step(fixed)["loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_train_writes_metrics_figure_and_checkpoint(tok, tmp_path):
    student, teacher = models(tok)
    cfg = config(tmp_path, steps=3, grad_accum=2, rollouts_per_prompt=2, plot=True, eval_interval=2)
    calls = []
    trainer = OPDTrainer(student, teacher, tok, PROMPTS, cfg,
                         eval_fn=lambda m: calls.append(1) or {"score": float(len(calls))})
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2, 3]
    for r in history:
        assert r["loss"] >= 0 and 0 < r["selected_fraction"] <= 1 and r["valid_tokens"] > 0
        assert abs(sum(r[f"q{q}_valid"] for q in range(1, 5)) - 1) < 1e-6
    assert "eval_score" in history[1] and "eval_score" in history[2] and "eval_score" not in history[0]
    assert [e["step"] for e in trainer.eval_history] == [0, 2, 3]
    out = Path(cfg.output_dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert (out / "opd_run.png").stat().st_size > 10_000
    ck = out / "checkpoint-3"
    assert (ck / "student" / "model.safetensors").is_file() and (ck / "trainer_state.pt").is_file()
    assert (ck / "student" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_resume_continues_with_identical_state(tok, tmp_path):
    cfg = config(tmp_path, steps=4, save_interval=2, rule="entropy_sample", ratio=0.5)
    torch.manual_seed(123)
    student, teacher = models(tok)
    straight = OPDTrainer(student, teacher, tok, PROMPTS, cfg)
    full = straight.train()
    want = {n: p.detach().clone() for n, p in student.named_parameters()}

    # a fresh process's view: new models (different init), the same teacher weights, resume from step 2
    student2, _ = models(tok, seed=7)
    resumed = OPDTrainer(student2, teacher, tok, PROMPTS, cfg)
    torch.manual_seed(999)  # the checkpoint's RNG state must win
    hist = resumed.train(resume_from=Path(cfg.output_dir) / "checkpoint-2")
    assert resumed.step == 4 and len(hist) == 4
    assert [r["loss"] for r in hist[2:]] == [r["loss"] for r in full[2:]]
    for n, p in student2.named_parameters():
        assert torch.equal(p, want[n]), n
    for a, b in zip(straight.optimizer.state_dict()["state"].values(),
                    resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    assert resumed.latest_checkpoint().name == "checkpoint-4"


def test_warmup_cosine_schedule():
    from tipkernels.opd.trainer import lr_lambda

    f = lr_lambda(OPDConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1))
    assert [round(f(s), 6) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(3) > f(6) > f(9)


# ------------------------------------------------------------------------------------------------ bad input


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rule"):
        OPDConfig(rule="nope")
    with pytest.raises(ValueError, match="ratio"):
        OPDConfig(ratio=0.0)
    with pytest.raises(TypeError, match="steps"):
        OPDConfig(steps=2.5)
    with pytest.raises(ValueError, match="importance_weights"):
        OPDConfig(rule="soft_or", importance_weights=True)
    with pytest.raises(ValueError, match="teacher_parallel"):
        OPDConfig(parallel="ddp", teacher_parallel="tensor")
    with pytest.raises(ValueError, match="teacher_parallel='fsdp'.*parallel='none'"):
        OPDConfig(parallel="none", teacher_parallel="fsdp")
    assert OPDConfig().teacher_parallel == "replicate"
    assert OPDConfig(parallel="auto", teacher_parallel="fsdp").teacher_parallel == "fsdp"


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "12>"}\n\n{"text": "3>"}\n"45>"\n')
    assert load_prompts(good) == ["12>", "3>", "45>"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    for body, msg in [('{"prompt": "1>"}\n{oops\n', r"p2.jsonl:2: not valid JSON"),
                      ('{"question": "1>"}\n', "no 'prompt' field"),
                      ('{"prompt": 3}\n', "must be a string"),
                      ('{"prompt": ""}\n', "empty prompt"),
                      ("\n\n", "no prompts")]:
        bad = tmp_path / "p2.jsonl"
        bad.write_text(body)
        with pytest.raises(ValueError, match=msg):
            load_prompts(bad)


def test_trainer_rejects_bad_models_and_prompts(tok, tmp_path):
    student, _ = models(tok)
    small_teacher = build_model(BIG, len(tok) - 2, seed=1)
    with pytest.raises(ValueError, match="fewer than the student"):
        OPDTrainer(student, small_teacher, tok, PROMPTS, config(tmp_path))
    small_student = build_model(SMALL, len(tok) - 1, seed=1)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the student"):
        OPDTrainer(small_student, build_model(BIG, len(tok), seed=1), tok, PROMPTS, config(tmp_path))
    _, teacher = models(tok)
    with pytest.raises(ValueError, match="empty"):
        OPDTrainer(student, teacher, tok, [], config(tmp_path))
    with pytest.raises(TypeError, match="prompts"):
        OPDTrainer(student, teacher, tok, "12>", config(tmp_path))
    with pytest.raises(TypeError, match="OPDConfig"):
        OPDTrainer(student, teacher, tok, PROMPTS, {"rule": "all"})
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_vocab(student, teacher, tok, other)


def test_logit_transforms_supported_or_refused(tok):
    """A soft-cap is now supported (the trainer's loss carries it: tests/opd/test_model_transforms.py checks the
    values); a transform the kernels cannot express, or an invalid cap, is still refused, naming it."""
    student, teacher = models(tok)
    teacher.config.final_logit_softcapping = 30.0
    check_vocab(student, teacher)
    teacher.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_vocab(student, teacher)
    teacher.config.final_logit_softcapping = None
    teacher.config.output_multiplier_scale = 2.0
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        check_vocab(student, teacher)


# ----------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_help():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for argv in (["--help"], ["demo", "--help"], ["opd", "--help"]):
        res = subprocess.run([sys.executable, "-m", "tipkernels.opd.cli", *argv], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "usage: tipkernels" in res.stdout
    script = Path(sys.executable).parent / "tipkernels"
    if script.exists():  # the console script of an installed checkout
        res = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0 and "demo" in res.stdout and "opd" in res.stdout


@pytest.mark.slow
def test_cli_opd_local_dirs_and_errors(tok, tmp_path, capsys):
    student, teacher = models(tok)
    s_dir, t_dir, prompts = save_cli_inputs(tmp_path, tok, student, teacher)
    out_dir = tmp_path / "run"
    argv = ["opd", "--student", str(s_dir), "--teacher", str(t_dir), "--prompts", str(prompts), "--rule", "q3",
            "--ratio", "0.5", "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--lr", "1e-3",
            "--output-dir", str(out_dir), "--no-progress", "--device", "cpu"]
    assert cli_main(argv) == 0
    assert (out_dir / "checkpoint-2" / "student" / "model.safetensors").is_file()
    assert cli_main(argv[:argv.index("--steps") + 1] + ["3"] + argv[argv.index("--steps") + 2:] + ["--resume"]) == 0
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 3

    def err(args):
        capsys.readouterr()
        assert cli_main(args) == 2
        return capsys.readouterr().err

    assert "does not exist" in err(["opd", "--student", str(tmp_path / "nope"), "--teacher", str(t_dir),
                                    "--prompts", str(prompts)])
    assert "does not exist" in err(["opd", "--student", str(s_dir), "--teacher", str(t_dir),
                                    "--prompts", str(tmp_path / "none.jsonl")])
    # one process: a sharded teacher has nothing to be sharded across
    assert "teacher_parallel='fsdp' needs data parallelism" in err(argv + ["--teacher-parallel", "fsdp"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert "bad.jsonl:1" in err(["opd", "--student", str(s_dir), "--teacher", str(t_dir), "--prompts", str(bad)])
    small = tmp_path / "small_teacher"
    build_model(BIG, len(tok) - 2, seed=3).save_pretrained(small)
    assert "fewer than the student" in err(["opd", "--student", str(s_dir), "--teacher", str(small),
                                            "--prompts", str(prompts)])
    odd = tmp_path / "odd_teacher"
    teacher.save_pretrained(odd)
    other = build_tokenizer()
    other.add_tokens(["<x>"])
    other.save_pretrained(odd)
    assert "tokenizers differ" in err(["opd", "--student", str(s_dir), "--teacher", str(odd),
                                       "--prompts", str(prompts)])


@pytest.mark.slow
def test_demo_quick_shows_distillation(tmp_path, capsys):
    assert cli_main(["demo", "--quick", "--no-progress", "--output-dir", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    run = summary["runs"]["soft_or"]
    assert summary["teacher_accuracy"] >= 0.9, text
    assert run["accuracy_after"] >= summary["student_accuracy_before"] + 0.15, text
    assert 0 < run["fraction"] < 1 and abs(sum(run[f"Q{q}"] for q in range(1, 5)) - 1) < 1e-6
    assert "accuracy" in text and "peak" in text
    if summary["figure"]:
        assert Path(summary["figure"]).is_file()


# ------------------------------------------------------------------------------------------- TRL adapter
# TRL is in the dev extra (it installs beside the pinned CPU torch), so these run in CI rather than skip.


def _gkd_batch(tok, prompts):
    """A GKD-style batch: completion = the sorted digits + EOS; labels -100 on prompt and padding."""
    from tipkernels.opd.rollout import encode_prompts

    p_ids, p_attn = encode_prompts(tok, [r["prompt"] for r in prompts], "cpu")
    full, plen = [], []
    for r in prompts:
        ip = tok(r["prompt"])["input_ids"]
        full.append(ip + tok(r["completion"])["input_ids"] + [tok.eos_token_id])
        plen.append(len(ip))
    width = max(map(len, full))
    ids = torch.full((len(full), width), tok.pad_token_id)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (f, n) in enumerate(zip(full, plen)):
        ids[i, :len(f)] = torch.tensor(f)
        attn[i, :len(f)] = 1
        labels[i, n:len(f)] = torch.tensor(f[n:])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "prompts": p_ids,
            "prompt_attention_mask": p_attn}


GKD_ROWS = [{"prompt": p, "completion": "".join(sorted(p[:-1]))} for p in PROMPTS]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_tip_gkd_loss_with_all_tokens_equals_trl_generalized_jsd(tok, beta):
    from tipkernels.opd.trl import GKDTrainer, tip_gkd_loss

    student, teacher = models(tok, teacher_extra_rows=0)
    batch = _gkd_batch(tok, GKD_ROWS)
    out = tip_gkd_loss(tk.TIPDistillationLoss(rule="all", divergence="jsd", beta=beta, backend="torch"),
                       student, teacher, batch)
    # TRL's own loss on materialised logits, with its shift (no position_ids: right padding only here)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = GKDTrainer.generalized_jsd_loss(s_logits.double(), t_logits.double(), labels=batch["labels"][:, 1:],
                                           beta=beta)
    assert abs(float(out.loss.detach()) - float(want)) < 1e-5 * max(1.0, float(want))


@pytest.mark.slow
def test_tip_gkd_trainer_trains_with_trl(tok, tmp_path):
    from datasets import Dataset

    from tipkernels.opd.trl import GKDConfig, TIPGKDTrainer

    tok = build_tokenizer()
    tok.padding_side = "left"
    student, teacher = models(tok, teacher_extra_rows=0)  # GKDTrainer itself insists on equal vocab_size
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GKDConfig(output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, max_steps=2, lmbda=0.5, beta=0.5, max_new_tokens=5,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         temperature=1.0, disable_tqdm=True, seed=0)
        trainer = TIPGKDTrainer(model=student, teacher_model=teacher, args=args,
                                train_dataset=Dataset.from_list(GKD_ROWS), processing_class=tok,
                                data_collator=lambda rows: _gkd_batch(tok, rows),
                                tip_loss=tk.TIPDistillationLoss(rule="soft_or", ratio=0.5, divergence="jsd",
                                                                backend="torch"))
        result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs and all(0 < r["tip/selected_fraction"] < 1 for r in logs)
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("script,argv", [("plain_pytorch_opd.py", ["--steps", "3"]),
                                         ("trl_gkd.py", ["--steps", "2"])])
def test_examples_run(script, argv, tmp_path):
    extra = ["--output-dir", str(tmp_path / "out")] if script == "trl_gkd.py" else []
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), *argv, *extra], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loss" in res.stdout
