import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from vitrail.errors import VitrailError
from vitrail.eval.linear import linear_probe
from vitrail.pipelines.datasets import load_fashion_mnist

NUM_TRAIN = 20_000


def fashion_mnist_pixels():
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    train_pixels = train_images[:NUM_TRAIN].reshape(NUM_TRAIN, -1) / 255.0
    return train_pixels, train_labels[:NUM_TRAIN], test_images.reshape(len(test_images), -1) / 255.0, test_labels


def test_probe_matches_logistic_regression_on_fashion_mnist_pixels():
    train_pixels, train_labels, test_pixels, test_labels = fashion_mnist_pixels()
    # One BLAS thread: lbfgs at this size gains little from threads and stalls when the CPU is shared.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # sklearn's default 100 lbfgs iterations
        reference = 100.0 * LogisticRegression().fit(train_pixels, train_labels).score(test_pixels, test_labels)

    result = linear_probe(torch.from_numpy(train_pixels).float(), train_labels, test_pixels.astype("float32"),
                          test_labels, epochs=10, standardize=True)
    assert result["top1"] >= reference - 1.0, (result, reference)
    assert result["top1"] <= result["top5"] <= 100.0
    val_top1 = result["val_top1_per_lr"]
    assert len(val_top1) == 13 and val_top1[result["best_lr"]] == max(val_top1.values())
    assert min(val_top1.values()) < max(val_top1.values()) - 5.0  # the lr grid matters


def test_bad_inputs_name_the_problem():
    features, labels = torch.randn(50, 4), torch.randint(3, (50,))
    with pytest.raises(VitrailError, match=r"train labels must have shape \(50,\)"):
        linear_probe(features, labels[:40], features, labels)
    with pytest.raises(VitrailError, match="dimension 4 but test features 3"):
        linear_probe(features, labels, features[:, :3], labels)
    nan_features = features.clone()
    nan_features[7, 1] = float("nan")
    with pytest.raises(VitrailError, match=r"train features contain NaN or inf at row 7"):
        linear_probe(nan_features, labels, features, labels)
    with pytest.raises(VitrailError, match="val_fraction=1.0 of 50 train samples"):
        linear_probe(features, labels, features, labels, val_fraction=1.0)
