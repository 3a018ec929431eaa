"""Block importance, one score per block (higher = more important, block 0 included).

drop_accuracy    the design's method: accuracy of the full configuration (high tier, every block at
                 the model's top-k) minus its accuracy with block i alone removed.
block_influence  ShortGPT's Block Influence: 1 - cos(block input, block output) per token, averaged
                 over the prefill tokens of every sample, in the full configuration.
"""
from __future__ import annotations

import math

from envs.backends.vlm.executor import full_plan
from envs.knobs import KnobSpace
from envs.profiling.accuracy import BatchedEvaluator

IMPORTANCE_METHODS = ("drop_accuracy", "block_influence")


def compute_importance(evaluator: BatchedEvaluator, knob_space: KnobSpace, model_top_k: int,
                       tier: str | None = None) -> dict[str, dict]:
    """Both methods on the evaluator's samples in the full configuration; {method: record}."""
    tier = tier or knob_space.tiers[-1]
    plan = full_plan(knob_space.num_layers, model_top_k, knob_space.first_block_top_k)
    influence: dict = {}
    base = evaluator.accuracies(tier, plan, influence=influence)
    base_acc = sum(base) / len(base)
    dropped = evaluator.accuracies_many(
        tier, {b: [x for x in plan if x[0] != b] for b in range(knob_space.num_layers)}
    )
    without = {b: sum(a) / len(a) for b, a in dropped.items()}
    drop = {str(b): base_acc - without[b] for b in range(knob_space.num_layers)}
    bi = {str(b): influence[b][0] / influence[b][1] for b in range(knob_space.num_layers)}
    common = {"num_samples": len(evaluator.samples), "tier": tier,
              "plan": [[b, k] for b, k in plan], "budget_token": "zeros"}
    records = {
        "drop_accuracy": {
            "method": "drop_accuracy",
            "description": "accuracy of the full configuration minus its accuracy with block i alone "
                           "removed (higher = more important); block 0 scored although it always runs",
            "scores": drop,
            "full_accuracy": base_acc,
            "accuracy_without_block": {str(b): a for b, a in without.items()},
            **common,
        },
        "block_influence": {
            "method": "block_influence",
            "description": "ShortGPT block influence: 1 - cos(block input, block output), averaged over "
                           "the prefill tokens of all samples in the full configuration (higher = more important)",
            "scores": bi,
            **common,
        },
    }
    for rec in records.values():
        for key, value in rec["scores"].items():
            if not math.isfinite(value):
                raise ValueError(f"importance {rec['method']}: score of block {key} is {value}, expected finite")
    return records
