"""Crash safety of outputs: a kill during a write leaves the previous file; a read-only or full
output dir fails clearly and early; a checkpoint that carries code is refused."""
import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import envs.files
from agents.checkpoint import load_checkpoint, save_checkpoint
from envs.files import OutputWriteError, check_writable, write_json
from train_runs import REPO, tiny_config, train_env, train_main

# The child writes the new version, announces that it is inside the write, and hangs there.
_HANG_IN_WRITE = r"""
import os, sys, time, torch
from pathlib import Path
import envs.files
from agents.checkpoint import save_checkpoint
from envs.files import write_json

kind, path = sys.argv[1], Path(sys.argv[2])
real_fsync = os.fsync
def hang(fd):
    real_fsync(fd)
    Path(str(path) + ".inside").write_text("1")
    time.sleep(120)
envs.files.os.fsync = hang
if kind == "checkpoint":
    save_checkpoint(path, policy={"w": torch.full((100_000,), 2.0)}, step=2)
else:
    write_json(path, {"version": 2, "payload": list(range(100_000))})
"""


@pytest.mark.parametrize("kind", ["checkpoint", "json"])
def test_sigkill_during_a_write_leaves_the_previous_file(tmp_path, kind):
    path = tmp_path / ("latest.pt" if kind == "checkpoint" else "final_eval.json")
    if kind == "checkpoint":
        save_checkpoint(path, policy={"w": torch.ones(100_000)}, policy_meta={}, step=1)
    else:
        write_json(path, {"version": 1})
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _HANG_IN_WRITE, kind, str(path)], cwd=REPO, env=train_env(),
                            stderr=subprocess.PIPE)
    inside = tmp_path / (path.name + ".inside")
    deadline = time.monotonic() + 120
    while not inside.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    assert path.read_bytes() == before
    if kind == "checkpoint":
        assert load_checkpoint(path)["step"] == 1
    else:
        assert json.loads(path.read_text()) == {"version": 1}


def test_a_failed_write_keeps_the_previous_file_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, policy={"w": torch.ones(3)}, policy_meta={}, step=1)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(envs.files.os, "fsync", full_disk)
    with pytest.raises(OutputWriteError, match=rf"cannot write {path}: No space left on device; the previous file"):
        save_checkpoint(path, policy={"w": torch.zeros(3)}, policy_meta={}, step=2)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # no temporary file left


@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC])
def test_unwritable_output_dir_fails_before_training(tmp_path, monkeypatch, error):
    real_mkstemp = envs.files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if str(dir).startswith(str(tmp_path / "run")):
            raise OSError(error, os.strerror(error))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(envs.files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(SystemExit, match=rf"error: --output_dir: output directory {tmp_path / 'run'} is not "
                                         rf"writable: {os.strerror(error)}"):
        train_main("--config", tiny_config(tmp_path), "--output_dir", tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_really_fails(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(OutputWriteError, match="is not writable: Permission denied"):
        check_writable(ro)


def test_a_full_disk_at_a_checkpoint_stops_clearly_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, train={"num_epochs": 1})
    train_main("--config", cfg, "--output_dir", out)
    earlier = (out / "checkpoints" / "latest.pt").read_bytes()
    real_replace = envs.files.os.replace

    def replace(src, dst):
        if str(dst).endswith("latest.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(envs.files.os, "replace", replace)
    with pytest.raises(SystemExit, match=r"error: cannot write .*latest.pt: No space left on device; "
                                         r"the previous file \(if any\) is intact"):
        train_main("--output_dir", out, "--resume", "--num_epochs", "2")
    assert (out / "checkpoints" / "latest.pt").read_bytes() == earlier


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_carries_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"policy": {}, "policy_meta": {}, "step": 0, "extra": payload}, path)
    with pytest.raises(ValueError, match=r"evil.pt is refused: it holds Python objects other than tensors and plain "
                                         r"values, which could run code when loaded \(.*GLOBAL (posix|os)\.system"):
        load_checkpoint(path)
    assert not marker.exists()
    # The same refusal where a user passes a checkpoint to the runner.
    with pytest.raises(SystemExit, match="is refused"):
        train_main("--config", tiny_config(tmp_path), "--output_dir", tmp_path / "run",
                   "--load_stage1_checkpoint", path)
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1}), "--output_dir", out)
    for name in ("latest.pt", "best.pt"):
        ckpt = torch.load(out / "checkpoints" / name, weights_only=True)
        assert {"policy", "optimizer", "rng", "env", "policy_meta", "config"} <= set(ckpt)
