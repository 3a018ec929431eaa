"""Data-parallel training on CPU with gloo: 2 ranks, each a process forked from this one (the
imports are already done, so a rank starts in well under a second), set up as torchrun would.
Where CUDA is present the ranks are spawned instead: a CUDA build's autograd engine runs device
threads, and a process forked after it ran cannot use autograd ("Autograd and Fork")."""
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback

import pytest
import torch

from agents.config import config_from_dict
from agents.distributed import RankContext, init_distributed, shard, wrap_ddp
from agents.factory import make_actor, make_backend_from_config, make_env, make_loss
from agents.grpo import grpo_update, make_optimizer
from agents.rollout import collect_rollouts
from helpers import load_runner, tiny_model
from train_runs import TINY, metrics_rows, tiny_config

RANKS = multiprocessing.get_context("spawn" if torch.cuda.is_available() else "fork")
train = load_runner("train")  # imported here, once: the forked ranks start without importing it


def train_main(*args):
    return train.main([str(a) for a in args])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(target, rank, world, port, log, args):
    """One rank: torchrun's environment, output into `log`, `target(*args)` with the rank context."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    out = open(log, "w")
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    try:
        target(*args)
    except SystemExit as err:
        if err.code not in (0, None):
            print(err.code if isinstance(err.code, str) else f"exit {err.code}", flush=True)
        os._exit(err.code if isinstance(err.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        out.flush()
        os._exit(1)
    out.flush()
    os._exit(0)


def start_ranks(tmp_path, target, *args, world=2):
    port = _free_port()
    procs = [RANKS.Process(target=_rank, args=(target, r, world, port, tmp_path / f"rank{r}.log", args))
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def join_ranks(tmp_path, procs, timeout=120):
    logs = []
    for r, p in enumerate(procs):
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"rank {r} still runs after {timeout} s")
        logs.append((tmp_path / f"rank{r}.log").read_text())
    return [p.exitcode for p in procs], logs


def run_ranks(tmp_path, target, *args, world=2):
    codes, logs = join_ranks(tmp_path, start_ranks(tmp_path, target, *args, world=world))
    assert codes == [0] * world, "\n".join(f"rank {r} (exit {c}):\n{log[-3000:]}" for r, (c, log) in
                                           enumerate(zip(codes, logs)))
    return logs


# ------------------------------------------------------------ the update
def _setup(batch_size, scale_rewards):
    cfg = config_from_dict({**TINY, "env": {**TINY["env"], "backend_options": {
        **TINY["env"]["backend_options"], "latency_noise": 0.0}},
        "loss": {"num_iterations": 3, "scale_rewards": scale_rewards, "beta": 0.1}})
    backend = make_backend_from_config(cfg)
    torch.manual_seed(0)
    actor, _ = make_actor(cfg, backend)
    loss = make_loss(cfg, actor)
    optimizer = make_optimizer(actor, 1e-2)
    env = make_env(cfg, backend, "train", batch_size, cfg.train.group_size)
    return cfg, env, actor, loss, optimizer


def _update_on_rows(batch_size, scale_rewards, rollout, out):
    """Under torchrun's environment: this rank's groups of `rollout` through DDP; rank 0 saves the weights."""
    ranks = init_distributed("cpu", timeout_s=30)
    cfg, _, actor, loss, optimizer = _setup(batch_size, scale_rewards)
    g = cfg.train.group_size
    groups = shard(batch_size, ranks)
    mine = rollout[groups.start * g : groups.stop * g].clone()
    loss.compute_advantages(mine, ranks)
    share = (groups.stop - groups.start) * ranks.world_size / batch_size
    _, _, non_finite = grpo_update(wrap_ddp(ranks, loss), optimizer, mine, actor.parameters(),
                                   cfg.loss.num_iterations, 1.0, ranks, share)
    assert non_finite is None
    if ranks.is_main:
        torch.save(actor.state_dict(), out)


@pytest.mark.parametrize("batch_size,scale_rewards", [(4, "batch"), (3, "group")])
def test_two_ranks_with_half_the_batch_make_the_update_of_one_rank_with_all_of_it(tmp_path, batch_size,
                                                                                   scale_rewards):
    """2 ranks x B/2 groups == 1 rank x B groups: "batch" scaling needs the rewards of the global
    batch, an odd B (2 + 1 groups) needs each rank's loss scaled by its share."""
    cfg, env, actor, loss, optimizer = _setup(batch_size, scale_rewards)
    rollout = collect_rollouts(env, actor)
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    loss.compute_advantages(rollout)
    grpo_update(loss, optimizer, rollout.clone(), actor.parameters(), cfg.loss.num_iterations, 1.0)
    reference = actor.state_dict()

    run_ranks(tmp_path, _update_on_rows, batch_size, scale_rewards, rollout, tmp_path / "two_ranks.pt")
    two_ranks = torch.load(tmp_path / "two_ranks.pt", weights_only=True)
    moved = max(float((reference[k] - before[k]).abs().max()) for k in reference)
    assert moved > 1e-3  # the update did something to compare
    for k in reference:
        torch.testing.assert_close(two_ranks[k], reference[k], rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")


def _update_with_a_nan_on_rank_1(rollout, out):
    ranks = init_distributed("cpu", timeout_s=30)
    cfg, _, actor, loss, optimizer = _setup(4, "group")
    mine = rollout[shard(4, ranks).start * 4 : shard(4, ranks).stop * 4].clone()
    loss.compute_advantages(mine, ranks)
    if ranks.rank == 1:  # a non-finite behaviour log-prob: rank 1's loss alone is NaN
        mine["action", "tier_log_prob"][0] = float("nan")
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    _, _, non_finite = grpo_update(wrap_ddp(ranks, loss), optimizer, mine, actor.parameters(), 3, 1.0, ranks)
    unchanged = all(torch.equal(before[k], v) for k, v in actor.state_dict().items())
    torch.save({"non_finite": non_finite, "unchanged": unchanged}, f"{out}.{ranks.rank}")


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    """Without the joint decision, rank 0 would wait in DDP's all-reduce for a rank that skipped."""
    _, env, actor, _, _ = _setup(4, "group")
    rollout = collect_rollouts(env, actor)
    run_ranks(tmp_path, _update_with_a_nan_on_rank_1, rollout, tmp_path / "skip")
    results = [torch.load(tmp_path / f"skip.{r}", weights_only=True) for r in range(2)]
    assert all(r["unchanged"] for r in results)
    assert results[1]["non_finite"] == "loss nan" and results[0]["non_finite"] is not None


def test_each_rank_gets_its_share_of_an_uneven_split():
    parts = [shard(7, RankContext(rank=r, world_size=3)) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 5), (5, 7)]


