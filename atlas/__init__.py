"""atlas: feature atlases of image CNNs."""

__version__ = "0.1.0"
