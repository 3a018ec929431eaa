import pytest

from envs.knobs import KnobSpace, select_blocks


def test_select_blocks_keeps_prefix_and_most_important():
    scores = [9.0, 0.1, 0.2, 5.0, 4.0, 0.3, 3.0, 2.0]
    assert select_blocks(scores, insertion=2, num_blocks=5, num_layers=8) == [0, 1, 3, 4, 6]
    assert select_blocks(scores, insertion=2, num_blocks=8, num_layers=8) == list(range(8))
    assert select_blocks(scores, insertion=5, num_blocks=5, num_layers=8) == [0, 1, 2, 3, 4]


def test_every_combination_is_valid_for_every_p():
    ks = KnobSpace()
    for p in ks.insertion_positions:
        for n in ks.num_blocks_values:
            blocks = select_blocks(range(16), p, n, ks.num_layers)
            assert len(blocks) == n and blocks[:p] == list(range(p))


def test_bad_knob_space_is_rejected():
    with pytest.raises(ValueError, match="num_blocks_values"):
        KnobSpace(num_blocks_values=(12, 20))
    with pytest.raises(KeyError, match="unknown knob_space key"):
        KnobSpace.from_dict({"experts": 3})
    with pytest.raises(ValueError, match="NaN"):
        select_blocks([float("nan")] * 16, 1, 12, 16)