# ------------------------------------------------------------ runs
def test_two_rank_run_writes_one_set_of_outputs_and_resumes_on_one_rank(tmp_path):
    cfg = tiny_config(tmp_path, train={"num_epochs": 1})
    run = tmp_path / "run"
    logs = run_ranks(tmp_path, train_main, "--config", cfg, "--output_dir", run, "--use_multi_gpu")
    assert '"split": "test"' in logs[0] and '"split": "test"' not in logs[1]  # rank 0 alone reports

    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("tensorboard/")] == [
        "checkpoints/best.pt", "checkpoints/latest.pt", "config.yaml", "final_eval.json", "metrics.jsonl"]
    assert len([f for f in files if f.startswith("tensorboard/")]) == 1
    rows = metrics_rows(run)
    train_steps = [r["step"] for r in rows if "train/reward" in r]
    assert train_steps == [1, 2, 3]  # each step logged once, by one rank
    final = json.loads((run / "final_eval.json").read_text())
    assert final["num_episodes"] == 16 and final["uniform_random"]["num_episodes"] == 16  # both shards gathered

    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["other_ranks"]) == 1
    # Each rank drew its own samples and actions: their generators differ.
    assert not torch.equal(ckpt["rng"]["torch"], ckpt["other_ranks"][0]["rng"]["torch"])
    assert not torch.equal(ckpt["env"]["train"]["rng"], ckpt["other_ranks"][0]["env"]["train"]["rng"])

    # The 2-rank run continues on one rank, without --use_multi_gpu; the change is recorded.
    assert train_main("--output_dir", run, "--resume", "--num_epochs", "2")["step"] == 6
    history = (run / "config.yaml").read_text()
    assert "field: world_size" in history and "field: train.use_multi_gpu" in history
    assert [r["step"] for r in metrics_rows(run) if "train/reward" in r] == [1, 2, 3, 4, 5, 6]


def test_two_rank_resume_on_two_ranks_continues_every_ranks_streams(tmp_path):
    """A 2-rank run stopped after epoch 1 and resumed on 2 ranks ends bit-identical to one that ran through."""
    through, resumed = tmp_path / "through", tmp_path / "resumed"
    cfg = tiny_config(tmp_path, train={"num_epochs": 2})
    run_ranks(tmp_path, train_main, "--config", cfg, "--output_dir", through, "--use_multi_gpu")
    run_ranks(tmp_path, train_main, "--config", cfg, "--output_dir", resumed, "--use_multi_gpu", "--num_epochs", "1")
    run_ranks(tmp_path, train_main, "--output_dir", resumed, "--resume", "--use_multi_gpu", "--num_epochs", "2")
    a = torch.load(through / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)
    for key in a["policy"]:
        assert torch.equal(a["policy"][key], b["policy"][key]), key
    assert torch.equal(a["other_ranks"][0]["rng"]["torch"], b["other_ranks"][0]["rng"]["torch"])
    assert metrics_rows(through) == metrics_rows(resumed)


