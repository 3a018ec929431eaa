"""What machine a measurement ran on (stored with every profile, benchmark and evaluation)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def load_average() -> list[float] | None:
    """1/5/15-minute load average, rounded; None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """CPU model (from /proc/cpuinfo), core count, torch version and threads, current load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    load = load_average()
    if load is not None:
        info["load_average"] = load
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def resolve_device(device: str | torch.device, field: str = "--device") -> torch.device:
    """`device` as a torch.device, refusing CUDA where there is none (before anything is built or written)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}={device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={device!r}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{field}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"{field}={device!r} is not supported; expected 'cpu', 'cuda' or 'cuda:N'")
    return resolved
