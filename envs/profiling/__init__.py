"""Static-configuration profiling, block importance and latency benchmarks of the embedded VLM and
of MolmoE (any envs.backends.vlm.ExecutorBackend).

Library code behind runners/profile_configs.py, runners/bench.py and the evaluation's config table
(runners -> envs -> backends); it only uses the backends' public API. One concern per
module:
    checks          argument checks (model dir per backend, positive ints, knob subsets)
    configs         static configurations and their block plans (the executor's block_plan)
    storage         weights' sha256, atomic JSON, importance files, samples, the placeholder backend
    accuracy        BatchedEvaluator: batched greedy answers through the executor
    importance      drop_accuracy and block_influence scores
    latency_table   the one latency-table measurer: batch-1 episodes, interleaved and shuffled
    pareto          the Pareto rule and the training budget range
    benchmarks      meter overhead, hook cost, latency vs knobs
"""
from envs.backends.base import SPLITS, check_split
from envs.profiling.accuracy import BatchedEvaluator, sample_group, summarize_accuracy
from envs.profiling.benchmarks import hook_cost_us, iqr, knob_latency, meter_modules, meter_overhead, paired_knob_steps
from envs.profiling.checks import MODEL_FILES, PROFILE_BACKENDS, check_model_dir, check_positive_int, check_subset
from envs.profiling.configs import PROFILE_INSERTION, ZERO_BUDGET_NOTE, StaticConfig, static_configs
from envs.profiling.importance import IMPORTANCE_METHODS, compute_importance
from envs.profiling.latency_table import LatencyTable, latency_stats, measure_latency, run_episode, total_ms
from envs.profiling.pareto import BUDGET_RANGE_RULE, LOW_BUDGET_HEADROOM, budget_range, pareto_frontier
from envs.profiling.storage import (
    evaluation_backend,
    load_samples,
    model_num_layers,
    read_importance,
    weight_paths,
    weights_sha256,
    write_json,
)

__all__ = [
    "BUDGET_RANGE_RULE", "IMPORTANCE_METHODS", "LOW_BUDGET_HEADROOM", "MODEL_FILES", "PROFILE_BACKENDS",
    "PROFILE_INSERTION", "SPLITS", "ZERO_BUDGET_NOTE", "BatchedEvaluator", "LatencyTable", "StaticConfig",
    "budget_range", "check_model_dir", "check_positive_int", "check_split", "check_subset", "compute_importance",
    "evaluation_backend", "hook_cost_us", "iqr", "knob_latency", "latency_stats", "load_samples", "measure_latency",
    "meter_modules", "meter_overhead", "model_num_layers", "paired_knob_steps", "pareto_frontier", "read_importance",
    "run_episode",
    "sample_group", "static_configs", "summarize_accuracy", "total_ms", "weight_paths", "weights_sha256",
    "write_json",
]
