"""The official VQA accuracy, its normalisation, answer extraction and per-dataset scoring."""
import pytest

from envs.data.accuracy import extract_answer, normalize_answer, score_answer, vqa_accuracy
from envs.data.sample import VQASample


def official_loop(prediction, answers):
    """The official script's leave-one-out loop, written out, on normalised strings."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    accs = []
    for left_out in range(len(refs)):
        others = refs[:left_out] + refs[left_out + 1:]
        accs.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # the official number map stops at ten
        ("The red car", "red car"),
        ("an apple a day", "apple day"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("its", "its"),  # a word of its own: not in the contraction table
        ("im", "im"),
        ("Yes!", "yes"),
        ("left-handed", "left handed"),  # punctuation inside a word becomes a space
        ("hello , world", "hello world"),  # next to a space it is removed
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),  # a digit-comma-digit removes every punctuation mark
        ("3.5", "3.5"),  # a period before a digit stays
        ("mr. smith.", "mr smith"),
        ("e.g.", "eg"),
        ("  new\tyork\n", "new york"),
        ("Nokia", "nokia"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_official_accuracy_by_number_of_matching_references(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    assert vqa_accuracy("2", answers) == pytest.approx(official_loop("2", answers))


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("two", ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"], 0.6),  # number words
        ("the red car", ["red car"] * 3 + ["blue car"] * 7, 0.9),  # articles
        ("Red car.", ["red car"] * 3 + ["blue car"] * 7, 0.9),  # case and final period
        ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # contractions
        ("nokia", ["Nokia", "NOKIA", "nokia"] + ["samsung"] * 7, 0.9),  # references differing in case
        ("coca-cola", ["coca cola"] + ["pepsi"] * 9, 0.3),  # punctuation inside a word
    ],
)
def test_official_accuracy_normalises_both_sides(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_official_closed_form_matches_the_loop_on_mixed_references():
    answers = ["yes", "Yes", "yes.", "no", "maybe", "yes", "no", "no", "maybe", "YES"]
    for prediction in ("yes", "no", "maybe", "nope"):
        assert vqa_accuracy(prediction, answers) == pytest.approx(official_loop(prediction, answers))


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (9, 1.0)])
def test_molmo_accuracy(matches, expected):
    answers = ["Two"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", answers, mode="molmo") == pytest.approx(expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode='vqav1'.*official"):
        vqa_accuracy("2", ["2"] * 10, mode="vqav1")
    with pytest.raises(ValueError, match="non-empty sequence"):
        vqa_accuracy("2", [])
    with pytest.raises(ValueError, match="non-empty sequence"):
        vqa_accuracy("2", "2")


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("Answer: Two dogs.\nThere are two dogs in the picture.", "Two dogs"),
        ("  answer:yes", "yes"),
        ("ANSWER:\nblue!\n", "blue"),
        ("\n\n3.5 meters;  \nmore", "3.5 meters"),
        ("c++", "c++"),
        ("", ""),
    ],
)
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


def _sample(dataset, answers):
    return VQASample(question="q", answers=answers, question_id=1, dataset=dataset, image_loader=lambda: None)


def test_score_answer_synthvqa_is_exact_match_against_the_majority():
    sample = _sample("synthvqa", ["Three"] * 6 + ["4"] * 4)
    assert score_answer("3", sample) == 1.0
    assert score_answer("three.", sample) == 1.0
    assert score_answer("4", sample) == 0.0  # 4 of 10 references, but not the majority


def test_score_answer_real_datasets_use_official_accuracy():
    sample = _sample("text_vqa", ["Nokia"] * 2 + ["samsung"] * 8)
    assert score_answer("nokia", sample) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="question_id=1 has no reference answers"):
        score_answer("x", _sample("okvqa", []))
