"""DeepCluster: deep clustering for unsupervised learning of visual features
(Caron, Bojanowski, Joulin & Douze, ECCV 2018, arXiv:1807.05520).

Before training and after every epoch, the features of the whole training set are PCA-whitened,
l2-normalised and clustered by k-means; the cluster assignments become pseudo-labels, and the
backbone with a freshly initialised linear classifier learns to predict them for an epoch.

The paper uses AlexNet / VGG-16 on Sobel-filtered images; our recipe uses a ResNet on the
images themselves. The loop calls `on_epoch_start` with a function giving the training set's
features (eval transform) and sample keys; the assignment is kept by sample key in buffers,
so a resumed run continues with the clusters it had.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitrail import backbones
from vitrail.errors import VitrailError
from vitrail.faiss_blas import faiss
from vitrail.pipelines.views import EvalTransform, SingleCrop, Views, key_ids, sample_generator
from vitrail.ssl.base import FeaturesOf, Method
from vitrail.ssl.optim import OptimizerRecipe


class DeepClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["deepcluster"] = "deepcluster"
    # Sec. 4 / official main.py: SGD, lr 0.05 (constant), momentum 0.9, weight decay 1e-5 on every
    # parameter, batch 256; the classifier has its own SGD without momentum (its `optimizer_tl`).
    paper_optimizer: ClassVar[OptimizerRecipe] = OptimizerRecipe(
        name="sgd", lr=0.05, lr_scaling="none", warmup_epochs=0, lr_schedule="steps",
        weight_decay=1e-5, weight_decay_end=1e-5, clip_grad=0.0, momentum=0.9, nesterov=False)
    paper_drop_path_rate: ClassVar[float] = 0.0  # AlexNet / VGG-16: no stochastic depth
    # Clustering (Sec. 3.2 and 4, official main.py / clustering.py): k = 10000 on ImageNet;
    # PCA to 256 whitened dimensions, l2-normalised; FAISS k-means, 20 iterations.
    num_clusters: int = Field(10000, ge=2)
    pca_dim: int = Field(256, ge=1)
    kmeans_iterations: int = Field(20, ge=1)
    # Augmentation (Sec. 4): random resized 224 crops and horizontal flips.
    crop_size: int = Field(224, ge=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @property
    def trained_crop_size(self) -> int:
        return self.crop_size

    def views(self) -> SingleCrop:
        return SingleCrop(self.crop_size, self.crop_scale)

    def eval_transform(self) -> EvalTransform:
        """The features that get clustered: resize by 256/224 of the crop, centre crop."""
        return EvalTransform.at(self.crop_size)


def pca_whiten(features: np.ndarray, dim: int) -> np.ndarray:
    """(N, D) -> (N, min(dim, D)) float32: PCA with whitening (eigenvalues to the power -0.5),
    then l2-normalisation, as DeepCluster's `preprocess_features`."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    pca = faiss.PCAMatrix(features.shape[1], min(dim, features.shape[1]), -0.5)
    pca.train(features)
    whitened = pca.apply(features)
    faiss.normalize_L2(whitened)
    return whitened


def kmeans(points: np.ndarray, k: int, iterations: int, seed: int) -> tuple[np.ndarray, float]:
    """FAISS k-means of (N, d) float32 points: (assignment (N,) int64, final objective).

    FAISS re-seeds a cluster that empties during training by splitting a large one, which is
    DeepCluster's remedy for empty clusters (Sec. 3.3).
    """
    if k > len(points):
        raise VitrailError(f"method.num_clusters={k} is larger than the {len(points)} training samples; "
                           "lower method.num_clusters")
    clustering = faiss.Clustering(points.shape[1], k)
    clustering.niter = iterations
    clustering.early_stop_threshold = -1.0  # run all `iterations`, as DeepCluster's FAISS did (no early stop then)
    clustering.seed = seed
    # Cluster every point; FAISS would otherwise subsample to 256 per centroid.
    clustering.max_points_per_centroid = 10_000_000
    index = faiss.IndexFlatL2(points.shape[1])
    clustering.train(points, index)
    _, assignment = index.search(points, 1)
    return assignment[:, 0].astype(np.int64), float(clustering.iteration_stats.at(iterations - 1).obj)


