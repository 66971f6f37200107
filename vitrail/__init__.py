"""vitrail: self-supervised pretraining of vision backbones, from shards to frozen-feature evaluation."""

from vitrail.errors import VitrailError

__all__ = ["VitrailError"]
__version__ = "0.1.0"
