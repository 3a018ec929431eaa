"""The interleaved evaluation run (agents/sweep_schedule.py): what runs when, and that drift hits
static configurations, calibration and env policies alike."""
import pytest
import torch

from agents.baselines import RandomPolicy, StaticChoice
from agents.evaluation import run_episodes
from agents.sweep_schedule import EnvPolicy, calibration_rounds, run_interleaved
from envs import BudgetVLMEnv
from envs.backends.dummy import DummyBackend
from envs.data.sample import ImageLoadError

CONFIGS = [StaticChoice("low", 4, 12, 1), StaticChoice("medium", 6, 14, 1), StaticChoice("high", 8, 16, 1)]


class FixedPolicy:
    """Always the configuration `config` through the env, zero budget token and controller time
    (so that its episodes are the same requests as the table's)."""

    def __init__(self, knob_space, d_model, config, token=0.0):
        self.indices = config.indices(knob_space)
        self.d_model, self.token = d_model, token

    def __call__(self, td):
        n = td.batch_size[0]
        for head, i in self.indices.items():
            td.set(("action", head), torch.full((n, 1), i))
        td.set(("action", "budget_token"), torch.full((n, self.d_model), self.token))
        td.set(("action", "controller_ms"), torch.zeros(n, 1))
        return td


class RecordingBackend(DummyBackend):
    """The dummy, logging (split, sample index, budget-token sum) of every episode; latency grows
    by `drift` per episode run (a machine slowing down during the run)."""

    def __init__(self, drift=0.0, unreadable=(), **kwargs):
        super().__init__(**kwargs)
        self.calls, self.drift, self.unreadable = [], drift, set(unreadable)

    def start_episode(self, sample, tier, budget_token):
        if (sample.split, sample.index) in self.unreadable:
            raise ImageLoadError(f"image of {sample.split} sample {sample.index} is truncated")
        self.calls.append((sample.split, sample.index, float(budget_token.sum())))
        return super().start_episode(sample, tier, budget_token)

    def finish(self, episode, top_k, num_blocks):
        result = super().finish(episode, top_k, num_blocks)
        slow = 1.0 + self.drift * len(self.calls)
        result.timings_ms = {k: v * slow for k, v in result.timings_ms.items()}
        return result


def _backend(**kwargs):
    return RecordingBackend(num_samples={"train": 4, "val": 8, "test": 8}, latency_noise=0.0, **kwargs)


def _run(backend, policies, budgets=(100.0,), n_test=6, n_cal=4, seed=0, warmup=0):
    env = BudgetVLMEnv(backend, batch_size=1, group_size=1, split="test")
    return run_interleaved(backend, backend.dataset("test"), range(n_test), CONFIGS, budgets, env=env,
                           env_policies=policies, calibration_samples=backend.dataset("val"),
                           calibration_index=range(n_cal), seed=seed, warmup=warmup)


def test_calibration_samples_spread_evenly_over_the_rounds():
    assert calibration_rounds(4, 8) == [[0], [], [1], [], [2], [], [3], []]
    assert calibration_rounds(5, 2) == [[0, 1, 2], [3, 4]]
    assert sum(calibration_rounds(64, 600), []) == list(range(64))


def test_rounds_hold_every_kind_of_unit_in_a_seeded_shuffled_order():
    backend = _backend()
    controller = EnvPolicy("fixed", FixedPolicy(backend.knob_space, backend.d_model, CONFIGS[1], token=1.0), True)
    run = _run(backend, [controller], budgets=(60.0, 120.0))
    calls = backend.calls
    test_order = [i for split, i, _ in calls if split == "test"]
    assert test_order == sorted(test_order)  # one round after the other
    # round 0: 3 configs + 2 env episodes on test sample 0, and calibration sample 0's 3 configs
    round0 = calls[:8]
    assert sorted(c[:2] for c in round0) == [("test", 0)] * 5 + [("val", 0)] * 3
    assert sum(c[2] != 0 for c in round0) == 2  # the env policy's episodes (budget token 1) ...
    kinds = ["env" if c[2] else c[0] for c in round0]
    assert kinds != sorted(kinds, key=("test", "env", "val").index)  # ... are mixed in, not run as a block
    assert run.test.accuracy.shape == (6, 3) and run.calibration.accuracy.shape == (4, 3)
    assert run.episodes["fixed"].shape == (12,)  # budget-major: 2 budgets x 6 samples
    assert run.episodes["fixed"]["budget_ms"].tolist() == [60.0] * 6 + [120.0] * 6
    other = _backend()
    _run(other, [EnvPolicy("fixed", FixedPolicy(other.knob_space, other.d_model, CONFIGS[1], 1.0), True)],
         budgets=(60.0, 120.0), seed=1)
    assert [c[:2] for c in other.calls] != [c[:2] for c in calls]  # the seed orders the rounds
    assert sorted(c[:2] for c in other.calls) == sorted(c[:2] for c in calls)  # the same work


def test_drift_hits_the_table_and_the_env_policies_alike():
    # The machine slows down by 0.5% per request: over the run a request gets ~40% slower. A policy
    # that always picks one configuration must measure what the table measures for it.
    backend = _backend(drift=0.005)
    fixed = EnvPolicy("fixed", FixedPolicy(backend.knob_space, backend.d_model, CONFIGS[2]), True)
    run = _run(backend, [fixed], n_test=8, n_cal=8)
    table = run.test.latency[:, 2]
    env = run.episodes["fixed"]["episode", "latency_ms"].double()
    drift = float(run.test.latency[-1, 2] / run.test.latency[0, 2]) - 1  # includes per-sample differences
    assert drift > 0.1
    assert abs(float(env.mean() / table.mean()) - 1) < 0.03
    # an evaluation that measured the table first and ran the policy afterwards is ~20% off
    later = _backend(drift=0.005)
    table_first = _run(later, [], n_test=8, n_cal=8).test.latency[:, 2]
    env = BudgetVLMEnv(later, batch_size=1, group_size=1, split="test")
    after = torch.cat([run_episodes(env, fixed.policy, torch.tensor([i]), torch.tensor([100.0]))["episode", "latency_ms"]
                       for i in range(8)]).double()
    assert float(after.mean() / table_first.mean()) > 1.1


def test_an_unreadable_sample_is_dropped_from_every_policy():
    backend = _backend(unreadable={("test", 2), ("val", 1)})
    random = EnvPolicy("random", RandomPolicy(backend.knob_space, backend.d_model, seed=0), False)
    run = _run(backend, [random], budgets=(60.0, 120.0), n_test=4, n_cal=3)
    assert run.test.sample_index.tolist() == [0, 1, 3] and run.test.skipped == [2]
    assert run.calibration.sample_index.tolist() == [0, 2] and run.calibration.skipped == [1]
    assert run.episodes["random"]["sample_index"].tolist() == [0, 1, 3, 0, 1, 3]
    assert not run.episodes["random"]["substituted"].any()


def test_env_policies_need_a_batch_one_env():
    backend = _backend()
    env = BudgetVLMEnv(backend, batch_size=2, group_size=1, split="test")
    random = EnvPolicy("random", RandomPolicy(backend.knob_space, backend.d_model), False)
    with pytest.raises(ValueError, match="batch-1, group-1 env"):
        run_interleaved(backend, backend.dataset("test"), [0], CONFIGS, [100.0], env=env, env_policies=[random])