@pytest.mark.parametrize("sig,message", [
    (signal.SIGKILL, "failed"),
    (signal.SIGSTOP, "stalled for longer than the 8 s collective timeout"),
])
def test_a_killed_or_stalled_rank_stops_the_run_with_a_clear_error(tmp_path, sig, message):
    cfg = tiny_config(tmp_path, train={"num_epochs": 50, "collective_timeout_s": 8})
    run = tmp_path / "run"
    procs = start_ranks(tmp_path, train_main, "--config", cfg, "--output_dir", run, "--use_multi_gpu")
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and procs[0].is_alive(), (tmp_path / "rank0.log").read_text()[-3000:]
        time.sleep(0.05)
    os.kill(procs[1].pid, sig)
    procs[0].join(60)
    alive = procs[0].is_alive()
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join()
    if alive:
        procs[0].kill()
    assert not alive, "rank 0 hangs after rank 1 was stopped"
    log = (tmp_path / "rank0.log").read_text()
    assert procs[0].exitcode == 1, log[-3000:]
    assert "error: rank 0 of 2: " in log and message in log and f"--resume --output_dir {run}" in log, log[-3000:]
    assert "Traceback" not in log


# ------------------------------------------------------------ pretraining
pretrain = load_runner("pretrain_vlm")
TIERS = ("low", "medium")  # of rank 0's and rank 1's batch


def _pretrain_batches():
    """A tiny model, a glyph head and two batches of 3 SynthVQA samples (one image size each)
    with their per-row knob plans."""
    from envs.data import synthvqa

    model, tokenizer = tiny_model()
    data = synthvqa.SynthVQA("train", 64, seed=0)
    encoded = pretrain.EncodedSynthVQA(data, tokenizer)
    batches = [pretrain.collate([encoded[i] for i in b[:3]], tokenizer.pad_id)
               for b in pretrain.size_batches(data.size_index, 3)[:2]]
    generator = torch.Generator().manual_seed(0)
    elastic = torch.tensor([f in ("coarse", "detail") for f in synthvqa.FAMILIES])
    plans = [pretrain.sample_row_plans(generator, b[4], elastic, elastic, model.cfg.num_layers, model.cfg.top_k, 0.0)
             for b in batches]
    head = torch.nn.Linear(model.cfg.d_model, len(pretrain.GLYPH_CLASSES))
    return model, head, batches, plans


def _pretrain_gradients(out):
    ranks = init_distributed("cpu", timeout_s=30)
    model, head, batches, plans = _pretrain_batches()
    objective = wrap_ddp(ranks, pretrain.PretrainLoss(model, head, 1.0, 0.1), find_unused_parameters=True)
    torch.manual_seed(ranks.rank)  # the random budget vectors of this rank's batch
    objective(batches[ranks.rank], TIERS[ranks.rank], plans[ranks.rank], torch.device("cpu"))[0].backward()
    if ranks.is_main:
        torch.save({n: p.grad for n, p in objective.module.named_parameters()}, out)


def test_pretraining_averages_the_ranks_gradients_through_ddp(tmp_path):
    """Each rank's batch runs other blocks and experts (per-row plans), and here another tier; the
    DDP gradient of every parameter is the mean of the two batches' gradients (a parameter one rank
    did not use counts as zero there)."""
    model, head, batches, plans = _pretrain_batches()
    objective = pretrain.PretrainLoss(model, head, 1.0, 0.1)  # with the router focus loss's hooks
    grads = []
    for r in range(2):
        objective.zero_grad(set_to_none=True)
        torch.manual_seed(r)
        objective(batches[r], TIERS[r], plans[r], torch.device("cpu"))[0].backward()
        grads.append({n: p.grad for n, p in objective.named_parameters()})
    run_ranks(tmp_path, _pretrain_gradients, tmp_path / "grads.pt")
    averaged = torch.load(tmp_path / "grads.pt", weights_only=True)
    # The glyph head reads medium and high tiers only: rank 0 leaves it without a gradient.
    assert [n for n in grads[0] if grads[0][n] is None and grads[1][n] is not None] == ["glyph_head.weight",
                                                                                        "glyph_head.bias"]
    for name, synced in averaged.items():
        a, b = grads[0][name], grads[1][name]
        if a is None and b is None:
            assert synced is None, name
            continue
        expected = ((a if a is not None else 0) + (b if b is not None else 0)) / 2
        torch.testing.assert_close(synced, expected, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------ launching
def test_use_multi_gpu_without_torchrun_says_which_command_to_run(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cfg = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as err:
        train_main("--config", cfg, "--output_dir", tmp_path / "run", "--use_multi_gpu")
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert ("--use_multi_gpu runs one process per rank under torchrun, which starts them; run: torchrun "
            "--nproc_per_node 2 ") in stderr
    assert f"train.py --config {cfg} --output_dir {tmp_path / 'run'} --use_multi_gpu" in stderr
    assert not (tmp_path / "run").exists()


def test_ranks_without_use_multi_gpu_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        train_main("--config", tiny_config(tmp_path), "--output_dir", tmp_path / "run")
    assert "without --use_multi_gpu: each rank would train alone into the same --output_dir" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_batch_smaller_than_the_ranks_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        train_main("--config", tiny_config(tmp_path), "--output_dir", tmp_path / "run", "--use_multi_gpu",
                   "--batch_size", "2")
    assert "--batch_size 2 is smaller than the 3 ranks" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
