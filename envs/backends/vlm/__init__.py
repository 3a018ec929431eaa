"""The embedded MoE VLM backend (MolmoE-style: CLIP ViT tower + pooling connector + OLMoE decoder).

Public API
----------
VLMBackend(model_path=None, results_dir=None, dataset_names=("synthvqa",), data_root=None,
           num_samples=None, seed=0, device="cpu", importance_method=None, max_new_tokens=4,
           budget_range_ms=None, dataset_weights=None, prompt_templates=None, dtype="float32",
           decode_mode=None, max_graphs=None)
    model_path       HF-style model dir (config.json, model.safetensors, tokenizer.json);
                     default: the checkpoint shipped in envs/assets/ (DEFAULT_MODEL_PATH).
    results_dir      dir with importance.json ({"method": str, "scores": {"0": float, ...}}, one
                     score per block) and profile.json (its "budget_range_ms" = [lo, hi]);
                     default: model_path.
    budget_range_ms  [lo, hi] overriding profile.json's.
    importance_method  if given, importance.json's "method" must equal it.
    dataset_names    ("synthvqa",) -> envs.data.synthvqa.SynthVQA(split, n, seed); real dataset
                     names -> envs.data.vqa.load_vqa_mixture(names, data_root, split, ...): train is
                     the official train split, val and test the two halves of the official val split.
    num_samples      int (every split) or {"train": n, "val": n, "test": n} (missing splits keep
                     DEFAULT_NUM_SAMPLES).
    max_new_tokens   greedy decoding stops at EOS or after this many tokens (CUDA graphs: always
                     this many steps, the ids after <eos> dropped).
    device           "cpu" or "cuda" ("cuda" without CUDA is refused, naming the device).
    dtype            "float32" or "bfloat16" (bf16 on CUDA runs the experts through torch._grouped_mm).
    decode_mode      envs.backends.vlm.executor: "eager" (the CPU default), "static", "graphs" (the
                     CUDA default: one CUDA graph per configuration, captured on first use outside
                     the latency sections; at most max_graphs kept, default one per (p, k, N); the
                     prefill one graph per (length bucket of 32 positions, stretch), at most one per
                     p and one per (p, k, N) of every bucket).
    dataset_weights  sampling weights of the real datasets when several are mixed.
    prompt_templates {dataset: template with "{question}"} overriding
                     envs.data.vqa.DEFAULT_PROMPT_TEMPLATES for real datasets.
  Attributes: knob_space (tiers from the model config; p 1..5, k top_k-4..top_k, N L-4..L),
  d_model = language_dim, budget_range_ms, importance ({block: score}), model, tokenizer, cfg.
  Methods (the envs.backends.base protocol): dataset(split), language_feature(sample),
  start_episode(sample, tier, budget_token) -> ModelEpisode, run_to(ep, p) -> latency token
  (d_model,), finish(ep, top_k, num_blocks) -> EpisodeResult with timings_ms keys
  preprocess / vision / prefill / decode (ms) and extras (tier, insertion, top_k, num_blocks,
  blocks, vision_tokens, prefill_tokens, generated_tokens, generated_ids). Returned tensors are
  float32 on the backend's device.
  budget_token: any finite (d_model,) tensor; it enters the sequence as
  model.embed_budget(budget_token) (x config budget_token_scale). Pretraining put s * N(0, I),
  s ~ U(0, 1.5), there before that scaling (the scale of a LayerNorm output, like policies' budget
  encoder emits).
  Latency: on a shared 2-core CPU use torch.set_num_threads(1): batch-1 episodes of this model
  are overhead-bound, and a second thread competing with other processes inflates and scatters
  the timings.

ExecutorBackend           the base of VLMBackend and envs.backends.molmoe.MolmoEBackend: options,
                          results files (read_results(dir) re-reads them), data, knob space,
                          latency meter, executor, run_to and finish; for the profiler's batched
                          evaluator prefill_prefixes(images, prompt_ids, tier, batch_size) (the
                          input embeddings before the budget token), embed_budget, first_tokens.

Model pieces (for the profiler, benchmarks and pretraining)
-----------------------------------------------------------
VLMConfig                 hyper-parameters (config.json); tier crop budgets (tier_max_crops).
build_model(cfg, seed)    random-init BudgetVLM; load_model(dir, device) -> (BudgetVLM, WordTokenizer).
BudgetVLM                 encode_images / embed / rope / blocks[i](h, cos, sin, top_k, cache) / logits.
WordTokenizer             word-level tokenizer (SynthVQA's tokenize_words rule).
make_crops                multi-crop preprocessing per tier: (crops, crop slots).

Every path (episodes, the profiler's batched evaluation, pretraining's evaluation and training
forward) runs its plans through envs.backends.vlm.executor: one block-plan builder (block_plan), one
greedy decoder (Executor.decode). Design notes (execution honesty, cache, budget token) are in
elastic.py, executor.py and backend.py.
"""
from envs.backends.vlm.backend import DEFAULT_MODEL_PATH, ExecutorBackend, ModelEpisode, VLMBackend, load_importance
from envs.backends.vlm.config import VLMConfig
from envs.backends.vlm.model import BudgetVLM, build_model, load_model
from envs.backends.vlm.preprocess import make_crops
from envs.backends.vlm.tokenizer import WordTokenizer

__all__ = [
    "DEFAULT_MODEL_PATH",
    "BudgetVLM",
    "ExecutorBackend",
    "ModelEpisode",
    "VLMBackend",
    "VLMConfig",
    "WordTokenizer",
    "build_model",
    "load_importance",
    "load_model",
    "make_crops",
]
