"""Answer scoring: the official VQA accuracy (VQAv2 / OK-VQA / TextVQA) and SynthVQA exact match.

Normalisation follows the VQA evaluation script used by the VQAv2 challenge (and, through the
same answer processor, by TextVQA's EvalAI evaluation): punctuation rules, lower case, number
words to digits, articles dropped, apostrophe-less contractions restored.

One deliberate difference: the official script normalises only the prediction fully and gives the
references punctuation processing alone, because the VQAv2 / OK-VQA annotation files already hold
normalised answers. TextVQA's references are raw text ("Nokia", "Two"), so here both sides get the
full normalisation; on VQAv2 / OK-VQA references that is a no-op, on TextVQA it is what its
evaluator does.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from envs.data.sample import VQASample

# Replaced by a space, or removed when they touch a space or the text has a digit-comma-digit
# ("1,000"). Apostrophes, colons and periods are not in the official list; periods have their own rule.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a typo'd lookbehind that never
# excludes anything, so the effective rule is "drop every period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table maps every spelling of these words that misses exactly one
# apostrophe to the full spelling ("dont" -> "don't", "couldnt've" -> "couldn't've"). It leaves
# out contractions whose apostrophe-less spelling is a word of its own (it's/its, we'll/well,
# she'd/shed, i'm/im - its "I" entries are capitalised and never match lower-cased text). Its one
# reversed entry ("somebody'd" -> "somebodyd") is written the right way round here; since both
# sides are normalised, the two spellings match either way.
_CONTRACTIONS_WITH_APOSTROPHES = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're
there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _one_apostrophe_dropped(word: str) -> list[str]:
    return [word[:i] + word[i + 1:] for i, ch in enumerate(word) if ch == "'"]


_CONTRACTIONS = {
    variant: word for word in _CONTRACTIONS_WITH_APOSTROPHES for variant in _one_apostrophe_dropped(word)
}

_ANSWER_PREFIX = re.compile(r"^\s*answer\s*:\s*", re.IGNORECASE)
_TRAILING_PUNCTUATION = " \t.,;:!?"

MODES = ("official", "molmo")


def _process_punctuation(text: str) -> str:
    # Decided on the input text, per character, as the official script does.
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if remove_all or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation ("Two dogs." -> "2 dogs", "The dont" -> "don't")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: str = "official") -> float:
    """VQA accuracy of `prediction` against the reference answers (10 in the official datasets).

    official: the mean, over the leave-one-out subsets of the references, of min(1, matches / 3);
              with 10 references, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.
    molmo:    min(1, matches / 3) over all references (1 -> 1/3, 2 -> 2/3, 3 or more -> 1.0).
    Matches are counted after normalize_answer on both sides.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not known; expected one of {MODES}")
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers={answers!r}: expected a non-empty sequence of reference strings")
    pred = normalize_answer(prediction)
    n = len(answers)
    m = sum(normalize_answer(a) == pred for a in answers)
    if mode == "molmo":
        return min(1.0, m / 3)
    # Closed form of the official loop: leaving out one of the m matching references leaves m - 1
    # matches, leaving out one of the n - m others leaves m.
    return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def extract_answer(generated_text: str) -> str:
    """The short answer in a model's output: drop a leading "Answer:", keep the first non-empty
    line, strip trailing sentence punctuation and whitespace."""
    text = _ANSWER_PREFIX.sub("", generated_text)
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    return first_line.strip().rstrip(_TRAILING_PUNCTUATION)


def score_answer(prediction: str, sample: VQASample) -> float:
    """The sample's own metric for an already extracted answer (see extract_answer).

    SynthVQA: 1.0 / 0.0 exact match against the majority reference (ties: the first listed),
    both normalised. Every other dataset: the official VQA accuracy.
    """
    if not sample.answers:
        raise ValueError(f"{sample.dataset} question_id={sample.question_id!r} has no reference answers")
    if sample.dataset == "synthvqa":
        majority, _ = Counter(normalize_answer(a) for a in sample.answers).most_common(1)[0]
        return float(normalize_answer(prediction) == majority)
    return vqa_accuracy(prediction, sample.answers)
