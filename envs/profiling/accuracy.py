"""Batched greedy accuracy of many samples under any block plan, through the executor.

`BatchedEvaluator` calls the executor's pieces in the order of a batch-1 episode (start_episode /
run_to / finish of an envs.backends.vlm.ExecutorBackend: VLMBackend or MolmoEBackend): the
backend's prefill_prefixes (its input embeddings of image and prompt) -> with_budget_token ->
run_blocks over the plan with a KV cache -> the backend's first_tokens -> Executor.decode with the
same plan, stopping at <eos> or max_new_tokens. Rows of a batch share one sequence length (samples
are grouped per tier by prefix length), so no padding or mask enters and every row computes what
its batch-1 episode computes (tests check the generated ids against the backends' episodes).
Prefixes are computed once per (sample, tier) and reused by every plan of that tier.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from envs.backends.vlm import ExecutorBackend
from envs.backends.vlm.backend import load_image
from envs.backends.vlm.executor import Executor, run_blocks, trim_at_eos, with_budget_token
from envs.data.accuracy import extract_answer, score_answer
from envs.data.sample import VQASample
from envs.profiling.checks import check_positive_int


def sample_group(sample: VQASample) -> str:
    """Accuracy breakdown key: SynthVQA's question family, else the dataset name."""
    return sample.family if sample.family is not None else sample.dataset


