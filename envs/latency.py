"""Per-phase latency of an episode, measured by forward hooks.

The meter hooks modules (the VLM's vision encoder, every decoder block, the LM head): each hooked
call records a timestamp before and after it into the episode's `PhaseTimer`. The backend opens
`meter.section(timer, phase)` around each stretch of one episode's work; a section's time runs
from its first recorded start to its last recorded end, so glue between hooked modules
(embedding lookups, argmax) counts, while time outside sections (the controller between run_to
and finish, other episodes interleaved by the env) does not. A phase's time is the sum of its
sections. Work that no module covers (preprocessing) is bracketed by `section(..., bracket=True)`,
which also stamps on entry and exit.

Timestamps: on CPU `time.perf_counter()`, one per hooked call's start and end (a hook costs one
timestamp and one list append). On CUDA the hooks record nothing: every section is bracketed by
a `torch.cuda.Event` on entry and exit, recorded on the current stream (pooled and reused) and
read after ONE synchronisation in `timings_ms()` per episode. The events time the GPU's work
between them, so per-module stamps would add nothing but host time to a launch-bound episode
(the H200 bench of 2026-12-01 measured +4.8 % for about 35 hooked calls per episode with them).

CUDA graphs exist only on CUDA, whose sections are always bracketed, so a replayed graph (which
calls no module) is timed too. `bracket=True` is for CPU work no module covers (preprocessing).
`suspended()` silences the hooks while a graph is warmed up and captured (an event recorded
during stream capture would be part of the graph).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn


@dataclass
class PhaseTimer:
    """One episode's stamps (floats on CPU, CUDA events on GPU) and its (phase, first, end) sections."""

    stamps: list = field(default_factory=list)
    sections: list = field(default_factory=list)


class LatencyMeter:
    def __init__(self, device: str | torch.device = "cpu", phases: Iterable[str] = ()):
        self.cuda = torch.device(device).type == "cuda"
        self.phases = tuple(phases)
        self._handles: list = []
        self._free_events: list = []
        self._active: PhaseTimer | None = None
        self._suspended = False

    def attach(self, modules: Iterable[nn.Module]) -> "LatencyMeter":
        """Hook `modules`; their calls are timed while a section is open."""
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._hook))
            self._handles.append(module.register_forward_hook(self._post_hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def section(self, timer: PhaseTimer, phase: str, bracket: bool = False) -> Iterator[None]:
        if self.phases and phase not in self.phases:
            raise ValueError(f"phase={phase!r} is not known; expected one of {self.phases}")
        if self._active is not None:
            raise RuntimeError(f"section({phase!r}) opened inside another section")
        first = len(timer.stamps)
        self._active = timer
        bracket = bracket or self.cuda
        if bracket:
            self._stamp(timer)
        try:
            yield
        finally:
            if bracket:
                self._stamp(timer)
            self._active = None
            timer.sections.append((phase, first, len(timer.stamps)))

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Hooked calls inside this block record nothing (graph warm-up and capture)."""
        was, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = was

    def timings_ms(self, timer: PhaseTimer) -> dict[str, float]:
        """Milliseconds per phase of `timer`'s sections (one sync on CUDA); recycles its events."""
        totals = self.phase_totals_ms(timer)
        if self.cuda:
            self._free_events.extend(timer.stamps)
        timer.stamps, timer.sections = [], []
        return totals

    def phase_totals_ms(self, timer: PhaseTimer) -> dict[str, float]:
        """Milliseconds per phase of the sections so far, leaving the timer as it is: what an open
        episode has spent up to now (on CUDA a sync on its last stamp, which a caller that copies
        the episode's output to the host has waited for anyway)."""
        totals = {phase: 0.0 for phase in self.phases}
        if self.cuda and timer.stamps:
            timer.stamps[-1].synchronize()
        for phase, first, end in timer.sections:
            totals.setdefault(phase, 0.0)
            if end - first >= 2:
                start, stop = timer.stamps[first], timer.stamps[end - 1]
                totals[phase] += start.elapsed_time(stop) if self.cuda else (stop - start) * 1e3
        return totals

    def _stamp(self, timer: PhaseTimer) -> None:
        if self.cuda:
            event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
            event.record()
            timer.stamps.append(event)
        else:
            timer.stamps.append(time.perf_counter())

    def _hook(self, module, args):
        if self._active is not None and not self._suspended and not self.cuda:
            self._stamp(self._active)

    def _post_hook(self, module, args, output):
        if self._active is not None and not self._suspended and not self.cuda:
            self._stamp(self._active)
