import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from vitrail.pipelines.augment import uniform_stream
from vitrail.pipelines.datasets import load_fashion_mnist
from vitrail.pipelines.photometric import BRIGHTNESS, CONTRAST, HUE, SATURATION, gaussian_blur_, photometric
from vitrail.pipelines.views import Augment, EvalTransform, MultiCrop, Normalization, sample_generator

_TORCHVISION_OPS = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast,
                    SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}


def _images(count, channels=1):
    images, _ = load_fashion_mnist("test")
    batch = torch.from_numpy(images[:count].copy())[:, None]
    return list(batch.expand(-1, channels, -1, -1).contiguous())


def test_multicrop_shapes_and_dtypes():
    recipe = MultiCrop(global_size=32, local_size=16, num_local=3)
    columns = recipe(_images(5, channels=3), [f"k{i}" for i in range(5)], seed=0, epoch=0)
    assert columns["global"].shape == (5, 2, 3, 32, 32) and columns["global"].dtype == np.uint8
    assert columns["local"].shape == (5, 3, 3, 16, 16) and columns["local"].dtype == np.uint8
    views = recipe.to_device(columns, "cpu", Normalization(3, (0.5,) * 3, (0.25,) * 3))
    assert [tuple(v.shape) for v in views.crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views.crops)


def test_no_local_crops_gives_no_local_column():
    columns = MultiCrop(28, 12, num_local=0)(_images(2), ["a", "b"], seed=0, epoch=0)
    assert set(columns) == {"global"}


def test_views_depend_only_on_seed_epoch_and_key():
    recipe = MultiCrop(global_size=28, local_size=12, num_local=2)
    images = _images(4)
    keys = ["a", "b", "c", "d"]
    first = recipe(images, keys, seed=3, epoch=1)
    # Same samples in another order and batch: identical views per key.
    reordered = recipe(images[::-1][:2], keys[::-1][:2], seed=3, epoch=1)
    np.testing.assert_array_equal(reordered["global"][0], first["global"][3])
    np.testing.assert_array_equal(reordered["local"][1], first["local"][2])
    assert not np.array_equal(recipe(images, keys, seed=3, epoch=2)["global"], first["global"])
    assert not np.array_equal(recipe(images, keys, seed=4, epoch=1)["global"], first["global"])