class DeepCluster(Method):
    """Backbone + re-initialised linear classifier on k-means pseudo-labels.

    Uniform sampling over clusters (Sec. 3.3), which keeps a few large clusters from dominating,
    has a streaming equivalent: each sample's cross-entropy is weighted by the inverse of its
    cluster's size, normalised over the batch. The classifier is re-initialised in place at each
    clustering; under the paper's SGD it has no momentum, so nothing of the old one carries over
    (under AdamW, a demo's choice, its moments do).
    """

    def __init__(self, config: DeepClusterConfig, backbone: str, backbone_kwargs: dict,
                 steps_per_epoch: int, total_steps: int, drop_path_rate: float):
        super().__init__(config, steps_per_epoch, total_steps)
        self.backbone = backbones.create(backbone, **backbone_kwargs,
                                         drop_path_rate=drop_path_rate)
        self.classifier = nn.Linear(self.backbone.embed_dim, config.num_clusters)
        # Drawn from the run's seeded RNG; epoch e clusters with a seed derived from (seed, e).
        self.register_buffer("clustering_seed", torch.randint(0, 2**62, ()))
        # The assignment: sample key ids, sorted, and their clusters; sized at the first clustering.
        self.register_buffer("assigned_keys", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("assigned_clusters", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("cluster_sizes", torch.zeros(config.num_clusters, dtype=torch.int64))
        self.register_buffer("nmi_previous", torch.tensor(float("nan")))
        self.register_buffer("kmeans_objective", torch.tensor(float("nan")))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The assignment's length is the training set's, known only once it has been clustered.
        for name in ("assigned_keys", "assigned_clusters"):
            if prefix + name in state_dict:
                getattr(self, name).resize_(state_dict[prefix + name].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kmeans_seed(self, epoch: int) -> int:
        return int(torch.randint(0, 2**31 - 1, (), generator=sample_generator(int(self.clustering_seed), epoch, "kmeans")))

    @torch.no_grad()
    def assign(self, features: np.ndarray, keys: list[str], epoch: int) -> None:
        """Cluster (N, D) features of the samples `keys` into the pseudo-labels of `epoch`."""
        config = self.config
        clusters, objective = kmeans(pca_whiten(features, config.pca_dim), config.num_clusters,
                                     config.kmeans_iterations, self.kmeans_seed(epoch))
        ids = torch.from_numpy(key_ids(keys))
        order = ids.argsort()
        ids, clusters = ids[order], torch.from_numpy(clusters)[order]
        # How much the clusters moved since the last epoch (the paper's Fig. 2b): NMI -> 1 as they settle.
        if torch.equal(self.assigned_keys.cpu(), ids):
            # Imported here: sklearn.metrics costs ~2 s of CPU in every process that imports the
            # method registry (each Ray worker and view task), for one call an epoch.
            from sklearn.metrics import normalized_mutual_info_score

            self.nmi_previous.fill_(normalized_mutual_info_score(self.assigned_clusters.cpu().numpy(), clusters.numpy()))
        self.assigned_keys.resize_(ids.shape).copy_(ids)
        self.assigned_clusters.resize_(clusters.shape).copy_(clusters)
        self.cluster_sizes.copy_(torch.bincount(clusters, minlength=config.num_clusters))
        self.kmeans_objective.fill_(objective)
        # A new classifier for the new labels (official main.py: N(0, 0.01) weights, zero bias).
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def on_epoch_start(self, epoch: int, features_of: FeaturesOf) -> None:
        features, keys = features_of(self.backbone, self.config.eval_transform())
        self.assign(features, keys, epoch)

    def pseudo_labels(self, ids: torch.Tensor) -> torch.Tensor:
        if self.assigned_keys.numel() == 0:
            raise VitrailError("DeepCluster has no cluster assignment yet: the training loop must call on_epoch_start")
        position = torch.searchsorted(self.assigned_keys, ids).clamp_(max=len(self.assigned_keys) - 1)
        if not torch.equal(self.assigned_keys[position], ids):
            raise VitrailError("a training sample was not in the last clustering; did data.shards change mid-run?")
        return self.assigned_clusters[position]

    def training_step(self, views: Views, step: int):
        labels = self.pseudo_labels(views.key_ids)
        logits = self.classifier(self.backbone(views.crops[0])).float()
        inverse_sizes = torch.where(self.cluster_sizes > 0, 1.0 / self.cluster_sizes.clamp(min=1), 0.0)
        loss = F.cross_entropy(logits, labels, weight=inverse_sizes.float())
        nonempty = self.cluster_sizes[self.cluster_sizes > 0]
        return loss, {
            "loss": loss.detach(),
            "pseudo_label_accuracy": (logits.argmax(dim=1) == labels).float().mean(),
            "clusters/nonempty": float(len(nonempty)),
            "clusters/largest": float(nonempty.max()),
            "clusters/smallest": float(nonempty.min()),
            "clusters/nmi_previous": self.nmi_previous,
            "clusters/kmeans_objective": self.kmeans_objective,
        }

    def parameter_groups(self) -> list[dict]:
        """The official code's two SGDs: the backbone's with momentum, the classifier's without;
        weight decay on every parameter, biases and BatchNorm included."""
        backbone = [parameter for parameter in self.backbone.parameters() if parameter.requires_grad]
        return [{"params": backbone, "decay": True, "lr_multiplier": 1.0},
                {"params": list(self.classifier.parameters()), "decay": True, "lr_multiplier": 1.0, "momentum": 0.0}]

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def backbone_for_eval(self) -> nn.Module:
        return self.backbone

    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.backbone, self.backbone  # one network: it is student and teacher
