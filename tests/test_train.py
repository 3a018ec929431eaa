"""runners/train.py end to end on the dummy backend."""
import json

import pytest
import torch
import yaml
from train_runs import REPO, run_train, tiny_config, train_main


def _tiny_config(tmp_path, **train):
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["train"].update({"num_epochs": 2, "steps_per_epoch": 2, **train})
    cfg["eval"].update({"val_samples": 16, "test_samples": 16})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_smoke_config_learns_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    run_train("--config", REPO / "configs" / "smoke.yaml", "--output_dir", out)
    final = json.loads((out / "final_eval.json").read_text())
    for key in ("reward_mean", "accuracy_mean", "latency_mean_ms", "violation_rate", "optimal_reward_mean",
                "random_reward_mean"):
        assert key in final
    # GRPO on held-out samples closes >= 80% of the random -> optimal expected-reward gap.
    assert final["gap_closed"] >= 0.8, final
    assert final["violation_rate"] < final["uniform_random"]["violation_rate"]
    assert final["reward_mean"] > final["uniform_random"]["reward_mean"]
    assert (out / "config.yaml").exists()
    assert (out / "checkpoints" / "best.pt").exists() and (out / "checkpoints" / "latest.pt").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    assert "val/accuracy_vs_budget" in events.Tags()["images"]
    assert {f"actions/{h}" for h in ("tier", "insertion", "top_k", "num_blocks")} <= set(events.Tags()["histograms"])
    assert {"train/reward", "val/violation_rate", "loss/loss_objective"} <= set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for key in ("train/reward", "train/violation_rate", "val/reward_mean", "val/violation_rate",
                "loss/loss_objective", "loss/entropy_tier", "loss/entropy_num_blocks", "loss/clip_fraction",
                "train/frac_reward_zero_std"):
        assert key in keys, key
    first_val = next(r for r in rows if "val/reward_mean" in r)
    last_val = [r for r in rows if "val/reward_mean" in r][-1]
    assert last_val["val/reward_mean"] > first_val["val/reward_mean"]


def test_resume_continues_from_checkpoint_step(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, train={"num_epochs": 1})
    train_main("--config", cfg, "--output_dir", out)
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3
    # a fresh run over it is refused and loses nothing
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="pass --resume"):
        train_main("--config", cfg, "--output_dir", out)
    assert (out / "metrics.jsonl").read_text() == before
    train_main("--output_dir", out, "--num_epochs", 2, "--resume")
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"] == 6
    final = json.loads((out / "final_eval.json").read_text())
    assert final["step"] == 6 and 0 <= final["checkpoint_step"] <= 6


@pytest.mark.parametrize(
    "args,message",
    [
        (["--use_multi_gpu"], "--use_multi_gpu runs one process per rank under torchrun"),
        (["--dataset_names", "okvqa"], "backend 'dummy' generates its own samples"),
        (["--lr", "-1"], "lr=-1.0: expected > 0"),
    ],
)
def test_bad_flags_fail_clearly(tmp_path, args, message):
    proc = run_train("--config", _tiny_config(tmp_path), "--output_dir", tmp_path / "x", *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_unknown_config_key_and_mismatched_checkpoint(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"batch_sise": 3}}))
    proc = run_train("--config", bad, "--output_dir", tmp_path / "y", check=False)
    assert proc.returncode != 0 and "train.batch_sise" in proc.stderr

    out = tmp_path / "run"
    run_train("--config", _tiny_config(tmp_path), "--output_dir", out, "--num_epochs", 1)
    cfg = yaml.safe_load(_tiny_config(tmp_path).read_text())
    cfg["policy"]["hidden_dim"] = 16
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    proc = run_train("--config", other, "--output_dir", tmp_path / "z", "--load_stage1_checkpoint",
                out / "checkpoints" / "latest.pt", check=False)
    assert proc.returncode != 0 and "hidden_dim=128" in proc.stderr and "expected 16" in proc.stderr
