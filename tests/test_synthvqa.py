"""SynthVQA: determinism, split disjointness, family shares, vocabulary, image geometry, errors."""
import hashlib
import re
import time

import numpy as np
import pytest
from PIL import Image

from envs.data import synthvqa as sv
from envs.data.accuracy import normalize_answer
from envs.data.sample import VQASample
from envs.data.synthvqa import (
    ANSWER_SET, FAMILIES, IMAGE_SIZES, SPLITS, SynthVQA, answer_vocabulary, render_scene, tokenize_words, vocabulary,
)


def _image_hash(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _records(ds, n=None):
    return [ds.record(i) for i in range(n or len(ds))]


def test_samples_are_vqa_samples_in_vqa_format():
    ds = SynthVQA("train", 12, seed=0)
    for s in ds:
        assert isinstance(s, VQASample)
        assert s.dataset == "synthvqa" and s.family in FAMILIES
        assert len(s.answers) == 10 and len(set(s.answers)) == 1
        assert isinstance(s.question_id, int) and isinstance(s.image_id, str)
        image = s.image
        assert image.mode == "RGB" and image.size == IMAGE_SIZES[ds.size_index[s.question_id % 10**9]]
        assert _image_hash(sv.render(s)) == _image_hash(image)


def test_image_sizes_vary_in_size_and_aspect():
    ds = SynthVQA("test", 300, seed=0)
    sizes = {ds[i].image.size for i in range(len(ds))}
    assert sizes == set(IMAGE_SIZES)
    assert {w / h for w, h in sizes} >= {0.5, 1.0, 2.0}


def test_same_seed_is_identical_and_other_seeds_differ():
    a, b, c = SynthVQA("train", 40, seed=3), SynthVQA("train", 40, seed=3), SynthVQA("train", 40, seed=4)
    for x, y in zip(a, b):
        assert (x.question, x.answers, x.question_id, x.family, x.image_id) == \
            (y.question, y.answers, y.question_id, y.family, y.image_id)
        assert _image_hash(x.image) == _image_hash(y.image)
    assert [s.image_id for s in a].count(None) == 0
    assert len({s.image_id for s in a} & {s.image_id for s in c}) == 0
    assert sum(x.question != z.question for x, z in zip(a, c)) > 10


def test_splits_are_disjoint_in_images_questions_and_ids():
    sets = {split: SynthVQA(split, 300, seed=0) for split in SPLITS}
    seen_ids, seen_qids, seen_pairs = {}, {}, {}
    for split, ds in sets.items():
        recs = _records(ds)
        # The content hash that assigns splits agrees with the split every scene was generated for.
        assert all(sv.scene_split(r.scene) == (split, r.image_id) for r in recs)
        seen_ids[split] = {r.image_id for r in recs}
        seen_qids[split] = {s.question_id for s in ds}
        assert len(seen_qids[split]) == len(ds)
        seen_pairs[split] = {(_image_hash(render_scene(r.scene)), r.question) for r in recs[:120]}
    for i, s1 in enumerate(SPLITS):
        for s2 in SPLITS[i + 1:]:
            assert not seen_ids[s1] & seen_ids[s2]
            assert not seen_qids[s1] & seen_qids[s2]
            assert not {h for h, _ in seen_pairs[s1]} & {h for h, _ in seen_pairs[s2]}
    # Another seed's val split shares no image with seed 0's train split either.
    assert not {r.image_id for r in _records(SynthVQA("val", 100, seed=1))} & seen_ids["train"]


def test_family_shares_are_exact_and_configurable():
    ds = SynthVQA("train", 301, seed=5)
    counts = {f: sum(s.family == f for s in ds) for f in FAMILIES}
    assert counts == ds.family_counts and sorted(counts.values()) == [75, 75, 75, 76]
    # Families are shuffled over the indices, not laid out in blocks.
    assert len({ds.family(i) for i in range(20)}) == len(FAMILIES)
    custom = SynthVQA("val", 90, seed=5, family_weights={"coarse": 2, "reasoning": 1})
    assert custom.family_counts == {"coarse": 60, "detail": 0, "reasoning": 30, "knowledge": 0}
    assert {s.family for s in custom} == {"coarse", "reasoning"}


def test_every_template_occurs_and_answers_are_balanced_enough():
    recs = _records(SynthVQA("train", 900, seed=0))
    assert {r.template for r in recs} == set(sv.TEMPLATES)
    for r in recs:
        assert sv.TEMPLATES[r.template][0] == r.family
    yes = sum(r.answer == "yes" for r in recs)
    no = sum(r.answer == "no" for r in recs)
    assert abs(yes - no) < 0.3 * (yes + no)
    digits = [r.answer for r in recs if r.template == "box_digit"]
    assert len(set(digits)) == 10  # every digit occurs; no single one dominates
    assert max(digits.count(d) for d in set(digits)) < 0.3 * len(digits)


def test_vocabulary_covers_every_question_and_answer():
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab) and all(w == w.lower() and " " not in w for w in vocab)
    assert list(ANSWER_SET) == answer_vocabulary() and len(set(ANSWER_SET)) == len(ANSWER_SET)
    assert set(ANSWER_SET) <= vocab
    # Answers are already in the VQA metric's normal form (it strips articles, maps "two" -> "2").
    assert all(normalize_answer(a) == a for a in ANSWER_SET)
    for s in SynthVQA("test", 300, seed=2):
        assert s.answers[0] in ANSWER_SET
        assert set(tokenize_words(s.question)) <= vocab, s.question
        assert tokenize_words(s.answers[0]) == [s.answers[0]]


