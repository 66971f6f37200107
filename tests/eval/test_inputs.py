"""`vitrail eval` checks what it is given: one class list for train and test, --arch against a run's checkpoint."""

import json

import numpy as np
import pytest
import torch

from vitrail import backbones
from vitrail.errors import VitrailError
from vitrail.eval.checkpoint import open_checkpoint
from vitrail.launch.cli import main
from vitrail.config import from_dict
from vitrail.launch.loop import Trainer
from vitrail.pipelines.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from vitrail.pipelines.shards import write_shards
from vitrail.pipelines.sources import array_samples

from conftest import tiny_config_tree

LIMIT = 320


def _test_shards(out, classes, permutation):
    """The first real Fashion-MNIST test images as shards whose class list is `classes` reordered by
    `permutation` (position j holds class permutation[j]), the labels renumbered to match."""
    images, labels = load_fashion_mnist("test")
    new_label = np.argsort(permutation)  # old label -> its position in the new list
    samples = array_samples(images[:LIMIT], new_label[labels[:LIMIT]], "test")
    return write_shards(samples, [classes[old] for old in permutation], out, 128, log=lambda message: None).folder


def _knn(capsys, checkpoint, train, test, *extra):
    code = main(["eval", "knn", "--checkpoint", str(checkpoint), "--arch", "vit_tiny", "--patch-size", "16",
                 "--train-shards", str(train), "--test-shards", str(test), "--crop-size", "32", "--limit", str(LIMIT),
                 "--k", "10", "20", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_test_classes_in_another_order_are_mapped_by_name_and_other_names_refused(fashion_shards, tmp_path, capsys):
    checkpoint = tmp_path / "dino_vittiny16_pretrain.pth"  # random weights in DINO's released layout
    torch.manual_seed(1)
    torch.save(backbones.create("vit_tiny", patch_size=16, img_size=32).state_dict(), checkpoint)
    code, _, err = _knn(capsys, checkpoint, fashion_shards / "train", fashion_shards / "test")
    assert code == 0, err
    straight = json.loads((tmp_path / "results.json").read_text())["knn"]

    permutation = np.random.default_rng(0).permutation(len(FASHION_MNIST_CLASSES))
    permuted = _test_shards(tmp_path / "permuted", FASHION_MNIST_CLASSES, permutation)
    code, out, err = _knn(capsys, checkpoint, fashion_shards / "train", permuted)
    assert code == 0, err
    assert f"{permuted} lists the classes of {fashion_shards / 'train'} in another order" in out
    mapped = json.loads((tmp_path / "results.json").read_text())["knn"]
    assert [(row["top1"], row["top5"]) for row in mapped] == [(row["top1"], row["top5"]) for row in straight]
    assert straight[0]["top1"] > 20  # informative enough that scoring permuted labels as they are would differ

    renamed = _test_shards(tmp_path / "renamed", ["tee", *FASHION_MNIST_CLASSES[1:]], np.arange(10))
    before = (tmp_path / "results.json").read_text()
    code, _, err = _knn(capsys, checkpoint, fashion_shards / "train", renamed)
    assert code == 2 and "Traceback" not in err
    assert (f"train and test shards name different classes: {fashion_shards / 'train'} has "
            f"[{', '.join(FASHION_MNIST_CLASSES)}], {renamed} has [tee, {', '.join(FASHION_MNIST_CLASSES[1:])}]") in err
    assert (tmp_path / "results.json").read_text() == before


def test_arch_that_disagrees_with_a_run_checkpoint_is_an_error(fashion_shards, tmp_path):
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", run={"precision": "fp32"})
    Trainer(from_dict(tree), num_samples=640).save_checkpoint()
    assert open_checkpoint(tmp_path / "run", arch="vit_tiny").step == 0  # agreeing is fine
    with pytest.raises(VitrailError, match=r"--arch vit_small disagrees with .*step-00000000/state.pt, a vitrail checkpoint "
                                           r"of a vit_tiny; drop --arch"):
        open_checkpoint(tmp_path / "run", arch="vit_small")
