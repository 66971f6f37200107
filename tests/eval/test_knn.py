import os

import pytest
import torch
import torch.nn.functional as F

from vitrail.errors import VitrailError
from vitrail.eval import cache
from vitrail.eval.knn import knn_classify, knn_classify_multi_k, knn_predict
from vitrail.eval.knn_process import knn_in_subprocess

TEMPERATURE = 0.07


def brute_force_predict(train_features, train_labels, test_features, ks, num_classes):
    """DINO's weighted k-NN written out in full: whole similarity matrix, no FAISS."""
    similarity = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T
    # A stable sort instead of topk: equal similarities keep the lower training index first.
    ranked = similarity.sort(dim=1, descending=True, stable=True)
    predictions = {}
    for k in ks:
        weights = (ranked.values[:, :k] / TEMPERATURE).exp()
        votes = torch.zeros(len(test_features), num_classes).scatter_add_(
            1, train_labels[ranked.indices[:, :k]], weights)
        predictions[k] = votes.sort(dim=1, descending=True, stable=True).indices[:, :min(5, k)]
    return predictions


def clustered(num_train, num_test, dim, num_classes, noise, seed):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(num_classes, (num_train + num_test,), generator=generator)
    features = centers[labels] + noise * torch.randn(num_train + num_test, dim, generator=generator)
    return features[:num_train], labels[:num_train], features[num_train:], labels[num_train:]


@pytest.mark.parametrize("noise", [100.0, 2.5], ids=["random", "clustered"])
def test_predictions_equal_brute_force(noise):
    train_features, train_labels, test_features, test_labels = clustered(10_000, 2_000, 64, 50, noise, seed=0)
    ks = (1, 5, 20, 200)
    predictions = knn_predict(train_features, train_labels, test_features, ks, TEMPERATURE, num_classes=50)
    expected = brute_force_predict(train_features, train_labels, test_features, ks, num_classes=50)
    for k in ks:
        assert torch.equal(predictions[k], expected[k])
    top1 = 100.0 * (expected[20][:, 0] == test_labels).float().mean().item()
    assert knn_classify(train_features, train_labels, test_features, test_labels, k=20)["top1"] == pytest.approx(top1)
    if noise == 2.5:
        assert 40.0 < top1 < 90.0  # informative but not trivially separable: many close votes
    else:
        assert top1 < 10.0  # features carry no label information: chance is 2 %


@pytest.mark.parametrize("max_memory_mb", [512, 1], ids=["one-chunk", "streamed"])
def test_exact_ties_broken_like_brute_force(max_memory_mb):
    # Entries in {-1, 0, 1} with exactly four non-zeros: every similarity is a multiple of 1/4,
    # computed exactly in any summation order, so equal similarities are genuinely equal.
    generator = torch.Generator().manual_seed(1)
    def sparse_signs(count):
        support = torch.rand(count, 12, generator=generator).argsort(dim=1)[:, :4]
        signs = torch.randint(2, (count, 4), generator=generator) * 2.0 - 1.0
        return torch.zeros(count, 12).scatter_(1, support, signs)
    train_features, test_features = sparse_signs(3_000), sparse_signs(500)
    train_labels = torch.randint(7, (3_000,), generator=generator)
    ks = (3, 10, 50)
    # With 1 MB the index is filled, and straddling ties re-ranked, over several train chunks.
    predictions = knn_predict(train_features, train_labels, test_features, ks, TEMPERATURE,
                              max_memory_mb=max_memory_mb)
    expected = brute_force_predict(train_features, train_labels, test_features, ks, num_classes=7)
    for k in ks:
        assert torch.equal(predictions[k], expected[k])


def test_multi_k_equals_single_k_and_accepts_numpy():
    train_features, train_labels, test_features, test_labels = clustered(3_000, 500, 32, 10, 6.0, seed=2)
    ks = (10, 20, 100, 200)
    together = knn_classify_multi_k(train_features.numpy(), train_labels.numpy(), test_features.numpy(),
                                    test_labels.numpy(), ks=ks, max_memory_mb=1)  # several chunks
    for k in ks:
        assert together[k] == knn_classify(train_features, train_labels, test_features, test_labels, k=k)
    assert 0.0 < together[20]["top1"] < together[20]["top5"] < 100.0


def test_bad_inputs_name_the_problem():
    train_features, train_labels, test_features, test_labels = clustered(100, 20, 8, 3, 1.0, seed=3)
    with pytest.raises(VitrailError, match=r"train labels must have shape \(100,\)"):
        knn_classify(train_features, train_labels[:99], test_features, test_labels)
    with pytest.raises(VitrailError, match=r"test labels must have shape \(20,\)"):
        knn_classify(train_features, train_labels, test_features, test_labels[:5])
    with pytest.raises(VitrailError, match=r"k <= 100 \(the train set size\), got ks=\[101\]"):
        knn_classify(train_features, train_labels, test_features, test_labels, k=101)
    with pytest.raises(VitrailError, match="dimension 8 but test features 7"):
        knn_classify(train_features, train_labels, test_features[:, :7], test_labels)
    nan_features = test_features.clone()
    nan_features[13, 2] = float("nan")
    with pytest.raises(VitrailError, match="test features contain NaN or inf at row 13"):
        knn_classify(train_features, train_labels, nan_features, test_labels)
    with pytest.raises(VitrailError, match="non-negative integers"):
        knn_classify(train_features, train_labels.float(), test_features, test_labels)


def test_search_in_a_spawned_process_equals_in_process(tmp_path):
    train_features, train_labels, test_features, test_labels = clustered(3_000, 500, 32, 10, 6.0, seed=4)
    folders = []
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        # Cached as a probe would store them: 16 extra columns in front of the k-NN features.
        wide = torch.cat([torch.randn(len(features), 16), features], dim=1).numpy()
        batches = [(wide[start:start + 1000], labels[start:start + 1000].numpy(), ["key"] * len(wide[start:start + 1000]))
                   for start in range(0, len(wide), 1000)]
        folders.append(cache.store(tmp_path / name, batches, len(wide), {}).folder)
    ks = (10, 20, 100, 200)
    accuracies, pid = knn_in_subprocess(*folders, slice(16, None), ks, num_threads=1)
    assert pid != os.getpid()
    assert accuracies == knn_classify_multi_k(train_features, train_labels, test_features, test_labels, ks=ks)