def test_solarize_and_flip_probabilities_follow_the_recipe():
    # Full-scale crops of a left/right asymmetric image: flip shows as mirrored output.
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    image[:, :, :8] = 200
    augment = Augment(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
    generators = [sample_generator(0, 0, str(i)) for i in range(400)]
    out = augment([image] * 400, generators)
    flipped = (out[:, 0, 8, 12] > 100).float().mean().item()
    assert 0.4 < flipped < 0.6
    solarizing = Augment(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_prob=0.0, jitter_prob=0.0,
                         grayscale_prob=0.0, flip_prob=0.0, solarize_prob=0.2)
    out = solarizing([image] * 400, generators)
    solarized = (out[:, 0, 8, 2] < 100).float().mean().item()  # 200 -> 55 when solarized
    assert 0.13 < solarized < 0.27


def test_gaussian_blur_keeps_mass_matches_sigma_and_torchvision():
    for size in (21, 150):
        for sigma in (0.5, 2.0):
            impulse = np.zeros((1, size, size), np.float32)
            impulse[0, 70 % size, 10] = 1.0
            gaussian_blur_(impulse, sigma)
            assert abs(impulse.sum() - 1.0) < 1e-5
            profile = impulse[0, 70 % size]
            variance = (profile / profile.sum() * (np.arange(size) - 10.0) ** 2).sum()
            assert abs(math.sqrt(variance) - sigma) < 0.05 * sigma + 0.02
    # A Gaussian truncated at 3 sigma with reflect padding is torchvision's gaussian_blur.
    images = torch.stack(_colour_images()[:4]).float()
    for sigma in (0.3, 1.0, 1.7):
        ours = images.clone()
        for image in ours:
            gaussian_blur_(image.numpy(), sigma)
        reference = TF.gaussian_blur(images, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
        assert (ours - reference).abs().max() < 1e-3
    flat = np.full((3, 150, 150), 77.0, np.float32)
    gaussian_blur_(flat, 2.0)
    assert np.allclose(flat, 77.0, atol=1e-3)


def _colour_images():
    """RGB images from real data: three Fashion-MNIST images as the red, green and blue
    planes of each (many hues, black background), plus the gradients of `_photo`."""
    images, _ = load_fashion_mnist("test")
    colour = [torch.from_numpy(images[3 * n:3 * n + 3].copy()) for n in range(8)]
    return colour + [torch.from_numpy(_photo(seed)).permute(2, 0, 1).contiguous() for seed in range(2)]


def _photometric(image, ops=(), factors=(), gray=False, sigma=0.0, solarize=False):
    out = torch.empty_like(image)
    photometric(image.numpy(), out.numpy(), np.array(ops, np.int64), np.array(factors, np.float64), gray, sigma, solarize)
    return out


def test_each_colour_op_matches_torchvision_on_uint8():
    rgb, gray = _colour_images(), _images(4)
    cases = {BRIGHTNESS: (0.6, 1.4), CONTRAST: (0.6, 1.4), SATURATION: (0.0, 0.8, 1.2), HUE: (-0.1, -0.04, 0.03, 0.1, 0.5)}
    for op, factors in cases.items():
        for factor in factors:
            for image in rgb + gray:
                reference = _TORCHVISION_OPS[op](image, factor)  # one channel: saturation and hue are no-ops
                assert (_photometric(image, [op], [factor]).float() - reference.float()).abs().max() <= 1, (op, factor)
    for image in rgb:
        assert torch.equal(_photometric(image, [BRIGHTNESS, CONTRAST, SATURATION, HUE], [1.0, 1.0, 1.0, 0.0]), image)


def test_colour_ops_chain_in_the_given_order_as_torchvision():
    # torchvision's ops on floats (no rounding between ops) in the same order; an order mix-up
    # would differ by tens of grey levels.
    factors = {BRIGHTNESS: 1.3, CONTRAST: 0.7, SATURATION: 1.2, HUE: 0.08}
    images = _colour_images()
    for order in itertools.permutations(factors):
        for image in images:
            reference = image.float() / 255
            for op in order:
                reference = _TORCHVISION_OPS[op](reference, factors[op])
            ours = _photometric(image, order, [factors[op] for op in order])
            assert (ours.float() - (reference * 255).round()).abs().max() <= 1, order
    jittered = _photometric(images[0], list(factors), list(factors.values()), gray=True)
    luma = TF.rgb_to_grayscale(_photometric(images[0], list(factors), list(factors.values())).float() / 255) * 255
    assert torch.equal(jittered[0], jittered[2]) and (jittered[0].float() - luma[0]).abs().max() <= 1


def test_jitter_order_is_one_of_the_24_drawn_uniformly():
    augment = Augment(size=16, scale=(0.5, 1.0), blur_prob=0.0, jitter_prob=1.0)
    orders = Counter(tuple(op for op, _ in augment.draw(uniform_stream(sample_generator(0, 0, str(n)), 1), 28, 28).jitter)
                     for n in range(2400))
    assert set(orders) == set(itertools.permutations(range(4)))
    assert 50 < min(orders.values()) and max(orders.values()) < 150  # 100 each expected


def _photo(seed):
    """A colourful 40 x 40 RGB image: smooth gradients plus noise, every hue present."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:40]
    image = np.stack([x * 6, y * 6, (x + y) * 3], axis=-1) + rng.integers(0, 40, (40, 40, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_eval_transform_resizes_short_side_and_centre_crops():
    image = torch.arange(40 * 60, dtype=torch.float32).view(1, 40, 60).div(40 * 60 / 255).to(torch.uint8)
    out = EvalTransform(resize_size=20, crop_size=16)([image])["image"]
    assert out.shape == (1, 1, 16, 16) and out.dtype == np.uint8
    identity = EvalTransform(28, 28)(_images(1))["image"]
    np.testing.assert_array_equal(identity[0], _images(1)[0].numpy())


def test_normalization_standardises_and_inverts():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    normalization = Normalization(3, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    out = normalization(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 2.0, 1.0]))
    assert torch.equal(normalization.invert(out), x)
    with pytest.raises(ValueError, match="3 channels need as many means and stds"):
        Normalization(3, (0.5,), (0.5,))


def test_grayscale_crops_are_the_luma_of_the_crop():
    image = torch.from_numpy(_photo(0)).permute(2, 0, 1).contiguous()
    gray = Augment(size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_prob=0.0, jitter_prob=0.0, flip_prob=0.0,
                   grayscale_prob=1.0)([image] * 3, [sample_generator(0, 0, str(i)) for i in range(3)])
    luma = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).round()
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert (gray[:, 0].float() - luma).abs().max() <= 1
