"""LatencyMeter: hook-based per-phase timing that excludes time outside its sections."""
import time

import pytest
import torch
from torch import nn

from envs.latency import LatencyMeter, PhaseTimer


class Sleepy(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_sections_sum_hooked_time_and_skip_gaps():
    a, b = Sleepy(0.01), Sleepy(0.005)
    meter = LatencyMeter("cpu", ("prefill", "decode")).attach([a, b])
    timer = PhaseTimer()
    x = torch.zeros(1)
    with meter.section(timer, "prefill"):
        a(x)
    time.sleep(0.05)  # e.g. the controller between run_to and finish: not the backend's time
    with meter.section(timer, "prefill"):
        b(x)
    with meter.section(timer, "decode"):
        pass  # nothing hooked ran
    b(x)  # outside any section: not recorded
    timings = meter.timings_ms(timer)
    assert set(timings) == {"prefill", "decode"}
    assert 15 <= timings["prefill"] < 40
    assert timings["decode"] == 0.0
    meter.detach()
    with meter.section(timer, "prefill"):
        a(x)
    assert meter.timings_ms(timer)["prefill"] == 0.0  # detached: no stamps


def test_bracket_section_and_interleaved_timers():
    meter = LatencyMeter("cpu", ("preprocess",))
    first, second = PhaseTimer(), PhaseTimer()
    with meter.section(first, "preprocess", bracket=True):
        time.sleep(0.01)
    with meter.section(second, "preprocess", bracket=True):
        time.sleep(0.002)
    assert meter.timings_ms(first)["preprocess"] >= 10
    assert meter.timings_ms(second)["preprocess"] < 10


def test_section_errors():
    meter = LatencyMeter("cpu", ("vision",))
    timer = PhaseTimer()
    with pytest.raises(ValueError, match="phase='decoder'"):
        with meter.section(timer, "decoder"):
            pass
    with pytest.raises(RuntimeError, match="inside another section"):
        with meter.section(timer, "vision"):
            with meter.section(timer, "vision"):
                pass


def test_a_hooked_call_records_two_stamps_and_suspended_records_none():
    """A hook costs one timestamp and one append (its time is a benchmark: runners/bench.py's hook_cost);
    while suspended (CUDA graph warm-up and capture) hooked calls record nothing."""
    layers = [nn.Identity() for _ in range(100)]
    meter = LatencyMeter("cpu", ("prefill",)).attach(layers)
    timer = PhaseTimer()
    x = torch.zeros(1)
    with meter.section(timer, "prefill"):
        for layer in layers:
            layer(x)
        with meter.suspended():
            for layer in layers:
                layer(x)
    assert len(timer.stamps) == 200
    with meter.section(timer, "prefill", bracket=True):
        with meter.suspended():
            layers[0](x)
    assert len(timer.stamps) == 202  # a bracketed section still stamps its entry and exit


@pytest.mark.gpu
def test_on_cuda_a_section_is_two_events_however_many_hooked_calls():
    """On CUDA the hooks record nothing (host time in a launch-bound episode); the section's entry and
    exit events time the GPU work between them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layers = [nn.Linear(256, 256).cuda() for _ in range(50)]
    meter = LatencyMeter("cuda", ("prefill",)).attach(layers)
    timer = PhaseTimer()
    x = torch.zeros(64, 256, device="cuda")
    with meter.section(timer, "prefill"):
        for layer in layers:
            x = layer(x)
    assert len(timer.stamps) == 2
    assert meter.timings_ms(timer)["prefill"] > 0
