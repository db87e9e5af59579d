"""Which device the engine runs on, and how results name it."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, or CUDA when this process sees a GPU, else the CPU. Called on
    workers, never in a Dask client (it would initialize CUDA there)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    """'cuda:<GPU name>' or 'cpu:<N> threads', as unit records and `atlas plan` show it."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads"
