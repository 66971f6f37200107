"""The backbone to evaluate, from a vitrail run or from a checkpoint in DINO's / iBOT's / DINOv2's released formats.

A vitrail checkpoint stores its config, so it rebuilds itself. Any other file is read as DINO's
`load_pretrained_weights` reads one (DINO utils.py; iBOT keeps the same function):
  - a plain backbone state dict (dino_deitsmall16_pretrain.pth): `cls_token`, `pos_embed`,
    `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ..., `norm.weight`;
  - DINO's training checkpoint: {"teacher": {"module.backbone.<key>" or "backbone.<key>"}, "student", ...};
    the teacher is evaluated, DINO's default checkpoint key;
  - iBOT's released backbones (checkpoint_teacher.pth): {"state_dict": {<key>: ...}};
  - DINOv2's hub backbones (dinov2_vits14_pretrain.pth, ..._reg4_pretrain.pth): plain state dicts
    (`--arch dinov2_vits14` etc.), and its training teacher_checkpoint.pth ({"teacher": ...}).
`module.` and `backbone.` prefixes are stripped; projection heads (`head.*`, DINOv2's `dino_head.*`
and `ibot_head.*`) and the mask embeddings of backbones without one are dropped. Such files carry no architecture, so `--arch` names it; the ViT patch size, input
channels and position grid are read from the weights (`--patch-size`, when given, is checked).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vitrail import backbones, checkpoints, ssl, storage
from vitrail.backbones.weights import fit
from vitrail.errors import VitrailError
from vitrail.config import Config, DataSection, from_dict

_WRAPPER_KEYS = ("teacher", "state_dict")  # DINO's training checkpoint, iBOT's released backbones
_PREFIXES = ("module.", "backbone.")
RELEASED_CROP = 224  # DINO evaluates 224 centre crops (of images resized to 256)


@dataclass
class Checkpoint:
    file: str  # a local path or a URL
    step: int | None  # None for released weights
    data: DataSection  # channels and normalisation the backbone expects
    crop_size: int  # the size it trained at
    eval_train_shards: str | None
    eval_test_shards: str | None
    backbone: nn.Module
    build_random: Callable[[], nn.Module]  # the same architecture, seeded random init (a baseline)
    config: Config | None = None  # a vitrail run's; None for released weights
    method: nn.Module | None = None  # a vitrail run's trained method (student and teacher)

    @property
    def name(self) -> str:
        return f"pretrained (step {self.step})" if self.step is not None else f"pretrained ({storage.name(self.file)})"

    def identity(self) -> dict:
        """What the features depend on: the file as it is now (path, size, mtime) and its step."""
        size, mtime_ns = storage.size_and_mtime(self.file)
        return {"file": storage.absolute(self.file), "size": size, "mtime_ns": mtime_ns, "step": self.step}


def open_checkpoint(path: str | os.PathLike, arch: str | None = None, patch_size: int | None = None) -> Checkpoint:
    """A run dir (its latest checkpoint), a vitrail checkpoint file, or released DINO / iBOT weights."""
    file, state = load_state(path)
    if is_vitrail_checkpoint(state):
        return vitrail_checkpoint(file, state, arch)
    return _released_checkpoint(file, state, arch, patch_size)


def load_state(path: str | os.PathLike) -> tuple[str, object]:
    """(the file read, what it holds): a run dir's latest checkpoint, or the file `path` names."""
    file = storage.absolute(path)
    storage.check_readable(file, "checkpoint")
    if storage.is_dir(file):
        found = checkpoints.list_checkpoints(file)
        file = found[-1] if found else file  # checkpoints.load names the empty folder
    # DINO's training checkpoints store their argparse.Namespace; allow only that beyond tensors.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return file, checkpoints.load(file)


def is_vitrail_checkpoint(state) -> bool:
    return isinstance(state, dict) and "config" in state and "method" in state


