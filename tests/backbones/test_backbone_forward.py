"""Every backbone gives finite (B, embed_dim) features at global, local and small-image sizes."""

import dataclasses

import pytest
import torch

from vitrail import backbones
from vitrail.errors import VitrailError

ONE_PER_FAMILY = ["vit_tiny", "swin_tiny", "levit_128s", "conformer_tiny", "mobileformer_26m", "resnet18"]


def _images(batch, size, channels=3, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_features(features, model, batch=2):
    assert features.shape == (batch, model.embed_dim)
    assert torch.isfinite(features).all()


# The larger DINOv2 ViTs run the ViT-S/14's code at up to 1.1B parameters; their shapes are checked
# on the meta device (test_backbone_dinov2.py).
SMALL_ENOUGH = [name for name in backbones.names() if not name.startswith(("dinov2_vitb", "dinov2_vitl", "dinov2_vitg"))]


@pytest.mark.parametrize("name", SMALL_ENOUGH)
def test_global_and_local_crop_features(name):
    model = backbones.create(name).eval()
    with torch.no_grad():
        for size in (224, 96):
            _assert_features(model(_images(2, size)), model)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_global_crop_training_step(name):
    """Train mode (BN batch statistics, drop path) at 224 px, gradients reach every parameter."""
    model = backbones.create(name, drop_path_rate=0.1)  # ignored by backbones without stochastic depth
    model.train()
    features = model(_images(2, 224))
    _assert_features(features, model)
    features.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize(
    "name, size, overrides",
    [
        ("vit_tiny", 28, dict(patch_size=4, img_size=28)),
        ("swin_tiny", 28, dict(patch_size=2)),
        ("levit_128s", 32, dict(img_size=32)),
        ("conformer_tiny", 32, {}),
        ("mobileformer_26m", 28, {}),
        ("resnet18", 28, dict(small_images=True)),
    ],
)
def test_small_grayscale_images(name, size, overrides):
    model = backbones.create(name, in_chans=1, **overrides).eval()
    with torch.no_grad():
        _assert_features(model(_images(2, size, channels=1)), model)


def test_resnet_small_image_stem_keeps_spatial_detail():
    model = backbones.create("resnet18", small_images=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert isinstance(model.fc, torch.nn.Identity)


def test_conformer_rejects_sides_not_multiple_of_16():
    model = backbones.create("conformer_tiny").eval()
    with pytest.raises(VitrailError, match="multiples of 16"):
        model(_images(1, 28))


def test_num_classes_head_gives_logits():
    for name in ONE_PER_FAMILY:
        model = backbones.create(name, num_classes=10).eval()
        with torch.no_grad():
            assert model(_images(2, 96 if name != "conformer_tiny" else 96)).shape == (2, 10)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_declared_capabilities_are_what_the_backbone_does(name):
    """Eval code reads `capabilities` and never probes: each declared one works, and a backbone
    has no method for one it does not declare."""
    model = backbones.create(name).eval()
    declared = model.capabilities
    methods = {"patch_tokens": "forward_features", "block_cls": "intermediate_cls", "cls_attention": "last_self_attention"}
    assert {field: hasattr(model, method) for field, method in methods.items()} == dataclasses.asdict(declared)
    images = _images(2, 96)
    with torch.no_grad():
        if declared.patch_tokens:
            tokens = model.forward_features(images)
            assert tokens["cls"].shape == (2, model.embed_dim)
            assert tokens["patches"].shape[0] == 2 and tokens["patches"].shape[2] == model.embed_dim
        if declared.block_cls:
            assert model.intermediate_cls(images, 4).shape == (2, 4, model.embed_dim)
        if declared.cls_attention:
            tokens = 1 + (96 // model.patch_size) ** 2
            attention = model.last_self_attention(images)
            assert attention.shape[0] == 2 and attention.shape[-2:] == (tokens, tokens)


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_token_models_take_ibot_masks(name):
    model = backbones.create(name, mask_token=True).eval()
    assert model.capabilities.patch_tokens
    images = _images(2, 96)
    grid = 96 // model.patch_size
    none_masked = torch.zeros(2, grid * grid, dtype=torch.bool)
    some_masked = none_masked.clone()
    some_masked[0, :10] = True
    with torch.no_grad():
        plain = model.forward_features(images)
        unmasked = model.forward_features(images, masks=none_masked)
        masked = model.forward_features(images, masks=some_masked)
    assert plain["cls"].shape == (2, model.embed_dim)
    assert plain["patches"].ndim == 3 and plain["patches"].shape[-1] == model.embed_dim
    assert torch.equal(plain["cls"], unmasked["cls"])
    assert not torch.allclose(masked["cls"][0], plain["cls"][0])
    assert torch.allclose(masked["cls"][1], plain["cls"][1], atol=1e-6)  # sample 1 had no masked patch


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_mask_token_is_opt_in(name):
    model = backbones.create(name)
    assert "mask_token" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="mask_token=True"):
        model.forward_features(_images(1, 96), masks=torch.ones(1, (96 // model.patch_size) ** 2, dtype=torch.bool))


def test_swin_features_ignore_padding(monkeypatch):
    """At 96 px the last two stages (6x6, 3x3) are padded up to the 7x7 window; filling the
    padding with large noise instead of zeros must not change the features (it is masked out)."""
    from vitrail.backbones import swin

    model = backbones.create("swin_tiny").eval()
    images = _images(1, 96)
    zero_pad = swin.F.pad

    def noise_pad(x, pad, *args, **kwargs):
        out = zero_pad(x, pad, *args, **kwargs)
        inside = zero_pad(torch.ones_like(x), pad).bool()
        return torch.where(inside, out, torch.randn_like(out) * 10)

    with torch.no_grad():
        reference = model(images)
        monkeypatch.setattr(swin.F, "pad", noise_pad)
        perturbed = model(images)
    torch.testing.assert_close(perturbed, reference, rtol=1e-5, atol=1e-5)