def test_tokenize_words_rule():
    assert tokenize_words("Which square is bigger, the red one or the Blue one?") == \
        ["which", "square", "is", "bigger", "the", "red", "one", "or", "the", "blue", "one"]
    assert tokenize_words("  how  many?  ") == ["how", "many"]


def _detail_records(n=300):
    return [r for r in _records(SynthVQA("train", n, seed=0, family_weights={"detail": 1}))]


def _target_glyph_index(rec):
    """Index in rec.scene.items of the glyph the question asks about."""
    items = rec.scene.items
    if rec.template == "label_digit":
        return 1  # the target shape comes first, its digit right after it
    box = next(it for it in items if isinstance(it, sv.Box))
    return next(i for i, it in enumerate(items) if isinstance(it, sv.Glyph)
                and box.x0 < it.x < box.x1 and box.y0 < it.y < box.y1)


def _swap_glyph(rec, index):
    """The scene with glyph `index` showing a different character of the same kind."""
    glyph = rec.scene.items[index]
    charset = sv.DIGITS if glyph.char in sv.DIGITS else sv.LETTERS
    other = charset[(charset.index(glyph.char) + 1) % len(charset)]
    items = list(rec.scene.items)
    items[index] = glyph._replace(char=other)
    return rec.scene._replace(items=tuple(items))


def test_detail_glyphs_are_small_and_answer_the_question():
    recs = _detail_records()
    assert {r.template for r in recs} == {"box_digit", "box_letter", "label_digit"}
    for rec in recs[:60]:
        index = _target_glyph_index(rec)
        assert rec.scene.items[index].char == rec.answer
        a = np.asarray(render_scene(rec.scene), np.int16)
        b = np.asarray(render_scene(_swap_glyph(rec, index)), np.int16)
        ys, xs = np.nonzero(np.abs(a - b).max(axis=2))
        assert len(ys), rec.question
        assert ys.max() - ys.min() + 1 <= 15 and xs.max() - xs.min() + 1 <= 17
    box_glyphs = [r for r in recs if r.template != "label_digit"]
    # One glyph per scene, boxed, among small plain shapes.
    assert all(sum(isinstance(it, sv.Glyph) for it in r.scene.items) == 1 for r in box_glyphs)
    assert all(sum(isinstance(it, sv.Shape) for it in r.scene.items) >= 1 for r in box_glyphs)


def _global_view(image, side=64):
    """The low tier's view: the whole image resized, aspect kept, into one 64-px crop."""
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BICUBIC)


