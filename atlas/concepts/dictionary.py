"""A layer's concept dictionary: K directions over its channels that rebuild its activations.

Where every sampled activation is non-negative (after a ReLU) the dictionary is a
non-negative factorization A ~ U V (scikit-learn's NMF): the K rows of V are the concepts, U
>= 0 says how much of each is present. Where activations are signed (a block's linear
bottleneck, tokens, a map read before its clamp) NMF does not apply; a TopK sparse
autoencoder (atlas.concepts.sae) gives each vector at most `active` non-negative codes over K
unit atoms around a centre. Either way a concept is a unit-norm direction, present with a
non-negative coefficient, and `Dictionary.encode` gives the coefficients of any vectors in
torch alone (workers need neither scikit-learn nor the training code).

Measures, on vectors A [N, C] with column means m:
- the layer's share explained: 1 - ||A - Â||² / ||A - m||² (Â the reconstruction), the R² of
  the dictionary; for the K channels of highest variance, the share of the variance they hold;
- a concept's share: how much the layer's share drops when that concept's term is removed
  from the reconstruction (its unique contribution; the shares need not sum to the total).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from atlas.concepts.extra import require
from atlas.concepts.samples import Samples
from atlas.errors import AtlasError
from atlas.files import read_arrays, write_arrays

DICTIONARY_VERSION = "1"
METHODS = ("auto", "nmf", "sae")
NMF_ITERATIONS = 400
NNLS_SWEEPS = 100  # coordinate-descent sweeps of the non-negative coding of NMF concepts
MIN_VECTORS_PER_CONCEPT = 10


def dictionary_key(samples_key: str, concepts: int, method: str, active: int, seed: int) -> str:
    """What decides a dictionary: the sampled vectors (their key) and how it is learned."""
    fields = [samples_key, concepts, method, active, seed, DICTIONARY_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def default_active(concepts: int) -> int:
    """Codes per vector of the TopK autoencoder: a quarter of the concepts, at least 2 (one
    code a vector could not rebuild planted vectors that mix two directions: tests)."""
    return min(concepts, max(2, concepts // 4))


def check_concepts(concepts: int, channels: int, images: int, vectors: int, layer: str) -> None:
    """One sentence for a K that the layer or the folder cannot support."""
    if concepts < 1:
        raise AtlasError(f"the number of concepts must be at least 1, not {concepts}")
    if concepts > channels:
        raise AtlasError(
            f"{concepts} concepts are more than {layer}'s {channels} channels: "
            f"ask for at most {channels}"
        )
    needed = MIN_VECTORS_PER_CONCEPT * concepts
    if images < concepts or vectors < needed:
        raise AtlasError(
            f"{concepts} concepts of {layer} need at least {concepts} images and {needed} "
            f"sampled activations; the exemplar folder gave {images} images and {vectors}: "
            "add images or ask for fewer concepts"
        )


@dataclass
class Dictionary:
    """K unit-norm concept directions over C channels and how to find their coefficients.
    `centre`, `encoder` and `encoder_bias` are the autoencoder's (zeros and None for NMF)."""

    method: str  # "nmf" or "sae"
    directions: np.ndarray  # float32 [K, C], unit rows
    centre: np.ndarray  # float32 [C]
    active: int  # at most this many non-zero coefficients per vector
    key: str = ""
    encoder: np.ndarray | None = None  # float32 [K, C]
    encoder_bias: np.ndarray | None = None  # float32 [K]

    @property
    def size(self) -> int:
        return self.directions.shape[0]

    def encode(self, vectors: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Non-negative coefficients [N, K] (float32 tensor, on the vectors' device) such that
        centre + coefficients @ directions rebuilds the vectors as closely as the method can."""
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        atoms = torch.from_numpy(self.directions).to(vectors.device)
        if self.method == "nmf":
            return _nnls(vectors.clamp_min(0), atoms)
        weight = torch.from_numpy(self.encoder).to(vectors.device)
        bias = torch.from_numpy(self.encoder_bias).to(vectors.device)
        centre = torch.from_numpy(self.centre).to(vectors.device)
        codes = torch.relu((vectors - centre) @ weight.T + bias)
        top = codes.topk(self.active, dim=1)
        return torch.zeros_like(codes).scatter(1, top.indices, top.values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        atoms = torch.from_numpy(self.directions).to(codes.device)
        return codes @ atoms + torch.from_numpy(self.centre).to(codes.device)

    def explained(self, vectors: np.ndarray, codes: torch.Tensor | None = None) -> float:
        """The layer's share explained: 1 - ||A - Â||² / ||A - m||²."""
        data = torch.as_tensor(vectors, dtype=torch.float64)
        codes = self.encode(vectors) if codes is None else codes
        residual = data - self.decode(codes.float()).double()
        return float(1 - residual.square().sum() / _total(data))

    def shares(self, vectors: np.ndarray, codes: torch.Tensor | None = None) -> np.ndarray:
        """Each concept's share [K]: the drop of `explained` without its term."""
        data = torch.as_tensor(vectors, dtype=torch.float64)
        codes = (self.encode(vectors) if codes is None else codes).double()
        atoms = torch.from_numpy(self.directions).double()
        residual = data - codes @ atoms - torch.from_numpy(self.centre).double()
        # ||R + u v||² - ||R||² = 2 <R u, v> + ||u||² ||v||², with ||v|| = 1
        cross = ((residual.T @ codes).T * atoms).sum(1)
        return ((2 * cross + codes.square().sum(0)) / _total(data)).numpy()

    def reordered(self, order: np.ndarray) -> Dictionary:
        """The same dictionary with its concepts in `order` (concept k is concept order[k])."""
        encoder = None if self.encoder is None else self.encoder[order]
        bias = None if self.encoder_bias is None else self.encoder_bias[order]
        directions = self.directions[order]
        return replace(self, directions=directions, encoder=encoder, encoder_bias=bias)

    def save(self, path: Path) -> None:
        """One .npz file, written atomically."""
        arrays = {"directions": self.directions, "centre": self.centre}
        if self.encoder is not None:
            arrays.update(encoder=self.encoder, encoder_bias=self.encoder_bias)
        meta = {"method": self.method, "active": self.active, "key": self.key}
        write_arrays(path, meta, **arrays)

    @classmethod
    def load(cls, path: Path) -> Dictionary:
        meta, arrays = read_arrays(path)
        return cls(meta["method"], active=meta["active"], key=meta["key"], **arrays)


def _total(data: torch.Tensor) -> torch.Tensor:
    """||A - m||², never zero."""
    return (data - data.mean(0)).square().sum().clamp_min(1e-12)


def _nnls(vectors: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """argmin over U >= 0 of ||vectors - U atoms||², by coordinate descent (HALS): exact on
    each coefficient in turn, the method scikit-learn's NMF uses for its own updates."""
    gram = atoms @ atoms.T
    target = vectors @ atoms.T
    codes = target.clamp_min(0) / gram.diagonal().clamp_min(1e-12) / atoms.shape[0]
    for _ in range(NNLS_SWEEPS):
        for k in range(atoms.shape[0]):
            step = (target[:, k] - codes @ gram[:, k]) / gram[k, k].clamp_min(1e-12)
            codes[:, k] = (codes[:, k] + step).clamp_min(0)
    return codes


def learn_concepts(
    samples: Samples,
    concepts: int,
    *,
    method: str = "auto",
    active: int | None = None,
    seed: int = 0,
) -> Dictionary:
    """The dictionary of a layer's samples, checked against what they can support first, and
    keyed by them and its settings (`Dictionary.key`: store it once, reuse it)."""
    check_concepts(
        concepts, samples.channels, samples.image_count, len(samples.vectors), samples.layer
    )
    key = concepts_key(samples, concepts, method=method, active=active, seed=seed)
    active = _active(samples, concepts, method, active)
    return learn(samples.vectors, concepts, method=method, active=active, seed=seed, key=key)


def concepts_key(
    samples: Samples,
    concepts: int,
    *,
    method: str = "auto",
    active: int | None = None,
    seed: int = 0,
) -> str:
    """The key `learn_concepts` gives the dictionary of these settings, known before learning
    it: a dictionary stored under it is reused, not learned again."""
    active = _active(samples, concepts, method, active)
    return dictionary_key(samples.key, concepts, method, active or 0, seed)


def _active(samples: Samples, concepts: int, method: str, active: int | None) -> int | None:
    """The autoencoder's codes per vector where it is the method, else `active` as given."""
    if method == "sae" or (method == "auto" and (samples.vectors < 0).any()):
        return default_active(concepts) if active is None else min(active, concepts)
    return active


def learn(
    vectors: np.ndarray,
    concepts: int,
    *,
    method: str = "auto",
    active: int | None = None,
    seed: int = 0,
    key: str = "",
) -> Dictionary:
    """A dictionary of `concepts` directions learned from `vectors` (float32 [N, C]). "auto"
    takes NMF where no vector has a negative entry, else the TopK autoencoder; concepts come
    sorted by their share, largest first. `active`: the autoencoder's codes per vector
    (default_active); NMF uses every concept."""
    if method not in METHODS:
        raise AtlasError(f"unknown concept method {method!r}; expected one of {METHODS}")
    if not np.isfinite(vectors).all() or not vectors.any():
        raise AtlasError(
            "the layer's sampled activations are all zero (or not finite) on these images: "
            "there are no concepts to learn; choose another layer or folder"
        )
    negative = bool((vectors < 0).any())
    if method == "auto":
        method = "sae" if negative else "nmf"
    if method == "nmf":
        if negative:
            raise AtlasError(
                "NMF needs non-negative activations and this layer's are signed: use the sae method"
            )
        dictionary = _learn_nmf(vectors, concepts, seed)
    else:
        active = default_active(concepts) if active is None else min(active, concepts)
        dictionary = _learn_sae(vectors, concepts, active, seed)
    dictionary.key = key
    return dictionary.reordered(np.argsort(-dictionary.shares(vectors), kind="stable"))


def _learn_nmf(vectors: np.ndarray, concepts: int, seed: int) -> Dictionary:
    decomposition = require("sklearn.decomposition", "scikit-learn", "concept dictionaries")
    exceptions = require("sklearn.exceptions", "scikit-learn", "concept dictionaries")
    nmf = decomposition.NMF(
        n_components=concepts, init="nndsvda", max_iter=NMF_ITERATIONS, random_state=seed
    )
    with warnings.catch_warnings():  # a dictionary short of convergence is still one: its
        # explained share (learned.json, the layer page) says how good it is
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
        nmf.fit(vectors.astype(np.float32))
    components = nmf.components_.astype(np.float32)
    norms = np.linalg.norm(components, axis=1, keepdims=True)
    directions = components / np.maximum(norms, 1e-12)
    centre = np.zeros(vectors.shape[1], np.float32)
    return Dictionary("nmf", directions, centre, concepts)


def _learn_sae(vectors: np.ndarray, concepts: int, active: int, seed: int) -> Dictionary:
    from atlas.concepts.sae import train_sae

    sae = train_sae(vectors, concepts, active, seed)
    return Dictionary(
        "sae",
        sae.atoms.detach().numpy().copy(),
        sae.centre.detach().numpy().copy(),
        active,
        encoder=sae.encoder.weight.detach().numpy().copy(),
        encoder_bias=sae.encoder.bias.detach().numpy().copy(),
    )
