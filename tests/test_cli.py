"""The command line speaks to a person: a user error is one line naming the flag, exit status 2."""
import pytest
import torch

from agents.cli import UserError, user_input
from helpers import load_runner

train = load_runner("train")
evaluate = load_runner("evaluate")


def _user_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as err:
        main([str(a) for a in argv])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    return stderr


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "lr=-1.0: expected > 0"),
    (["--use_multi_gpu"], "--use_multi_gpu runs one process per rank under torchrun"),
    (["--dataset_names", "okvqa"], "--dataset_names okvqa: backend 'dummy' generates its own samples"),
    (["--backend", "vlm", "--dataset_names", "text_vqa"], "pass --data_root DIR"),
    (["--backend", "vlm", "--data_root", "/nowhere/vqa"], "--data_root /nowhere/vqa: no such directory"),
    (["--config", "/nowhere.yaml"], "config file /nowhere.yaml does not exist"),
])
def test_train_user_errors(tmp_path, capsys, argv, message):
    stderr = _user_error(train.main, ["--config", train.REPO / "configs" / "smoke.yaml", "--output_dir",
                                      tmp_path / "run", *argv], capsys)
    assert message in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_so(tmp_path, capsys):
    stderr = _user_error(train.main, ["--config", train.REPO / "configs" / "smoke.yaml", "--output_dir",
                                      tmp_path / "run", "--device", "cuda"], capsys)
    assert "--device='cuda': CUDA is not available on this machine" in stderr and "use --device cpu" in stderr
    stderr = _user_error(evaluate.main, ["--checkpoint", tmp_path / "none.pt", "--output_dir", tmp_path / "e",
                                         "--device", "cuda"], capsys)
    assert "does not exist" in stderr  # the checkpoint is read first; either way one line, status 2


def test_train_flags_cover_the_config_fields_a_user_needs():
    args = train.parse_args(["--data_root", "/d", "--steps_per_epoch", "3", "--num_threads", "2",
                             "--val_samples", "5", "--test_samples", "6"])
    cfg = train.resolve_config(args)
    assert (cfg.data.data_root, cfg.train.steps_per_epoch, cfg.train.num_threads) == ("/d", 3, 2)
    assert (cfg.eval.val_samples, cfg.eval.test_samples) == (5, 6)


def test_a_bug_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        with user_input():
            raise RuntimeError("a bug")
    with pytest.raises(UserError) as err:
        with user_input():
            raise KeyError("unknown config key(s) ['train.x']")
    assert err.value.message == "unknown config key(s) ['train.x']" and err.value.code == 2
    assert str(err.value) == "error: unknown config key(s) ['train.x']"