def summarize_accuracy(samples: Sequence[VQASample], accs: Sequence[float]) -> tuple[float, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for s, a in zip(samples, accs):
        groups.setdefault(sample_group(s), []).append(a)
    return sum(accs) / len(accs), {g: sum(v) / len(v) for g, v in sorted(groups.items())}


class BatchedEvaluator:
    """Greedy answers of many samples under any block plan, batched (see the module docstring)."""

    def __init__(self, backend: ExecutorBackend, samples: Sequence[VQASample], batch_size: int = 64,
                 max_new_tokens: int | None = None):
        self.backend = backend
        self.model = backend.model
        # Eager decoding: batch sizes vary with the length groups, so per-batch CUDA graphs would
        # not be reused (accuracy is measured here, latency by batch-1 episodes).
        self.executor = Executor(backend.model, backend.tokenizer.eos_id, mode="eager")
        self.cfg = backend.cfg
        self.device = backend.device
        self.samples = list(samples)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_new_tokens = backend.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.eos = backend.tokenizer.eos_id
        self.prompt_ids = [backend.prompt_ids(s) for s in self.samples]
        self._images: list[torch.Tensor] | None = [load_image(s) for s in self.samples]
        self._prefixes: dict[str, list[torch.Tensor]] = {}

    def prefixes(self, tier: str) -> list[torch.Tensor]:
        """Per-sample input embeddings (T, d) of image and prompt at `tier`, computed once."""
        if tier not in self._prefixes:
            if self._images is None:
                raise RuntimeError("images were released; prefixes of a new tier cannot be computed")
            self._prefixes[tier] = self.backend.prefill_prefixes(self._images, self.prompt_ids, tier, self.batch_size)
        return self._prefixes[tier]

    def release_images(self, keep_tiers: Iterable[str]) -> None:
        """Compute the prefixes of `keep_tiers` and drop the decoded images (memory)."""
        for tier in keep_tiers:
            self.prefixes(tier)
        self._images = None

    def batches(self, tier: str) -> list[list[int]]:
        """Sample indices grouped by prefix length at `tier`: one sequence length each."""
        by_length: dict[int, list[int]] = {}
        for i, prefix in enumerate(self.prefixes(tier)):
            by_length.setdefault(prefix.shape[0], []).append(i)
        return [idx[j : j + self.batch_size] for _, idx in sorted(by_length.items())
                for j in range(0, len(idx), self.batch_size)]

    @torch.inference_mode()
    def generate(self, tier: str, plan: Sequence[tuple[int, int]], budget: torch.Tensor | None = None,
                 influence: dict | None = None) -> list[list[int]]:
        """Generated ids per sample (up to and including <eos>), as the backend's finish would produce.

        budget: the (d_model,) budget token of every row (default zeros), entering the sequence as
        backend.embed_budget(budget) like an episode's.

        influence: if a dict is given, per-block sums of 1 - cos(input, output) over prefill tokens
        are accumulated into it as {block: [sum, count]}.
        """
        return self.generate_many(tier, {"plan": plan}, budget, influence)["plan"]

    @torch.inference_mode()
    def generate_many(self, tier: str, plans: Mapping[Any, Sequence[tuple[int, int]]],
                      budget: torch.Tensor | None = None, influence: dict | None = None) -> dict[Any, list[list[int]]]:
        """generate() for several plans of one tier, sharing the prefill of common plan prefixes.

        The plans form a trie of (block, top_k) steps; each prefill block call is made once per
        trie node and its output and KV-cache entry are reused by every plan below that node
        (each branch works on its own shallow copy of the cache dict; block calls never modify
        cached tensors in place). Every plan still sees exactly the block calls of its own
        batch-1 episode. influence (as in generate) needs a single plan.
        """
        if influence is not None and len(plans) != 1:
            raise ValueError("influence statistics need exactly one plan")
        model, backend = self.model, self.backend
        budget = (torch.zeros(self.cfg.d_model) if budget is None else budget).to(self.device)
        prefixes = self.prefixes(tier)
        plans = {name: tuple((int(b), int(k)) for b, k in plan) for name, plan in plans.items()}
        generated: dict[Any, list] = {name: [None] * len(self.samples) for name in plans}
        for idx in self.batches(tier):
            seq, cos, sin = with_budget_token(model, torch.stack([prefixes[i] for i in idx]),
                                              backend.embed_budget(budget).expand(len(idx), -1))

            def descend(depth: int, hidden: torch.Tensor, cache: dict, names: list) -> None:
                children: dict[tuple[int, int], list] = {}
                for name in names:
                    plan = plans[name]
                    if len(plan) == depth:
                        ids = self.executor.decode(backend.first_tokens(hidden), dict(cache), plan, hidden.shape[1],
                                                   self.max_new_tokens)
                        for row, i in enumerate(idx):
                            generated[name][i] = ids[row]
                    else:
                        children.setdefault(plan[depth], []).append(name)
                for step, below in children.items():
                    branch = dict(cache)
                    out = run_blocks(model, hidden, cos, sin, (step,), branch)
                    if influence is not None:
                        cosine = F.cosine_similarity(hidden.float(), out.float(), dim=-1)
                        entry = influence.setdefault(step[0], [0.0, 0])
                        entry[0] += float((1.0 - cosine).sum())
                        entry[1] += cosine.numel()
                    descend(depth + 1, out, branch, below)

            descend(0, seq, {}, list(plans))
        return {name: [trim_at_eos(ids[None], self.eos)[0] for ids in rows] for name, rows in generated.items()}

    def score(self, generated: Sequence[Sequence[int]]) -> list[float]:
        """Per-sample accuracy of generated ids (the dataset's metric, as the backend's finish scores it)."""
        tok = self.backend.tokenizer
        return [score_answer(extract_answer(tok.decode(ids)), s) for ids, s in zip(generated, self.samples)]

    def accuracies(self, tier: str, plan: Sequence[tuple[int, int]], influence: dict | None = None) -> list[float]:
        """Per-sample accuracy under one plan."""
        return self.score(self.generate(tier, plan, influence=influence))

    def accuracies_many(self, tier: str, plans: Mapping[Any, Sequence[tuple[int, int]]]) -> dict[Any, list[float]]:
        """Per-sample accuracy under each of several plans of one tier (shared prefixes run once)."""
        return {name: self.score(ids) for name, ids in self.generate_many(tier, plans).items()}