def test_detail_glyphs_blur_together_at_the_low_tier():
    """Changing the glyph changes native pixels a lot and the 64-px low-tier view very little
    (on images whose long side is >= 160 px, i.e. the global view is <= 0.4 x; 128-px images keep
    some glyph signal at 0.5 x, as a small photo of text does)."""
    def low(image):
        return np.asarray(_global_view(image), np.float32)

    native_diff, low_diff = [], []
    for rec in [r for r in _detail_records(240) if max(r.scene.width, r.scene.height) >= 160][:40]:
        index = _target_glyph_index(rec)
        a, b = render_scene(rec.scene), render_scene(_swap_glyph(rec, index))
        native_diff.append(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
        low_diff.append(np.abs(low(a) - low(b)).max())
    assert np.median(native_diff) > 60
    assert np.median(low_diff) < 0.25 * np.median(native_diff)


def test_coarse_objects_are_large_and_answer_the_question():
    recs = _records(SynthVQA("val", 120, seed=0, family_weights={"coarse": 1}))
    for rec in recs:
        big, *distractors = rec.scene.items
        scale = max(rec.scene.width, rec.scene.height) / sv.REFERENCE_SIDE
        assert isinstance(big, sv.Shape) and 40 <= big.size <= 120 * scale
        assert big.size >= min(60 * scale, min(rec.scene.width, rec.scene.height) - 8)
        assert all(isinstance(d, sv.Shape) and d.size <= 12 for d in distractors)
        assert rec.answer == (big.kind if rec.template == "big_shape" else _color_name(big.color))
        # The low-tier view (the whole image in 64 px) still shows the object's colour at its centre.
        low = _global_view(render_scene(rec.scene))
        view_scale = low.width / rec.scene.width
        centre = (min(low.width - 1, int(big.cx * view_scale)), min(low.height - 1, int(big.cy * view_scale)))
        assert _color_name(low.getpixel(centre)) == _color_name(big.color)


def _color_name(rgb):
    return min(sv.COLORS, key=lambda n: sum((a - b) ** 2 for a, b in zip(sv.COLORS[n], rgb)))


def _referent(shapes, color, kind):
    matches = [s for s in shapes if s.kind == kind and _color_name(s.color) == color]
    assert len(matches) == 1, (color, kind)
    return matches[0]


def test_reasoning_answers_follow_from_the_scene():
    recs = _records(SynthVQA("train", 600, seed=0, family_weights={"reasoning": 1}))
    for rec in recs:
        shapes = rec.scene.items
        scale = max(rec.scene.width, rec.scene.height) / sv.REFERENCE_SIDE
        assert all(isinstance(s, sv.Shape) and s.size >= 16 * scale - 1 for s in shapes)
        words = tokenize_words(rec.question)
        if rec.template == "count_shape":
            kind = words[2][:-1]
            assert rec.answer == str(sum(s.kind == kind for s in shapes))
        elif rec.template == "count_color":
            assert rec.answer == str(sum(_color_name(s.color) == words[2] for s in shapes))
        elif rec.template in ("left_of", "above"):
            m = re.match(r"is the (\w+) (\w+) (?:left of|above) the (\w+) (\w+)\?", rec.question)
            a, b = _referent(shapes, *m.group(1, 2)), _referent(shapes, *m.group(3, 4))
            pa, pb = (a.cx, b.cx) if rec.template == "left_of" else (a.cy, b.cy)
            assert abs(pa - pb) >= 16 * scale and rec.answer == ("yes" if pa < pb else "no")
        elif rec.template == "more_often":
            names = [_color_name(s.color) for s in shapes]
            counts = sorted(((names.count(c), c) for c in set(names)), reverse=True)
            assert counts[0][0] > counts[1][0] and rec.answer == counts[0][1]
        else:  # bigger
            m = re.match(r"which (\w+) is bigger, the (\w+) one or the (\w+) one\?", rec.question)
            a, b = _referent(shapes, m.group(2), m.group(1)), _referent(shapes, m.group(3), m.group(1))
            assert max(a.size, b.size) >= 1.5 * min(a.size, b.size)
            assert rec.answer == (m.group(2) if a.size > b.size else m.group(3))


def test_sequence_protocol():
    ds = SynthVQA("test", 7, seed=1)
    assert len(ds) == 7 and ds[-1].question_id == ds[6].question_id
    assert [s.question_id for s in ds[2:5]] == [ds[i].question_id for i in range(2, 5)]
    with pytest.raises(IndexError):
        ds[7]


def test_render_is_fast():
    ds = SynthVQA("train", 60, seed=0)
    scenes = [ds.record(i).scene for i in range(len(ds))]
    start = time.perf_counter()
    for scene in scenes:
        render_scene(scene)
    assert (time.perf_counter() - start) / len(scenes) < 0.01  # ~0.4 ms on one CPU core


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "training", "num_samples": 5}, r"split='training'.*\('train', 'val', 'test'\)"),
    ({"split": "train", "num_samples": 0}, r"num_samples=0"),
    ({"split": "train", "num_samples": -3}, r"num_samples=-3"),
    ({"split": "train", "num_samples": 5, "seed": -1}, r"seed=-1"),
    ({"split": "train", "num_samples": 5, "family_weights": {"counting": 1}},
     r"family_weights.*'counting'.*\('coarse', 'detail', 'reasoning', 'knowledge'\)"),
    ({"split": "train", "num_samples": 5, "family_weights": {"detail": -1}}, r"family_weights\['detail'\]=-1"),
    ({"split": "train", "num_samples": 5, "family_weights": {"detail": 0}}, r"at least one weight > 0"),
])
def test_bad_input_raises_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthVQA(**kwargs)


def test_knowledge_answers_are_the_tables_fact_about_the_big_object():
    recs = _records(SynthVQA("train", 200, seed=0, family_weights={"knowledge": 1}))
    for r in recs:
        big = max((i for i in r.scene.items if isinstance(i, sv.Shape)), key=lambda s: s.size)
        relation = re.fullmatch(r"what is fact (\w \d) of the big shape\?", r.question).group(1)
        color = min(sv.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(sv.COLORS[c], big.color)))
        assert r.answer == sv.KNOWLEDGE_TABLE[(color, big.kind, relation)]
    # every (colour, shape, relation) has a fact, and the answers are balanced over the answer set
    assert len(sv.KNOWLEDGE_TABLE) == len(sv.COLOR_NAMES) * len(sv.SHAPES) * sv.KNOWLEDGE_NUM_RELATIONS
    counts = [list(sv.KNOWLEDGE_TABLE.values()).count(a) for a in sv.KNOWLEDGE_ANSWERS]
    assert max(counts) - min(counts) <= 1
