"""Official VQA loaders, mixtures, prompts and skipped-sample counting, on tiny fixture files."""
import io
import json
import logging
import pickle
import sys

import pytest
from PIL import Image

from envs.data import vqa
from envs.data.sample import ImageLoadError, VQASample
from envs.data.vqa import (
    DEFAULT_PROMPT_TEMPLATES,
    format_prompt,
    load_vqa_dataset,
    load_vqa_mixture,
    log_skip_summary,
    mix_datasets,
    record_skipped,
    skipped_by_dataset,
    skipped_count,
)


@pytest.fixture(autouse=True)
def _fresh_skip_counter():
    vqa.reset_skipped()
    yield
    vqa.reset_skipped()


def _write_image(path, size=(8, 6), mode="L", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128).save(path, format=fmt)


def _ten(*answers):
    return list(answers) + [answers[-1]] * (10 - len(answers))


def write_textvqa(root, split, entries):
    """entries: (question_id, image_id, question, answers)."""
    data = [
        {"question": q, "image_id": img, "image_classes": ["Sign"], "flickr_original_url": "",
         "flickr_300k_url": "", "image_width": 8, "image_height": 6, "answers": answers,
         "question_tokens": q.split(), "question_id": qid, "set_name": split}
        for qid, img, q, answers in entries
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps(
        {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    for _, img, _, _ in entries:
        _write_image(root / "train_images" / f"{img}.jpg")


def write_coco_vqa(root, split, entries, prefix="v2_"):
    """VQAv2 (prefix "v2_") or OK-VQA (prefix "") files; entries: (question_id, image_id, question, answers)."""
    sub = f"{split}2014"
    questions = [{"image_id": img, "question": q, "question_id": qid} for qid, img, q, _ in entries]
    annotations = [
        {"question_type": "what", "multiple_choice_answer": answers[0] if answers else "", "image_id": img,
         "answer_type": "other", "question_id": qid,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
        for qid, img, _, answers in entries
    ]
    (root / f"{prefix}OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": sub,
         "questions": questions}))
    (root / f"{prefix}mscoco_{sub}_annotations.json").write_text(json.dumps(
        {"info": {}, "license": {}, "data_subtype": sub, "data_type": "mscoco", "annotations": annotations}))
    for _, img, _, _ in entries:
        _write_image(root / sub / f"COCO_{sub}_{img:012d}.jpg")


@pytest.fixture
def data_root(tmp_path):
    write_textvqa(tmp_path, "train", [
        (0, "0054c91397f2fe05", "what is the brand of phone?", _ten("Nokia", "nokia")),
        (1, "005635e119b9f32f", "what does the sign say?", _ten("STOP", "stop")),
        (2, "0054c91397f2fe05", "what color is the phone?", _ten("black")),
    ])
    write_coco_vqa(tmp_path, "train", [
        (458752000, 458752, "What is this photo taken looking through?", _ten("net", "netting")),
        (458752001, 458752, "What position is this man playing?", _ten("pitcher", "catcher")),
        (262146000, 262146, "What color is the snow?", _ten("white")),
    ])
    write_coco_vqa(tmp_path, "val", [(42000, 42, "How many dogs?", _ten("2", "two"))])
    write_coco_vqa(tmp_path, "train", [
        (51606, 51606, "What is the hairstyle of the blond called?", _ten("pony tail", "ponytail")),
        (3010, 301, "What sport is this?", _ten("tennis")),
    ], prefix="")
    return tmp_path


def test_text_vqa_official_json(data_root):
    ds = load_vqa_dataset("text_vqa", data_root, "train")
    assert len(ds) == 3 and ds.name == "text_vqa" and ds.split == "train"
    sample = ds[0]
    assert isinstance(sample, VQASample)
    assert (sample.question, sample.question_id, sample.image_id) == ("what is the brand of phone?", 0,
                                                                      "0054c91397f2fe05")
    assert sample.dataset == "text_vqa" and sample.answers == _ten("Nokia", "nokia")
    image = sample.image
    assert image.mode == "RGB" and image.size == (8, 6)  # a grayscale JPEG comes back as RGB
    assert [s.question_id for s in ds] == [0, 1, 2]
    assert [s.question_id for s in ds[1:]] == [1, 2] and ds[-1].question_id == 2


def test_coco_2014_vqa_and_okvqa_official_json(data_root):
    train = load_vqa_dataset("coco_2014_vqa", data_root, "train")
    assert [s.question_id for s in train] == [458752000, 458752001, 262146000]
    assert train[1].answers == _ten("pitcher", "catcher") and train[1].image_id == 458752
    assert train[2].image.size == (8, 6)
    assert train[2].image_loader.path.endswith("train2014/COCO_train2014_000000262146.jpg")
    val = load_vqa_dataset("coco_2014_vqa", data_root, "val")
    assert val[0].image_loader.path.endswith("val2014/COCO_val2014_000000000042.jpg")
    assert val[0].dataset == "coco_2014_vqa" and val[0].image.mode == "RGB"
    ok = load_vqa_dataset("okvqa", data_root, "train")
    assert [(s.dataset, s.question_id) for s in ok] == [("okvqa", 51606), ("okvqa", 3010)]
    assert ok[0].answers == _ten("pony tail", "ponytail")


def test_per_dataset_root_overrides_data_root(tmp_path):
    write_textvqa(tmp_path / "textvqa", "val", [(7, "abc", "what?", _ten("x"))])
    ds = load_vqa_dataset("text_vqa", tmp_path / "nowhere", "val", root=tmp_path / "textvqa")
    assert [s.question_id for s in ds] == [7] and ds[0].image.size == (8, 6)


def test_unknown_name_and_split(data_root):
    with pytest.raises(ValueError, match=r"name='vqav2' is not known.*'text_vqa', 'coco_2014_vqa', 'okvqa'"):
        load_vqa_dataset("vqav2", data_root, "train")
    with pytest.raises(ValueError, match=r"split='test'.*\('train', 'val'\)"):
        load_vqa_dataset("okvqa", data_root, "test")


def test_missing_files_name_the_path_and_the_layout(data_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_vqa_dataset("text_vqa", empty, "val")
    message = str(err.value)
    assert str(empty / "TextVQA_0.5.1_val.json") in message and "train_images/{image_id}.jpg" in message
    assert "parquet" in message

    (data_root / "mscoco_train2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="mscoco_train2014_annotations.json does not exist"):
        load_vqa_dataset("okvqa", data_root, "train")

    for image in (data_root / "val2014").iterdir():
        image.unlink()
    (data_root / "val2014").rmdir()
    with pytest.raises(FileNotFoundError, match=r"val2014 does not exist.*COCO_val2014_\{image_id:012d\}\.jpg"):
        load_vqa_dataset("coco_2014_vqa", data_root, "val")


def test_questions_without_answers_are_an_error(tmp_path):
    write_textvqa(tmp_path, "train", [(1, "a", "q?", _ten("x")), (2, "b", "q?", [])])
    with pytest.raises(ValueError, match="text_vqa question_id=2 .* has no answers"):
        load_vqa_dataset("text_vqa", tmp_path, "train")

    write_coco_vqa(tmp_path, "train", [(5, 5, "q?", _ten("x"))])
    questions = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    content = json.loads(questions.read_text())
    content["questions"].append({"image_id": 5, "question": "unannotated?", "question_id": 6})
    questions.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="coco_2014_vqa question_id=6 in .*annotations.json has no answers"):
        load_vqa_dataset("coco_2014_vqa", tmp_path, "train")


def test_malformed_json_names_the_file_and_field(tmp_path):
    (tmp_path / "train_images").mkdir()
    path = tmp_path / "TextVQA_0.5.1_train.json"
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match=r"expected a JSON object with a 'data' list .*found \['questions'\]"):
        load_vqa_dataset("text_vqa", tmp_path, "train")
    path.write_text(json.dumps({"data": [{"question": "q?", "image_id": "a", "answers": ["x"]}]}))
    with pytest.raises(ValueError, match="entry 0 has no 'question_id' field"):
        load_vqa_dataset("text_vqa", tmp_path, "train")


def test_images_load_lazily_and_datasets_pickle(data_root, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    ds = load_vqa_dataset("coco_2014_vqa", data_root, "train")
    samples = list(ds)
    assert opened == []
    samples[1].image
    assert len(opened) == 1 and opened[0].endswith("COCO_train2014_000000458752.jpg")
    assert pickle.loads(pickle.dumps(ds))[2].image.size == (8, 6)


def test_corrupt_or_missing_image_raises_and_is_counted(data_root, caplog):
    ds = load_vqa_dataset("text_vqa", data_root, "train")
    (data_root / "train_images" / "005635e119b9f32f.jpg").write_bytes(b"not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="JPEG")
    (data_root / "train_images" / "0054c91397f2fe05.jpg").write_bytes(buf.getvalue()[:200])  # truncated

    caplog.set_level(logging.WARNING, logger="envs.data.vqa")
    for sample in ds:
        with pytest.raises(ImageLoadError) as err:
            sample.image
        assert sample.image_loader.path in str(err.value) and f"question_id={sample.question_id!r}" in str(err.value)
        record_skipped(sample, err.value)
    (data_root / "train_images" / "005635e119b9f32f.jpg").unlink()
    with pytest.raises(ImageLoadError, match="005635e119b9f32f.jpg for text_vqa question_id=1"):
        ds[1].image
    assert record_skipped(ds[1], "missing") == 4

    assert skipped_count() == 4 and skipped_count("text_vqa") == 4 and skipped_count("okvqa") == 0
    assert skipped_by_dataset() == {"text_vqa": 4}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "question_id=0" in warnings[0].getMessage()  # first skip only
    assert log_skip_summary() == 4
    assert "skipped 4 sample(s)" in caplog.records[-1].getMessage()


def _fake(dataset, n):
    return [VQASample(question=f"{dataset}{i}", answers=["x"] * 10, question_id=i, dataset=dataset,
                      image_loader=lambda: None) for i in range(n)]


def _ids(samples):
    return [(s.dataset, s.question_id) for s in samples]


def test_mix_default_is_proportional_to_size():
    datasets = {"a": _fake("a", 30), "b": _fake("b", 10)}
    union = mix_datasets(datasets, seed=0)
    assert sorted(_ids(union)) == sorted(_ids(datasets["a"] + datasets["b"]))
    capped = mix_datasets(datasets, num_samples=8, seed=0)
    assert len(capped) == 8 and sum(s.dataset == "a" for s in capped) == 6  # 30:10 -> 6:2
    assert len(set(_ids(capped))) == 8


def test_mix_weights_and_caps(caplog):
    datasets = {"a": _fake("a", 20), "b": _fake("b", 20)}
    mixed = mix_datasets(datasets, weights={"a": 3, "b": 1}, num_samples=8, seed=1)
    assert [s.dataset for s in mixed].count("a") == 6 and len(mixed) == 8
    # Without a cap the weights alone decide: all of a (20) and a third as much of b.
    assert [s.dataset for s in mix_datasets(datasets, {"a": 0.75, "b": 0.25}, None, 1)].count("b") == 6
    # A small dataset with a large weight limits the total rather than repeating samples.
    small = {"a": _fake("a", 100), "b": _fake("b", 5)}
    with caplog.at_level(logging.WARNING, logger="envs.data.vqa"):
        limited = mix_datasets(small, weights={"a": 1, "b": 1}, num_samples=50, seed=0)
    assert len(limited) == 10 and len(set(_ids(limited))) == 10 and "allow 10 samples" in caplog.text
    assert {s.dataset for s in mix_datasets(small, {"a": 1, "b": 0}, 7, 0)} == {"a"}


def test_mix_is_deterministic_by_seed():
    datasets = {"a": _fake("a", 50), "b": _fake("b", 50)}
    first = _ids(mix_datasets(datasets, None, 20, seed=3))
    assert first == _ids(mix_datasets(dict(reversed(datasets.items())), None, 20, seed=3))
    assert first != _ids(mix_datasets(datasets, None, 20, seed=4))
    # Adding a dataset leaves the others' picks unchanged.
    with_c = mix_datasets({**datasets, "c": _fake("c", 50)}, {"a": 1, "b": 1, "c": 1}, 30, seed=3)
    assert {i for i in _ids(with_c) if i[0] == "a"} == {i for i in first if i[0] == "a"}


def test_mix_bad_arguments():
    datasets = {"a": _fake("a", 5), "b": _fake("b", 0)}
    with pytest.raises(ValueError, match=r"weights name \['a'\] but the datasets are \['a', 'b'\]"):
        mix_datasets(datasets, {"a": 1}, None, 0)
    with pytest.raises(ValueError, match=r"weights\['a'\]=-1"):
        mix_datasets(datasets, {"a": -1, "b": 0}, None, 0)
    with pytest.raises(ValueError, match="'b' is empty but weights"):
        mix_datasets(datasets, {"a": 1, "b": 1}, None, 0)
    with pytest.raises(ValueError, match="num_samples=-2"):
        mix_datasets(datasets, None, -2, 0)
    with pytest.raises(ValueError, match="datasets is empty"):
        mix_datasets({}, None, None, 0)


def test_load_vqa_mixture(data_root, tmp_path):
    mixed = load_vqa_mixture(["text_vqa", "coco_2014_vqa", "okvqa"], data_root, "train", num_samples=4, seed=0)
    assert len(mixed) == 4 and {s.dataset for s in mixed} <= {"text_vqa", "coco_2014_vqa", "okvqa"}
    assert mixed[0].image.mode == "RGB"
    write_textvqa(tmp_path / "tv", "train", [(9, "z", "q?", _ten("y"))])
    only = load_vqa_mixture(["text_vqa"], tmp_path / "nowhere", "train", roots={"text_vqa": tmp_path / "tv"})
    assert _ids(only) == [("text_vqa", 9)]
    with pytest.raises(ValueError, match=r"roots name \['okvqa'\]"):
        load_vqa_mixture(["text_vqa"], data_root, "train", roots={"okvqa": data_root})
    with pytest.raises(ValueError, match="not one string"):
        load_vqa_mixture("text_vqa", data_root, "train")


def test_format_prompt():
    sample = _fake("okvqa", 1)[0]
    assert format_prompt(sample) == "okvqa0\nAnswer the question using a single word or phrase."
    assert set(DEFAULT_PROMPT_TEMPLATES) == {"text_vqa", "coco_2014_vqa", "okvqa", "synthvqa"}
    assert format_prompt(sample, {"okvqa": "Q: {question} {not a field} A:"}) == "Q: okvqa0 {not a field} A:"
    with pytest.raises(ValueError, match="no {question} placeholder"):
        format_prompt(sample, {"okvqa": "Answer briefly."})
    with pytest.raises(ValueError, match="no prompt template for dataset 'gqa'"):
        format_prompt(_fake("gqa", 1)[0])


def test_parquet_present_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "okvqa" / "data").mkdir(parents=True)
    (tmp_path / "okvqa" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"train-00000-of-00001.parquet.*needs pyarrow.*budgetvlm\[parquet\]"):
        load_vqa_dataset("okvqa", tmp_path, "train")


def test_hugging_face_parquet_export(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    png = io.BytesIO()
    Image.new("L", (5, 4), color=7).save(png, format="PNG")
    table = pa.table({
        "question_id": [11, 12, 13],
        "question": ["a?", "b?", "c?"],
        "image_id": ["i1", "i2", "i3"],
        "answers": [_ten("Yes"), _ten("no"), _ten("2")],
        "image": [{"bytes": png.getvalue(), "path": "i1.png"}, {"bytes": b"garbage", "path": "i2.png"},
                  {"bytes": png.getvalue(), "path": "i3.png"}],
    })
    folder = tmp_path / "text_vqa" / "data"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "validation-00000-of-00001.parquet", row_group_size=2)
    ds = load_vqa_dataset("text_vqa", tmp_path, "val")
    assert [(s.question_id, s.image_id, s.answers[0]) for s in ds] == [(11, "i1", "Yes"), (12, "i2", "no"), (13, "i3", "2")]
    assert ds[2].image.mode == "RGB" and ds[2].image.size == (5, 4)  # second row group
    with pytest.raises(ImageLoadError, match=r"row group 0, row 1\) for text_vqa question_id=12"):
        ds[1].image
    with pytest.raises(FileNotFoundError):
        load_vqa_dataset("text_vqa", tmp_path, "train")  # only a validation export exists
