"""Backbone registry: `create(name, **overrides)` builds any registered variant.

Each architecture lives in one file that exposes its model class and a `VARIANTS` table
(variant name -> constructor kwargs); the registry is the union of those tables. A built
backbone declares what it can do beyond its features in `capabilities` (capabilities.py).
"""

from __future__ import annotations

import inspect

from torch import nn

from vitrail.backbones import conformer, dinov2, levit, mobileformer, resnet, swin, vit
from vitrail.errors import VitrailError

_ARCHITECTURES = [
    (vit.VisionTransformer, vit.VARIANTS),
    (dinov2.DinoVisionTransformer, dinov2.VARIANTS),
    (swin.SwinTransformer, swin.VARIANTS),
    (levit.LeViT, levit.VARIANTS),
    (conformer.Conformer, conformer.VARIANTS),
    (mobileformer.MobileFormer, mobileformer.VARIANTS),
    (resnet.build_resnet, resnet.VARIANTS),
]

_REGISTRY = {name: (cls, cfg) for cls, variants in _ARCHITECTURES for name, cfg in variants.items()}


def names() -> list[str]:
    return sorted(_REGISTRY)


def arguments(name: str) -> list[str]:
    """The keyword arguments backbone `name`'s constructor accepts."""
    return list(inspect.signature(_REGISTRY[name][0]).parameters)


def supports_masking(name: str) -> bool:
    """Whether backbone `name` can replace masked patch embeddings by a learned token (iBOT,
    DINOv2): it declares so by taking a `mask_token` argument (ViT, Swin)."""
    return "mask_token" in arguments(name)


def create(name: str, compiled: bool = False, **overrides) -> nn.Module:
    """Build backbone `name` with its variant table's kwargs, updated by `overrides`; with
    `compiled`, its forward runs through torch.compile (`run.compile`).

    `drop_path_rate`, which every SSL method passes for its student, is dropped for
    architectures without stochastic depth (ResNet, Mobile-Former) rather than failing.
    """
    if name not in _REGISTRY:
        raise VitrailError(f"unknown backbone {name!r}; known backbones: {', '.join(names())}")
    cls, cfg = _REGISTRY[name]
    if "drop_path_rate" not in arguments(name):
        overrides.pop("drop_path_rate", None)
    model = cls(**{**cfg, **overrides})
    # What rebuilds this network (export, load_exported); stochastic depth is a training-time choice.
    model.registry_name = name
    model.registry_kwargs = {key: value for key, value in overrides.items() if key != "drop_path_rate"}
    if compiled:
        model.compile()  # in place: the state-dict keys stay the backbone's own (no `_orig_mod.`)
    return model


def all_arguments(name: str, overrides: dict) -> dict:
    """Every constructor argument of backbone `name`: its defaults, updated by the variant table and `overrides`."""
    cls, cfg = _REGISTRY[name]
    defaults = {key: parameter.default for key, parameter in inspect.signature(cls).parameters.items()}
    return {**defaults, **cfg, **overrides}


# Last: exported.py builds backbones through this module's registry.
from vitrail.backbones.exported import load_exported  # noqa: E402,F401
