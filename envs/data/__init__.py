"""Datasets (SynthVQA, official VQA formats) and their answer metrics."""
from envs.data.sample import ImageLoadError, VQASample

__all__ = ["ImageLoadError", "VQASample"]
from envs.data.accuracy import extract_answer, normalize_answer, score_answer, vqa_accuracy
from envs.data.vqa import (
    DEFAULT_PROMPT_TEMPLATES,
    VQADataset,
    format_prompt,
    load_vqa_dataset,
    load_vqa_mixture,
    log_skip_summary,
    mix_datasets,
    record_skipped,
    reset_skipped,
    skipped_by_dataset,
    skipped_count,
)

__all__ += [
    "extract_answer", "normalize_answer", "score_answer", "vqa_accuracy",
    "DEFAULT_PROMPT_TEMPLATES", "VQADataset", "format_prompt", "load_vqa_dataset", "load_vqa_mixture",
    "log_skip_summary", "mix_datasets", "record_skipped", "reset_skipped", "skipped_by_dataset", "skipped_count",
]
from envs.data.synthvqa import (
    ANSWER_SET, FAMILIES, IMAGE_SIZES, SynthVQA, answer_vocabulary, render_scene, tokenize_words, vocabulary,
)

__all__ += [
    "ANSWER_SET", "FAMILIES", "IMAGE_SIZES", "SynthVQA", "answer_vocabulary", "render_scene", "tokenize_words",
    "vocabulary",
]
