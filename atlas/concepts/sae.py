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
RESAMPLE_EVERY = 250  # steps; atoms that fired on under DEAD_SHARE of the vectors restart
DEAD_SHARE = 1e-3


class TopKSAE(nn.Module):
    """vectors [N, C] -> codes [N, K] with at most `active` non-zero per row -> vectors."""

    def __init__(self, channels: int, concepts: int, active: int):
        super().__init__()
        self.active = active
        self.register_buffer("centre", torch.zeros(channels))
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
    mini-batches drawn with `seed`, the data scaled to unit mean square for the optimizer.
    The centre is the geometric median, fixed: where most sparse codes are zero. Started at
    the mean, or learned, it drifted there and one atom learned to undo it on most vectors;
    2 of 5 planted 4-direction layers then lost a direction (bench/concepts.py planted).
    The atoms start at random vectors minus the centre (far ones likelier: never the centre
    itself), the encoder tied to them; atoms that stop firing restart (`_resample`).
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
        centre = geometric_median(data)
        # rows far from the centre are likelier picks (the first step of k-means++ seeding):
        # never a row at the centre itself, which would start a dead atom
        distance = (data - centre).square().sum(1)
        picks = torch.multinomial(distance + 1e-12 * (distance.sum() == 0), concepts)
        with torch.no_grad():
            sae.centre.copy_(centre)
            sae.atoms.copy_(data[picks] - centre)
            sae.normalize_atoms()
            sae.encoder.weight.copy_(sae.atoms)
            sae.encoder.bias.zero_()
        optimizer = torch.optim.Adam(sae.parameters(), lr=LEARNING_RATE)
        fired = torch.zeros(concepts)
        for step in range(1, steps + 1):
            batch = data[torch.randint(len(data), (min(BATCH, len(data)),))]
            codes = sae.encode(batch)
            loss = (codes @ sae.atoms + sae.centre - batch).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_atoms()
            fired += codes.detach().gt(0).sum(0)
            if step % RESAMPLE_EVERY == 0 and step <= steps - 2 * RESAMPLE_EVERY:
                if _resample(sae, batch, fired < DEAD_SHARE * RESAMPLE_EVERY * len(batch)):
                    optimizer = torch.optim.Adam(sae.parameters(), lr=LEARNING_RATE)
                fired.zero_()
        with torch.no_grad():
            sae.centre.mul_(scale)
            sae.encoder.bias.mul_(scale)
    return sae


def _resample(sae: TopKSAE, batch: torch.Tensor, dead: torch.Tensor) -> bool:
    """Restart each atom that (almost) never fired at the residual of one of the batch's
    worst-rebuilt vectors, its encoder row tied to it (Bricken et al. 2023's resampling, in
    short). Without it, one of 4 planted directions stayed unfound on 2 of 5 planted layers:
    an atom that starts where no vector needs it never fires again, and never learns."""
    if not dead.any():
        return False
    with torch.no_grad():
        residual = batch - sae(batch)
        worst = residual.square().sum(1).topk(int(dead.sum())).indices
        sae.atoms[dead] = residual[worst]
        sae.normalize_atoms()
        sae.encoder.weight[dead] = sae.atoms[dead]
        sae.encoder.bias[dead] = 0
    return True


def geometric_median(data: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """The point of least summed distance to the rows of `data` (Weiszfeld's iteration from
    the coordinate-wise median): where sparse codes are zero, unlike the mean."""
    median = data.median(0).values
    for _ in range(iterations):
        weights = 1 / (data - median).norm(dim=1).clamp_min(1e-6)
        median = (weights[:, None] * data).sum(0) / weights.sum()
    return median
