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
from vitrail.eval.features import embedded, gathered, image_batches
from vitrail.eval.images import attention_grid, cls_attention_maps, view_grid
from vitrail.eval.knn import knn_classify
from vitrail.pipelines.shards import ShardIndex, read_index
from vitrail.pipelines.views import EvalTransform

log = logging.getLogger("vitrail.monitor")
VIEW_SAMPLES = 4


def eval_transform(config) -> EvalTransform:
    return EvalTransform.at(ssl.trained_crop_size(config.method))


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
        views = self.views.to_device(first, self.device, data.normalization)
        return view_grid(views, len(first["label"]), data.normalization, VIEW_SAMPLES)

    def knn(self, backbone: nn.Module) -> dict[str, float]:
        settings, data = self.settings, self.config.data
        if self._bank is None:  # decoded once, kept as uint8 eval crops
            bank, queries = self._knn_indexes
            self._bank = self.decoded(bank, settings.knn_train_samples)
            self._queries = self.decoded(queries, settings.knn_test_samples)
        (train, train_labels), (test, test_labels) = (
            gathered(embedded(backbone, batches, data.normalization, self.device), "the online k-NN subset")
            for batches in (self._bank, self._queries))
        accuracy = knn_classify(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test),
                                torch.from_numpy(test_labels), k=settings.k, temperature=settings.temperature)
        return {"knn/top1": accuracy["top1"], "knn/top5": accuracy["top5"]}

    def decoded(self, index: ShardIndex, limit: int) -> list[dict]:
        """The first `limit` samples of a shard set as uint8 eval-crop batches."""
        return list(image_batches(index, self.transform, self.config.data.channels, limit=limit,
                                  max_pixels=self.config.data.max_image_pixels))

    def has_attention(self, backbone: nn.Module) -> bool:
        if not backbone.capabilities.cls_attention and not self._attention_skipped:
            log.warning("no attention maps: the %s backbone has no CLS-token attention", type(backbone).__name__)
            self._attention_skipped = True
        return backbone.capabilities.cls_attention

    def attention_grid(self, backbone: nn.Module):
        data = self.config.data
        if self._attention_images is None:
            index = read_index(data.eval_test_shards or data.shards)
            self._attention_images = torch.from_numpy(self.decoded(index, self.settings.attention_images)[0]["image"])
        images = self._attention_images
        attention = backbone.last_self_attention(data.normalization(images.to(self.device)))
        grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
        return attention_grid(images, cls_attention_maps(attention.float().cpu(), grid))
