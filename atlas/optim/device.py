"""Which device the engine runs on, and how results name it."""

from __future__ import annotations

import torch

from atlas.errors import AtlasError

DEVICE_KINDS = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, or CUDA when this process sees a GPU, else the CPU. Called on
    workers, never in a Dask client (it would initialize CUDA there)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(name: str) -> str:
    """`name` when this process can compute on it, else one AtlasError saying what it has:
    an unknown kind, CUDA without a GPU, or a GPU number past the last one."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_KINDS:
        raise AtlasError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AtlasError("--device mps: this machine has no Apple GPU (use --device cpu)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AtlasError(f"--device {name}: this machine has no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise AtlasError(
                f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0-{count - 1}"
            )
    return name


def describe_device(device: torch.device) -> str:
    """'cuda:<GPU name>' or 'cpu:<N> threads', as unit records and `atlas plan` show it."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads"