def results_dir(path: str | os.PathLike) -> str:
    """Where a checkpoint's results.json and feature cache go: its run dir, else the file's folder."""
    path = storage.absolute(path)
    if storage.is_dir(path):
        return path
    folder = storage.parent(path)
    if storage.name(folder).startswith("step-"):  # RUN_DIR/checkpoints/step-N/state.pt
        folder = storage.parent(folder)
    return storage.parent(folder) if storage.name(folder) == "checkpoints" else folder


def _seeded(build):
    # The random-init baseline is the same network every run, so its features can be cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def vitrail_checkpoint(file: str, state: dict, arch: str | None = None) -> Checkpoint:
    config = from_dict(state["config"], f"config stored in {file}")
    if arch is not None and arch != config.model.backbone:
        raise VitrailError(f"--arch {arch} disagrees with {file}, a vitrail checkpoint of a {config.model.backbone}; "
                           "drop --arch (vitrail runs store their backbone)")
    config.run.compile = False  # one pass over the evaluation data would not repay a compilation

    def build():
        return ssl.build(config, steps_per_epoch=1, total_steps=1)

    method = build()
    method.load_state_dict(state["method"])
    return Checkpoint(file, int(state["step"]), config.data, ssl.trained_crop_size(config.method), config.data.eval_train_shards,
                      config.data.eval_test_shards, method.backbone_for_eval(),
                      lambda: _seeded(build).backbone_for_eval(), config, method)


def _released_checkpoint(file: str, state, arch: str | None, patch_size: int | None) -> Checkpoint:
    if arch is None:
        raise VitrailError(f"{file} is not a vitrail run checkpoint (it stores no config), so its architecture must be "
                           f"named: pass --arch (one of {', '.join(backbones.names())}) and, for a ViT, --patch-size "
                           "(e.g. --arch vit_small --patch-size 16 for dino_deitsmall16_pretrain.pth)")
    if arch not in backbones.names():
        raise VitrailError(f"unknown --arch {arch!r}; known backbones: {', '.join(backbones.names())}")
    weights = backbone_weights(state, file)
    kwargs = _vit_geometry(weights, file, patch_size) if "patch_size" in backbones.arguments(arch) else {}

    def build():
        return backbones.create(arch, **kwargs)

    backbone = build()
    fit(backbone, weights, str(file))
    channels = kwargs.get("in_chans", 3)
    if channels != 3:
        raise VitrailError(f"{file} takes {channels}-channel input; released weights are evaluated with DINO's RGB "
                           "ImageNet normalisation, so only 3-channel backbones are supported")
    return Checkpoint(file, None, DataSection(), RELEASED_CROP, None, None, backbone, lambda: _seeded(build))


def backbone_weights(state, file: str) -> dict[str, torch.Tensor]:
    """The tensors of a released checkpoint under the backbone's own key names."""
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    weights = {}
    for name, value in state.items() if isinstance(state, dict) else ():
        if isinstance(value, torch.Tensor):
            for prefix in _PREFIXES:
                name = name.removeprefix(prefix)
            weights[name] = value
    if not weights:
        raise VitrailError(f"{file} holds no backbone weights: expected a state dict, or one under "
                           f"{' or '.join(repr(key) for key in _WRAPPER_KEYS)}")
    return weights


def _vit_geometry(weights: dict, file: str, patch_size: int | None) -> dict:
    if "patch_embed.proj.weight" not in weights or "pos_embed" not in weights:
        raise VitrailError(f"{file} has no 'patch_embed.proj.weight' / 'pos_embed': not a ViT state dict")
    embed_dim, channels, stored_patch, _ = weights["patch_embed.proj.weight"].shape  # (D, C, p, p)
    if patch_size is not None and patch_size != stored_patch:
        raise VitrailError(f"--patch-size {patch_size} does not match {file}, whose patch embedding is "
                           f"{stored_patch}x{stored_patch}")
    grid = math.isqrt(weights["pos_embed"].shape[1] - 1)
    return {"patch_size": stored_patch, "in_chans": channels, "img_size": grid * stored_patch}
