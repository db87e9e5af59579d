"""A TopK sparse autoencoder (Gao et al. 2024): the dictionary of layers with signed activations.

Each vector is encoded as at most `active` non-negative codes (ReLU, then the largest
`active` kept) and decoded as centre + codes @ atoms, the atoms kept at unit norm: so a
concept is present with a positive amount along its atom, as an NMF concept is, and an image
that maximizes the atom's direction shows it. Ours rather than the `overcomplete` package's:
as good on our measures and a few dozen lines, where that package pulls in OpenCV, timm and
matplotlib (bench/RESULTS.md, "Concepts").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

STEPS = 3000
BATCH = 1024
LEARNING_RATE = 2e-3


class TopKSAE(nn.Module):
    """vectors [N, C] -> codes [N, K] with at most `active` non-zero per row -> vectors."""

    def __init__(self, channels: int, concepts: int, active: int):
        super().__init__()
        self.active = active
        self.centre = nn.Parameter(torch.zeros(channels))
        self.encoder = nn.Linear(channels, concepts)
        self.atoms = nn.Parameter(torch.zeros(concepts, channels))

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        codes = torch.relu(self.encoder(vectors - self.centre))
        top = codes.topk(self.active, dim=1)
        return torch.zeros_like(codes).scatter(1, top.indices, top.values)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.encode(vectors) @ self.atoms + self.centre

    @torch.no_grad()
    def normalize_atoms(self) -> None:
        self.atoms.div_(self.atoms.norm(dim=1, keepdim=True).clamp_min(1e-8))


def train_sae(
    vectors: np.ndarray, concepts: int, active: int, seed: int, steps: int = STEPS
) -> TopKSAE:
    """A TopKSAE fitted to `vectors` (float32 [N, C]) by Adam on the mean squared error, on
    mini-batches drawn with `seed`. The centre starts at the mean and the atoms at distinct
    random vectors minus the mean (the encoder tied to them), so that every atom starts where
    data is; the data is scaled to unit mean square for the optimizer and scaled back after.
    Runs on one thread: its matrices are small, and on a busy 2-core CPU two threads made a
    step 12x slower (5 ms against 65 ms at 1024 x 112 -> 16)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(vectors, concepts, active, seed, steps)
    finally:
        torch.set_num_threads(threads)


def _train(vectors: np.ndarray, concepts: int, active: int, seed: int, steps: int) -> TopKSAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        scale = float(data.square().mean().sqrt().clamp_min(1e-12))
        data = data / scale
        sae = TopKSAE(data.shape[1], concepts, active)
        mean = data.mean(0)
        picks = torch.randperm(len(data))[:concepts]
        with torch.no_grad():
            sae.centre.copy_(mean)
            sae.atoms.copy_(data[picks] - mean)
            sae.normalize_atoms()
            sae.encoder.weight.copy_(sae.atoms)
            sae.encoder.bias.zero_()
        optimizer = torch.optim.Adam(sae.parameters(), lr=LEARNING_RATE)
        for _ in range(steps):
            batch = data[torch.randint(len(data), (min(BATCH, len(data)),))]
            loss = (sae(batch) - batch).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_atoms()
        with torch.no_grad():
            sae.centre.mul_(scale)
            sae.encoder.bias.mul_(scale)
    return sae
