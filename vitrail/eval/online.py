"""What rank 0 watches while pretraining: an online k-NN probe, the training views, attention maps.

The k-NN (solo-learn's online k-NN, with DINO's weighted vote) classifies the first
`eval.knn_test_samples` of `data.eval_test_shards` against the first `eval.knn_train_samples`
of `data.eval_train_shards`, every `eval.knn_every` steps and at the last step. Both subsets
are decoded and eval-cropped once and kept as uint8, so an evaluation is one forward pass of
the eval backbone over them plus one FAISS search.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from torch import nn

from vitrail import ssl
from vitrail.eval.features import embed_images
from vitrail.eval.images import attention_grid, cls_attention_maps, view_grid
from vitrail.eval.knn import knn_classify
from vitrail.pipelines.shards import ShardIndex, read_index
from vitrail.pipelines.stream import local_batches
from vitrail.pipelines.views import EvalTransform, normalize

log = logging.getLogger("vitrail.monitor")
VIEW_SAMPLES = 4


def eval_transform(config) -> EvalTransform:
    return EvalTransform.at(ssl.trained_crop_size(config.method))


def decoded_subset(index: ShardIndex, transform: EvalTransform, data, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` samples of a shard set (decoded as `data`, the config's section), eval-cropped:
    uint8 (N, C, S, S) and labels (N,)."""
    images, labels, seen = [], [], 0
    for batch in local_batches(index, transform, seed=0, channels=data.channels, batch_size=256,
                               shuffle=False, epochs=1, drop_last=False, max_pixels=data.max_image_pixels):
        images.append(torch.from_numpy(batch["image"]))
        labels.append(torch.from_numpy(batch["label"]))
        seen += len(batch["image"])
        if seen >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


@contextmanager
def evaluating(module: nn.Module):
    """`module` in eval mode under no_grad, then every submodule back in its own mode."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for child, training in modes:
            child.training = training


def features_of(backbone: nn.Module, images: torch.Tensor, mean, std, device, batch_size: int = 256) -> torch.Tensor:
    """Backbone features (N, D) float32 on the CPU of uint8 images (N, C, S, S)."""
    return torch.cat([embed_images(backbone, chunk, mean, std, device) for chunk in images.split(batch_size)])


class OnlineMonitor:
    """Called by the training loop on rank 0 after every optimizer step; logs through `report`."""

    def __init__(self, config, device, report, stop_step: int):
        self.config, self.device, self.report, self.stop_step = config, device, report, stop_step
        self.settings = config.eval
        self.transform = eval_transform(config)
        self.views = config.method.views()
        data = config.data
        # Read now, so that missing eval shards stop the run before its first step, not at the first k-NN.
        self._knn_indexes = None
        if self.settings.knn_every:
            self._knn_indexes = read_index(data.eval_train_shards), read_index(data.eval_test_shards)
        self._bank = self._queries = self._attention_images = None
        self._views_logged = self._attention_skipped = False

    def after_step(self, method: nn.Module, batch: dict, step: int) -> float:
        """Evaluate and log what is due at `step` (the count of steps done); returns the seconds taken."""
        started = time.perf_counter()
        settings, final = self.settings, step == self.stop_step
        knn_due = bool(settings.knn_every) and (step % settings.knn_every == 0 or final)
        first_images = settings.images and not self._views_logged and (step % self.config.run.log_every == 0 or final)
        attention_due = settings.images and (first_images or (
            step % settings.attention_every == 0 if settings.attention_every else knn_due))
        metrics, images = {}, {}
        if first_images:
            images["views"] = self.view_grid(batch)
            self._views_logged = True
        if knn_due or attention_due:
            backbone = method.backbone_for_eval()
            with evaluating(backbone):
                if knn_due:
                    metrics.update(self.knn(backbone))
                if attention_due and self.has_attention(backbone):
                    images["attention"] = self.attention_grid(backbone)
        if metrics or images:
            self.report(metrics, step, images=images)
        return time.perf_counter() - started

    def view_grid(self, batch: dict):
        data = self.config.data
        first = {column: values[:VIEW_SAMPLES] for column, values in batch.items()}
        views = self.views.to_device(first, self.device, data.mean, data.std)
        return view_grid(views, len(first["label"]), data.mean, data.std, VIEW_SAMPLES)

    def knn(self, backbone: nn.Module) -> dict[str, float]:
        settings, data = self.settings, self.config.data
        if self._bank is None:
            bank, queries = self._knn_indexes
            self._bank = decoded_subset(bank, self.transform, data, settings.knn_train_samples)
            self._queries = decoded_subset(queries, self.transform, data, settings.knn_test_samples)
        train, test = (features_of(backbone, images, data.mean, data.std, self.device) for images, _ in (self._bank, self._queries))
        accuracy = knn_classify(train, self._bank[1], test, self._queries[1], k=settings.k, temperature=settings.temperature)
        return {"knn/top1": accuracy["top1"], "knn/top5": accuracy["top5"]}

    def has_attention(self, backbone: nn.Module) -> bool:
        if not hasattr(backbone, "last_self_attention") and not self._attention_skipped:
            log.warning("no attention maps: the %s backbone has no CLS-token attention", type(backbone).__name__)
            self._attention_skipped = True
        return hasattr(backbone, "last_self_attention")

    def attention_grid(self, backbone: nn.Module):
        data = self.config.data
        if self._attention_images is None:
            index = read_index(data.eval_test_shards or data.shards)
            self._attention_images = decoded_subset(index, self.transform, data, self.settings.attention_images)[0]
        images = self._attention_images
        attention = backbone.last_self_attention(normalize(images.to(self.device), data.mean, data.std))
        grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
        return attention_grid(images, cls_attention_maps(attention.float().cpu(), grid))
