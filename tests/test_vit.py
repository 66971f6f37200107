import pytest
import torch

from vitrail import backbones
from vitrail.errors import VitrailError


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return backbones.create("vit_small", depth=2).eval()


def test_registry_knows_vits_and_rejects_unknown_names():
    assert {"vit_tiny", "vit_small", "vit_base"} <= set(backbones.names())
    with pytest.raises(VitrailError, match="unknown backbone 'vit_gigantic'.*vit_small"):
        backbones.create("vit_gigantic")


def test_features_at_224_96_and_28(vit):
    with torch.no_grad():
        for size in (224, 96, 28):
            features = vit(torch.randn(2, 3, size, size))
            assert features.shape == (2, 384) and torch.isfinite(features).all()
        tokens = vit.forward_features(torch.randn(2, 3, 96, 96))
    assert tokens["cls"].shape == (2, 384) and tokens["patches"].shape == (2, 36, 384)


def test_position_interpolation_keeps_cls_and_is_identity_at_train_size(vit):
    assert vit.interpolate_pos_embed(14, 14) is vit.pos_embed
    at_96 = vit.interpolate_pos_embed(6, 6)
    assert at_96.shape == (1, 37, 384)
    assert torch.equal(at_96[:, 0], vit.pos_embed[:, 0])
    grid = vit.pos_embed[:, 1:].reshape(14, 14, 384)
    # Bicubic down-sampling of a smooth grid keeps the corners' neighbourhood: closest stored position wins.
    at_28 = vit.interpolate_pos_embed(1, 1)
    assert at_28.shape == (1, 2, 384)
    assert torch.allclose(at_28[0, 1], grid.mean(dim=(0, 1)), atol=0.05)


def test_state_dict_keys_follow_dino_and_load_strictly():
    model = backbones.create("vit_small")
    keys = set(model.state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for block in range(12):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{block}.{part}.weight", f"blocks.{block}.{part}.bias"}
    assert keys == expected
    backbones.create("vit_small").load_state_dict(model.state_dict(), strict=True)


def test_masks_replace_patch_embeddings_by_the_mask_token():
    torch.manual_seed(0)
    model = backbones.create("vit_tiny", depth=1, mask_token=True).eval()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1] = True
    with torch.no_grad():
        plain = model.forward_features(images)["patches"]
        masked = model.forward_features(images, masks)["patches"]
        # Masked tokens of two different images carry the same embedding before attention.
        tokens = model.prepare_tokens(torch.stack([images[0], -images[0]]), masks=torch.ones(2, 4, dtype=torch.bool))
    assert torch.allclose(masked[1], plain[1]) and not torch.allclose(masked[0], plain[0])
    assert torch.allclose(tokens[0], tokens[1])
    with pytest.raises(ValueError, match="mask token"):
        backbones.create("vit_tiny", depth=1).forward_features(images, masks)
