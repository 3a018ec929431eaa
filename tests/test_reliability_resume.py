"""A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run; --resume keeps
the run's own config.yaml (a changed flag is applied and recorded, or refused naming the flag)."""
import json
import random
import re
import subprocess
import time

import pytest
import torch
import yaml

from train_runs import REPO, metrics_rows, tiny_config, train_command, train_env, train_main


def _kill_after_rows(cmd, metrics, rows: int) -> None:
    """Start cmd and SIGKILL it once metrics.jsonl holds `rows` lines (mid-run, no warning)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            break
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {rows} rows: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    proc.stderr.close()


def _state(run):
    ckpt = {name: torch.load(run / "checkpoints" / name, weights_only=True) for name in ("latest.pt", "best.pt")}
    rows = [json.dumps(r) for r in metrics_rows(run)]  # text, so that NaN equals NaN
    return ckpt, rows, (run / "final_eval.json").read_text()


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):  # e.g. one CUDA generator state per device
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# The second: a warm start and a KL anchored at its policy, which a resume must restore (it is not
# the resumed weights, and the warm start does not run again), and best.pt kept by a margin over
# its own validation episodes, which a resume must restore too.
@pytest.mark.parametrize("sections", [{}, {"policy": {"warm_start": "lookup", "warm_start_steps": 20},
                                           "loss": {"beta": 0.5}, "eval": {"best_margin_se": 0.5}}],
                         ids=["plain", "warm_start_kl_margin"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, sections):
    cfg = tiny_config(tmp_path, **sections)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train_main("--config", cfg, "--output_dir", reference)
    ref_ckpt, ref_rows, ref_final = _state(reference)

    # 3 epochs x 3 steps, log_every 1: 1 + 9 + 3 validation/train rows before the 2 test rows.
    kill_at = random.Random().randint(2, len(ref_rows) - 3)
    _kill_after_rows(train_command("--config", cfg, "--output_dir", killed), killed / "metrics.jsonl", kill_at)
    train_main("--output_dir", killed, "--resume")

    ckpt, rows, final = _state(killed)
    assert rows == ref_rows, f"killed after {kill_at} rows"
    assert len({json.loads(r)["step"] for r in rows if "train/reward" in json.loads(r)}) == 9  # each step once
    for name in ("latest.pt", "best.pt"):
        for key in ("policy", "optimizer", "rng", "env", "step", "epoch", "best_val_reward", "best_val_rewards",
                    "kl_reference"):
            _assert_same_tensors(ckpt[name][key], ref_ckpt[name][key], f"{name}:{key} (killed after {kill_at} rows)")
    assert final == ref_final.replace(str(reference), str(killed)), f"killed after {kill_at} rows"


def test_resume_applies_lr_and_epochs_and_records_them(tmp_path, capsys):
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1}), "--output_dir", out)
    train_main("--output_dir", out, "--resume", "--lr", "5e-4", "--num_epochs", "2")
    assert "--lr changes optim.lr from 0.001 to 0.0005 from step 3 on" in capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 5e-4 and saved["train"]["num_epochs"] == 2
    assert {"step": 3, "field": "optim.lr", "old": 1e-3, "new": 5e-4} in saved["resume_changes"]
    assert {"step": 3, "field": "train.num_epochs", "old": 1, "new": 2} in saved["resume_changes"]
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]} == {
        "stage2": 5e-4, "stage1_and_budget_encoder": 5e-4}


@pytest.mark.parametrize("flags,message", [
    (["--seed", "7"], "--seed 7 would change train.seed of the resumed run from 3 to 7"),
    (["--batch_size", "2"], "--batch_size 2 would change train.batch_size of the resumed run from 4 to 2"),
    (["--stage1_lr_ratio", "0"], "--stage1_lr_ratio 0.0 would change optim.stage1_lr_ratio"),
    (["--config", "configs/smoke.yaml"], "--config cannot be given with --resume"),
])
def test_resume_refuses_a_flag_that_changes_the_run(tmp_path, flags, message):
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1}), "--output_dir", out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_main("--output_dir", out, "--resume", *flags)
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
    assert (out / "config.yaml").read_text() == config_before


def test_resume_before_the_first_checkpoint_restarts_from_step_0(tmp_path):
    cfg = tiny_config(tmp_path, train={"num_epochs": 1})
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train_main("--config", cfg, "--output_dir", reference)
    # A run killed after writing its config and first rows, before any checkpoint.
    killed.mkdir()
    (killed / "config.yaml").write_text((reference / "config.yaml").read_text())
    (killed / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text().splitlines()[0] + "\n{\"step\": 1, \"tr")
    train_main("--output_dir", killed, "--resume")
    assert metrics_rows(killed) == metrics_rows(reference)


def test_resume_of_nothing_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="holds no config.yaml and no checkpoint; nothing to resume"):
        train_main("--output_dir", tmp_path / "empty", "--resume")
    with pytest.raises(SystemExit, match="--resume needs --output_dir"):
        train_main("--resume")


def test_resume_does_not_reload_the_stage1_initialisation(tmp_path):
    source, run = tmp_path / "source", tmp_path / "run"
    cfg = tiny_config(tmp_path, train={"num_epochs": 1})
    train_main("--config", cfg, "--output_dir", source)
    train_main("--config", cfg, "--output_dir", run, "--load_stage1_checkpoint", source / "checkpoints" / "latest.pt")
    # The resumed run's weights come from its own checkpoint; the file it started from may be gone.
    (source / "checkpoints" / "latest.pt").unlink()
    assert train_main("--output_dir", run, "--resume", "--num_epochs", "2")["step"] == 6
