"""Weighted k-NN classification of frozen features with FAISS.

The protocol is DINO's (Caron et al. 2021, Sec. 4.1, after Wu et al. 2018): features are
l2-normalised, each test feature retrieves its k most cosine-similar training features, and
each neighbour votes for its label with weight exp(similarity / temperature); the class with
the largest summed weight is the prediction. DINO reports k = 20, temperature = 0.07.

Order is fully determined, so results equal a brute-force computation of the same protocol:
neighbours are ranked by similarity, then by training index (lower first); classes are ranked
by summed weight, then by class index (lower first).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from vitrail.errors import VitrailError
from vitrail.faiss_blas import faiss

ROW_BYTES_PER_DIM = 4  # a float32 copy per feature value: see `normalized_rows`


def knn_classify(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07,
                 max_memory_mb=512, num_threads=None):
    """Top-1 / top-5 accuracy (percent) of the weighted k-NN classifier; see knn_predict."""
    return knn_classify_multi_k(train_features, train_labels, test_features, test_labels, ks=(k,),
                                temperature=temperature, max_memory_mb=max_memory_mb,
                                num_threads=num_threads)[k]


def knn_classify_multi_k(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
                         temperature=0.07, max_memory_mb=512, num_threads=None):
    """{k: {"top1": %, "top5": %}} for every k in `ks` (DINO sweeps these four), from one search.

    The number of classes is max label + 1 over train and test.
    """
    train_labels = checked_labels(train_labels, len(train_features), "train")
    test_labels = checked_labels(test_labels, len(test_features), "test")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predictions = knn_predict(train_features, train_labels, test_features, ks, temperature, num_classes,
                              max_memory_mb, num_threads)
    accuracies = {}
    for k, ranked_classes in predictions.items():
        hits = ranked_classes == test_labels[:, None]
        accuracies[k] = {"top1": 100.0 * hits[:, 0].sum().item() / len(hits),
                         "top5": 100.0 * hits.sum().item() / len(hits)}
    return accuracies


def knn_predict(train_features, train_labels, test_features, ks=(20,), temperature=0.07, num_classes=None,
                max_memory_mb=512, num_threads=None):
    """{k: (N_test, min(5, k)) int64 classes, best first} for every k in `ks`.

    Features are (N, D) torch tensors or numpy arrays, memory-mapped ones included, and labels
    (N,) integers; `num_classes` defaults to max train label + 1. One exact FAISS inner-product
    search with max(ks) neighbours serves every k; it runs on the GPU when FAISS sees one.

    Memory: the normalised train set (N_train x D float32) is held once; our own chunks stay
    under `max_memory_mb`, and FAISS's and BLAS's work buffers come on top (a few MB at
    1.28M x 768, see benchmarks/knn_memory.py). Features are never copied whole: the train set
    is normalised and the test set searched in chunks. Chunks below a few thousand queries slow
    FAISS's CPU search down a lot (per-call overhead, and its non-BLAS path for small batches),
    so keep the budget generous. FAISS uses `num_threads` OpenMP
    threads; default: the cores this process may run on.
    """
    train_features, test_features = feature_rows(train_features, "train"), feature_rows(test_features, "test")
    train_labels = checked_labels(train_labels, len(train_features), "train")
    if train_features.shape[1] != test_features.shape[1]:
        raise VitrailError(f"train features have dimension {train_features.shape[1]} but test features "
                           f"{test_features.shape[1]}; both must come from the same backbone")
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or ks[-1] > len(train_features):
        raise VitrailError(f"k-NN needs 1 <= k <= {len(train_features)} (the train set size), got ks={ks}")
    if temperature <= 0:
        raise VitrailError(f"k-NN temperature must be > 0, got {temperature}")
    num_classes = num_classes or int(train_labels.max()) + 1

    budget = max_memory_mb * 2**20
    dim = train_features.shape[1]
    max_k = ks[-1]
    # One neighbour beyond max_k reveals ties that straddle the last kept rank.
    search_k = min(max_k + 1, len(train_features))
    # Per query: its row read, checked and normalised (`normalized_rows`); sims, ids, labels; votes and their sort.
    bytes_per_query = ROW_BYTES_PER_DIM * dim + search_k * (4 + 8 + 8) + num_classes * (4 + 4 + 8)
    chunk = max(1, budget // bytes_per_query)
    train_chunk = max(1, budget // (ROW_BYTES_PER_DIM * dim))

    faiss.omp_set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    bank = _normalized_bank(train_features, train_chunk)
    gpu = faiss.StandardGpuResources() if faiss.get_num_gpus() > 0 else None

    predictions = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk):
        queries = normalized_rows(test_features, start, start + chunk, "test")
        similarities, neighbours = (
            faiss.knn_gpu(gpu, queries.numpy(), bank, search_k, metric=faiss.METRIC_INNER_PRODUCT) if gpu
            else faiss.knn(queries.numpy(), bank, search_k, faiss.METRIC_INNER_PRODUCT))
        similarities, neighbours = _ranked_neighbours(
            torch.from_numpy(similarities), torch.from_numpy(neighbours), queries, train_features, max_k, budget)
        neighbour_labels = train_labels[neighbours]  # (B, max_k)
        for k in ks:
            votes = torch.zeros(len(queries), num_classes).scatter_add_(
                1, neighbour_labels[:, :k], (similarities[:, :k] / temperature).exp())
            ranked_classes = votes.sort(dim=1, descending=True, stable=True).indices
            # As DINO: with fewer than 5 neighbours only the classes that got votes can count.
            predictions[k].append(ranked_classes[:, :min(5, k)])
    return {k: torch.cat(ranked) for k, ranked in predictions.items()}


def _normalized_bank(train_features, chunk_rows):
    """The normalised train rows in one float32 array, filled a chunk at a time. FAISS searches it
    as it is (`faiss.knn`, an exact search without an index): an index would hold a copy of its
    own, and filling one with `index.add` per chunk grows that copy by doubling, a transient third
    of the index at 1.28M rows (BENCHMARKS.md, k-NN memory)."""
    bank = np.empty(train_features.shape, np.float32)
    for start in range(0, len(bank), chunk_rows):
        bank[start:start + chunk_rows] = normalized_rows(train_features, start, start + chunk_rows, "train").numpy()
    return bank


def _ranked_neighbours(similarities, neighbours, queries, train_features, max_k, budget):
    """The first max_k neighbours ordered by similarity, then lower training index.

    FAISS returns equal similarities in descending index order, and when equal similarities
    straddle rank max_k it keeps an arbitrary subset of them; those few queries are re-ranked
    exhaustively so the kept set is the canonical one.
    """
    straddles = torch.zeros(len(queries), dtype=torch.bool)
    if similarities.shape[1] > max_k:
        straddles = similarities[:, max_k - 1] == similarities[:, max_k]
    similarities, neighbours = similarities[:, :max_k], neighbours[:, :max_k]
    # Sort by index, then stably by similarity: ties end up in ascending index order.
    by_index = neighbours.sort(dim=1, stable=True).indices
    similarities, neighbours = similarities.gather(1, by_index), neighbours.gather(1, by_index)
    by_similarity = similarities.sort(dim=1, descending=True, stable=True).indices
    similarities, neighbours = similarities.gather(1, by_similarity), neighbours.gather(1, by_similarity)
    if straddles.any():
        similarities[straddles], neighbours[straddles] = _exhaustive_top(queries[straddles], train_features,
                                                                         max_k, budget)
    return similarities, neighbours


def _exhaustive_top(queries, train_features, max_k, budget):
    """Each query's max_k most similar train rows, equal similarities in ascending index order,
    from the whole train set streamed in chunks."""
    rows = max(max_k, budget // (len(queries) * 2 * (4 + 8) + ROW_BYTES_PER_DIM * train_features.shape[1]))
    best_similarities = torch.empty(len(queries), 0)
    best_neighbours = torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, len(train_features), rows):
        similarities = queries @ normalized_rows(train_features, start, start + rows, "train").T
        neighbours = torch.arange(start, start + similarities.shape[1]).expand_as(similarities)
        # The best so far all have lower indices and come first: a stable sort keeps ties by index.
        similarities = torch.cat([best_similarities, similarities], dim=1)
        neighbours = torch.cat([best_neighbours, neighbours], dim=1)
        kept = similarities.sort(dim=1, descending=True, stable=True).indices[:, :max_k]
        best_similarities, best_neighbours = similarities.gather(1, kept), neighbours.gather(1, kept)
    return best_similarities, best_neighbours


def feature_rows(features, split):
    """(N, D) features as given (a tensor or a numpy array, memory-mapped or not), or a
    VitrailError naming the problem. Nothing is copied: rows are read by `normalized_rows`."""
    if not isinstance(features, (torch.Tensor, np.ndarray)):
        features = np.asarray(features)
    if features.ndim != 2 or len(features) == 0:
        raise VitrailError(f"{split} features must be a non-empty (N, D) array, got shape {tuple(features.shape)}")
    return features


def normalized_rows(features, start, stop, split):
    """Rows start:stop of `feature_rows` output as a new l2-normalised float32 tensor, checked
    finite; it takes ROW_BYTES_PER_DIM bytes per value: one copy, normalised in place."""
    rows = features[start:stop]
    rows = (torch.from_numpy(np.array(rows, dtype=np.float32)) if isinstance(rows, np.ndarray)
            else rows.detach().to("cpu", torch.float32, copy=True))
    norms = rows.norm(dim=1, keepdim=True)
    check_finite(norms, split, offset=start)  # a NaN or inf anywhere in a row makes its norm one
    # x / max(|x|, eps), as F.normalize, without its second copy
    return rows.div_(norms.clamp_min_(1e-12))


def check_finite(rows, split, offset=0):
    """A VitrailError naming the first row of (N, D) `rows` holding a NaN or inf."""
    if not torch.isfinite(rows).all():
        first = (~torch.isfinite(rows)).any(dim=1).nonzero()[0].item() + offset
        raise VitrailError(f"{split} features contain NaN or inf at row {first}; check the backbone's forward pass")


def checked_features(features, split):
    """(N, D) float32 CPU features, or a VitrailError naming the problem."""
    features = torch.as_tensor(feature_rows(features, split)).detach().cpu().float().contiguous()
    check_finite(features, split)
    return features


def checked_labels(labels, num_features, split):
    """(N,) int64 CPU labels, one per feature, or a VitrailError naming the problem."""
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.ndim != 1 or len(labels) != num_features or num_features == 0:
        raise VitrailError(f"{split} labels must have shape ({num_features},), one per {split} feature, "
                           f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.min() < 0:
        raise VitrailError(f"{split} labels must be non-negative integers, got dtype {labels.dtype} "
                           f"with minimum {labels.min().item()}")
    return labels.long()
