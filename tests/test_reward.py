import math

import pytest
import torch

from envs.reward import RewardWeights, compute_reward
from envs.knobs import KnobSpace


def _hand(acc, lat, budget, complexity, a=1.0, b=0.5, g=10.0, e=0.05, d=0.1):
    r = lat / budget
    return a * acc - b / (1 + math.exp(-10 * (r - 1))) - g * max(r - 1, 0) ** 2 - e * complexity + d * max(0, 1 - r)


@pytest.mark.parametrize("acc,lat,budget,c", [(1.0, 50.0, 100.0, 0.5), (0.3, 120.0, 100.0, 1.0), (0.0, 100.0, 100.0, 0.0)])
def test_reward_matches_hand_computation(acc, lat, budget, c):
    got = compute_reward(torch.tensor(acc), torch.tensor(lat), torch.tensor(budget), torch.tensor(c))
    assert float(got) == pytest.approx(_hand(acc, lat, budget, c), abs=1e-6)


def test_reward_weights_from_config():
    w = RewardWeights.from_dict({"violation": 2.0})
    got = compute_reward(torch.tensor(1.0), torch.tensor(150.0), torch.tensor(100.0), torch.tensor(0.0), w)
    assert float(got) == pytest.approx(_hand(1.0, 150.0, 100.0, 0.0, g=2.0), abs=1e-6)
    with pytest.raises(KeyError, match="unknown reward weight"):
        RewardWeights.from_dict({"speed": 1.0})


def test_complexity_is_mean_of_normalised_knob_costs():
    ks = KnobSpace()
    assert ks.complexity(0, 4, 12) == 0.0
    assert ks.complexity(2, 8, 16) == 1.0
    assert ks.complexity(1, 6, 14) == pytest.approx(0.5)
