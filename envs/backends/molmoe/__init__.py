"""MolmoE-1B (allenai/MolmoE-1B-0924) as a native backend: a port that loads the published checkpoint.

No transformers release has a MolmoE model and the checkpoint's remote code does not run on
transformers 5, so this package carries its own port, checked against the reference fixture
(tests/test_molmoe_parity.py): token ids, image-token positions, processor tensors, vision
features, per-block hidden states, logits and greedy tokens.

Public API
----------
load(model_dir, device="cpu", dtype=torch.float32) -> (MolmoE, MolmoETokenizer)
    model_dir as published: config.json (model_type "molmo"), preprocessor_config.json,
    tokenizer.json, model.safetensors or model.safetensors.index.json + its shards. Every
    missing file, and every missing, unexpected or mis-shaped weight key, is an error naming the
    file and the keys, raised before any tensor is read.
MolmoE.generate(inputs, max_new_tokens) -> (greedy ids, last prefill logits)   the reference forward
preprocess(image_uint8_chw, text_ids, bos_id, max_crops, cfg, image_token_ids) -> MolmoEInputs
select_tiling(h, w, window, max_crops)    Molmo's crop-grid rule
MolmoEBackend(model_path, results_dir=None, dataset_names=("synthvqa",), data_root=None,
              num_samples=None, seed=0, device="cpu", dtype="float32", importance_method=None,
              max_new_tokens=4, budget_range_ms=None, dataset_weights=None, prompt_templates=None,
              tier_max_crops=None, budget_token_scale=None, image_size=None, decode_mode=None,
              max_graphs=None)
    The envs.backends.base protocol (see backend.py for the episode), on the setup, data, run_to
    and finish it shares with the embedded model's backend (envs.backends.vlm.ExecutorBackend;
    decode_mode and max_graphs as there). tier_max_crops: tier ->
    crop budget (default DEFAULT_TIER_MAX_CROPS = low 2, medium 7, high 12); results_dir holds
    importance.json and profile.json (runners/profile_configs.py --backend molmoe writes both); the data options
    are the embedded backend's (envs.backends.vlm), prompts are the datasets' templates in
    MolmoE's " User: ... Assistant:" format; image_size [W, H] resizes every image first.
write_random_checkpoint(cfg, out_dir)     random weights in the published layout (GPU benchmarks)
build_random_checkpoint(dir, template)    a whole random checkpoint at MolmoE-1B's published sizes,
                                          tokenizer and processor files from `template`
"""
from envs.backends.molmoe.backend import DEFAULT_TIER_MAX_CROPS, MolmoEBackend
from envs.backends.molmoe.config import MolmoEConfig
from envs.backends.molmoe.model import MolmoE, load
from envs.backends.molmoe.preprocess import MolmoEInputs, preprocess, select_tiling
from envs.backends.molmoe.tokenizer import MolmoETokenizer, chat_prompt
from envs.backends.molmoe.weights import build_random_checkpoint, published_shapes, write_random_checkpoint

__all__ = [
    "DEFAULT_TIER_MAX_CROPS",
    "MolmoE",
    "MolmoEBackend",
    "MolmoEConfig",
    "MolmoEInputs",
    "MolmoETokenizer",
    "build_random_checkpoint",
    "chat_prompt",
    "load",
    "preprocess",
    "published_shapes",
    "select_tiling",
    "write_random_checkpoint",
]
