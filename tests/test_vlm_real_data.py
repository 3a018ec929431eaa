"""The VLM backend reads real VQA datasets from their official files and scores with VQA accuracy."""
import json

import pytest
import torch
from PIL import Image

from envs import make_env
from envs.data import extract_answer, vqa_accuracy
from envs.backends.vlm import VLMBackend
from helpers import make_tiny_model_dir as make_model_dir


def _write_okvqa(root, n=4):
    (root / "val2014").mkdir(parents=True)
    questions, annotations = [], []
    for i in range(n):
        image_id = 100 + i
        Image.new("RGB", (40, 32), (30 * i, 80, 160)).save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
        questions.append({"image_id": image_id, "question": "what color is the big shape?", "question_id": 10 * i})
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                   for j, a in enumerate(["red"] * 6 + ["blue"] * 4)]
        annotations.append({"question_id": 10 * i, "image_id": image_id, "answers": answers,
                            "answer_type": "other", "question_type": "what"})
    (root / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def test_vlm_backend_on_official_okvqa_files(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    _write_okvqa(tmp_path / "data")
    backend = VLMBackend(model_path=model_dir, dataset_names=("okvqa",), data_root=tmp_path / "data",
                         num_samples={"val": 3}, dataset_weights={"okvqa": 1.0}, max_new_tokens=2)
    samples = backend.dataset("val")
    assert len(samples) == 2 and all(s.dataset == "okvqa" for s in samples)
    # val and test are disjoint halves of the official val split (which has 4 questions here)
    test_ids = {s.question_id for s in backend.dataset("test")}
    assert len(test_ids) == 2 and not test_ids & {s.question_id for s in samples}
    # one episode through the env, then one directly: scored by the official VQA accuracy
    env = make_env(backend, batch_size=1, group_size=2, split="val")
    td = env.rand_action(env.reset())
    td = env.rand_action(env.step(td)["next"])
    acc = env.step(td)["next", "episode", "accuracy"]
    assert acc.shape == (2, 1) and ((acc >= 0) & (acc <= 1)).all()
    ep = backend.start_episode(samples[0], "low", torch.zeros(backend.d_model))
    backend.run_to(ep, 1)
    result = backend.finish(ep, 4, backend.knob_space.num_blocks_values[0])
    expected = vqa_accuracy(extract_answer(result.answer), samples[0].answers)
    assert result.accuracy == expected
    assert vqa_accuracy("Red.", samples[0].answers) == 1.0  # the metric the backend uses normalises


def test_prompt_templates_come_from_config(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    _write_okvqa(tmp_path / "data", n=2)
    backend = VLMBackend(model_path=model_dir, dataset_names=("okvqa",), data_root=tmp_path / "data",
                         num_samples={"val": 1}, prompt_templates={"okvqa": "Q: {question} A:"})
    assert backend.prompt(backend.dataset("val")[0]) == "Q: what color is the big shape? A:"


def test_unknown_dataset_name_is_named(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    with pytest.raises(ValueError, match=r"unknown dataset\(s\) \['foo'\]"):
        VLMBackend(model_path=model_dir, dataset_names=("okvqa", "foo"), data_root=tmp_path)
