"""Image parameterizations: free parameters -> a batch of images in [0, 1].

A parameterization is a chain of small invertible modules: a latent space (pixels, a scaled
Fourier spectrum, or the phase of a fixed-magnitude spectrum), a colour mix (decorrelated
colour), and a squash (sigmoid). Each module can also run backwards (`inverse`), so that an
image can be written back into the parameters: that is how blur-every-N-steps and octave
upscaling work for pixels and Fourier (a phase keeps its magnitude, so recipes refuse them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atlas.errors import AtlasError

# Square root of ImageNet's colour covariance, as used by Lucid and its descendants.
IMAGENET_COLOUR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _column_normalized(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.norm(dim=0).max()


def colour_matrix(spec: str | Sequence[float], channels: int) -> torch.Tensor | None:
    """The 3x3 matrix that colours decorrelated latents, or None for no colour mixing."""
    if spec == "none" or channels != 3:
        return None
    if spec == "imagenet":
        return _column_normalized(torch.tensor(IMAGENET_COLOUR_SQRT, dtype=torch.float32))
    return torch.tensor(spec, dtype=torch.float32).reshape(3, 3)


def colour_matrix_from_folder(folder: str | Path, max_images: int = 500) -> tuple[float, ...]:
    """Colouring matrix of a folder of photos: the inverse of the Cholesky whitening transform
    of their RGB covariance, scaled like the ImageNet matrix. Returns 9 floats for a Recipe."""
    from PIL import Image, UnidentifiedImageError

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise AtlasError(f"no images found in {folder} to compute a colour matrix from")
    pixels = []
    rng = np.random.default_rng(0)
    for path in paths[:max_images]:
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
        except (OSError, UnidentifiedImageError):
            continue
        take = min(len(rgb), 20_000)
        pixels.append(rgb[rng.choice(len(rgb), take, replace=False)])
    if not pixels:
        raise AtlasError(f"none of the images in {folder} could be read")
    covariance = np.cov(np.concatenate(pixels).T)
    try:
        whitening = np.linalg.cholesky(np.linalg.inv(covariance)).T
    except np.linalg.LinAlgError as error:
        raise AtlasError(f"the colours of the images in {folder} are degenerate") from error
    colouring = torch.tensor(np.linalg.inv(whitening), dtype=torch.float32)
    return tuple(float(v) for v in _column_normalized(colouring).flatten())


class PixelLatent(nn.Module):
    """One free value per pixel."""

    def __init__(self, batch: int, channels: int, size: int, **_settings: float):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(batch, channels, size, size))

    def forward(self) -> torch.Tensor:
        return self.latent

    @torch.no_grad()
    def inverse(self, image: torch.Tensor) -> None:
        self.latent.copy_(image)

    @torch.no_grad()
    def initialize(self, noise: torch.Tensor, scale: float, encode: Callable) -> None:
        encode(0.5 + noise * scale)  # grey plus noise, as an image


def falloff(size: int, decay: float) -> torch.Tensor:
    """1 / f^decay over a real-FFT spectrum of a size x size image, [size, size // 2 + 1]; the
    lowest frequency stands in for f = 0."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    return 1.0 / torch.sqrt(fy * fy + fx * fx).clamp(min=1.0 / size) ** decay


class FourierLatent(nn.Module):
    """A real-FFT spectrum whose coefficients are scaled by 1 / f^decay: equal steps on every
    coefficient then change low frequencies most, which suppresses high-frequency noise."""

    def __init__(self, batch: int, channels: int, size: int, *, decay: float, **_settings: float):
        super().__init__()
        self.size = size
        self.register_buffer("scale", falloff(size, decay))
        self.spectrum = nn.Parameter(torch.zeros(batch, channels, size, size // 2 + 1, 2))

    def forward(self) -> torch.Tensor:
        coefficients = torch.view_as_complex(self.spectrum) * self.scale
        return torch.fft.irfft2(coefficients, s=(self.size, self.size), norm="ortho") / 4

    @torch.no_grad()
    def inverse(self, image: torch.Tensor) -> None:
        coefficients = torch.fft.rfft2(image * 4, norm="ortho") / self.scale
        self.spectrum.copy_(torch.view_as_real(coefficients))

    @torch.no_grad()
    def initialize(self, noise: torch.Tensor, scale: float, encode: Callable) -> None:
        self.spectrum.copy_(noise * scale)  # grey plus noise in the spectrum


class PhaseLatent(nn.Module):
    """A spectrum whose magnitude is fixed at 1 / f^decay (the falloff of natural images) and
    whose phase alone is optimized, as in MACO (Fel et al., 2023): the image cannot gain
    energy in high frequencies, so it cannot turn into noise however long it is optimized.
    Each channel is standardized to `contrast`, the only scale left to choose."""

    def __init__(self, batch: int, channels: int, size: int, *, decay: float, contrast: float):
        super().__init__()
        self.size, self.contrast = size, contrast
        magnitude = falloff(size, decay)
        magnitude[0, 0] = 0.0  # no mean: the squash centres the image on grey
        self.register_buffer("magnitude", magnitude)
        self.phase = nn.Parameter(torch.zeros(batch, channels, size, size // 2 + 1))

    def forward(self) -> torch.Tensor:
        spectrum = torch.polar(self.magnitude.expand_as(self.phase), self._hermitian(self.phase))
        x = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        return x / x.std(dim=(-2, -1), keepdim=True).clamp(min=1e-8) * self.contrast

    def _hermitian(self, phase: torch.Tensor) -> torch.Tensor:
        """The phase with its self-conjugate columns (0, and the last for an even size) made
        odd in the row frequency, as a real image's spectrum has them: then the magnitude is
        exactly the fixed one, and irfft2 needs no guess (backends resolve a non-Hermitian
        input differently)."""
        columns = [0] + ([self.size // 2] if self.size % 2 == 0 else [])
        edges = phase[..., columns]
        mirrored = torch.roll(torch.flip(edges, dims=[-2]), 1, dims=-2)  # row k -> row -k
        phase = phase.clone()
        phase[..., columns] = (edges - mirrored) / 2
        return phase

    @torch.no_grad()
    def inverse(self, image: torch.Tensor) -> None:
        """Keeps the phase of `image`; its magnitude cannot be represented and is dropped
        (exact for an image this parameterization made)."""
        self.phase.copy_(torch.fft.rfft2(image, norm="ortho").angle())

    @torch.no_grad()
    def initialize(self, noise: torch.Tensor, scale: float, encode: Callable) -> None:
        """Uniform phases from standard-normal draws (through their normal CDF), whatever
        the scale."""
        self.phase.copy_(math.pi * torch.erf(noise / math.sqrt(2)))


LATENTS: dict[str, type[nn.Module]] = {
    "pixel": PixelLatent,
    "fourier": FourierLatent,
    "phase": PhaseLatent,
}  # a parameterization: one class with forward, inverse and initialize, and one entry here


class ColourMix(nn.Module):
    """Mixes decorrelated latent channels into RGB with a fixed matrix."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.register_buffer("inverse_matrix", torch.linalg.inv(matrix))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.matrix, latent)

    def inverse(self, rgb: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.inverse_matrix, rgb)


def _clip(x: torch.Tensor) -> torch.Tensor:
    """Clipped to [0, 1], with the gradient passed straight through so clipped pixels return."""
    return x + (x.clamp(0, 1) - x).detach()


@dataclass(frozen=True)
class Squash:
    """Maps the latent's values into [0, 1], and images back."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


SQUASHES: dict[str, Squash] = {
    "sigmoid": Squash(torch.sigmoid, lambda image: torch.logit(image.clamp(1e-4, 1 - 1e-4))),
    "clip": Squash(_clip, lambda image: image),
}


def named(registry: dict, name: str, what: str):
    """The entry `name` of a registry, or an AtlasError naming the choices."""
    if name not in registry:
        raise AtlasError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


class ImageParam(nn.Module):
    """latent -> colour mix -> squash; `encode(images)` writes images back into the latent."""

    def __init__(
        self,
        batch: int,
        channels: int,
        size: int,
        *,
        kind: str = "fourier",
        decay: float = 1.0,
        colour: torch.Tensor | None = None,
        squash: str = "sigmoid",
        contrast: float = 1.0,
    ):
        super().__init__()
        self.size = size
        self.squash = named(SQUASHES, squash, "squash")
        latent = named(LATENTS, kind, "parameterization")
        self.latent = latent(batch, channels, size, decay=decay, contrast=contrast)
        self.colour = ColourMix(colour) if colour is not None else None

    def forward(self) -> torch.Tensor:
        x = self.latent()
        if self.colour is not None:
            x = self.colour(x)
        return self.squash.forward(x)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> None:
        x = self.squash.inverse(images)
        if self.colour is not None:
            x = self.colour.inverse(x)
        self.latent.inverse(x)

    @torch.no_grad()
    def initialize(self, noise: torch.Tensor, scale: float) -> None:
        """The starting image from `noise`, per-image standard-normal draws shaped like the
        latent parameter: grey plus `scale` times the noise (pixels, or the spectrum for
        Fourier); a phase image starts from uniform random phases whatever the scale."""
        self.latent.initialize(noise, scale, self.encode)
