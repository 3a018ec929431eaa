"""Every runner refuses --device cuda on a machine without CUDA with an error naming the device,
before anything is written (on a CUDA machine these are skipped: tests/test_executor_cuda.py runs there)."""
import pytest
import torch
import yaml

from envs.backends.vlm import VLMBackend
from envs.machine import resolve_device

from helpers import ROOT, load_runner

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_CUDA = r"--device='cuda': CUDA is not available on this machine.*use --device cpu"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=NO_CUDA):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"--device='tpu' is not a device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available"):
        VLMBackend(device="cuda", budget_range_ms=(1.0, 2.0))


def test_train_refuses_cuda_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=NO_CUDA):  # a user error: one line, status 2 (agents.cli)
        load_runner("train").main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", str(out),
                                   "--device", "cuda"])
    assert not out.exists()


def test_evaluate_refuses_cuda_before_writing(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["env"]["backend_options"]["num_samples"] = {"train": 16, "val": 8, "test": 8}
    cfg["policy"].update({"hidden_dim": 16, "sinusoidal_dim": 16})
    cfg["train"].update({"num_epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "group_size": 2})
    cfg["eval"].update({"val_samples": 4, "test_samples": 4, "batch_size": 8})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    load_runner("train").main(["--config", str(tmp_path / "tiny.yaml"), "--output_dir", str(run)])
    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match=NO_CUDA):
        load_runner("evaluate").main(["--checkpoint", str(run), "--output_dir", str(out), "--device", "cuda"])
    assert not out.exists()


@pytest.mark.parametrize("runner, argv", [
    ("profile_configs", ["--model_path", str(ROOT / "envs/assets/budgetvlm-molmoe-tiny"), "--device", "cuda"]),
    ("bench", ["--device", "cuda"]),
])
def test_profile_and_bench_refuse_cuda_before_writing(tmp_path, capsys, runner, argv):
    out = tmp_path / "out"
    flag = ["--output_dir", str(out)] if runner == "profile_configs" else ["--output", str(out / "bench.json")]
    assert load_runner(runner).cli(argv + flag) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_pretraining_refuses_cuda_before_writing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ValueError, match=NO_CUDA):
        load_runner("pretrain_vlm").main(["--out", str(out), "--preset", "test", "--device", "cuda"])
    assert not out.exists()
