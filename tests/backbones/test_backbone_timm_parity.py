"""Our ViT, Swin and LeViT against timm's, with the same randomised weights and BN statistics.

Default initialisation (zero biases, unit BN statistics, zero attention biases) hides
bias-indexing and layout bugs, so every parameter and running statistic is redrawn first.
"""

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from vitrail import backbones  # noqa: E402

PAIRS = [
    ("vit_tiny", "vit_tiny_patch16_224"),
    ("swin_tiny", "swin_tiny_patch4_window7_224"),
    ("levit_128s", "levit_128s"),
    ("levit_192", "levit_192"),  # key_dim 32 and 3 heads: a different head split than 128s
]


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw every parameter and BN statistic at a scale that keeps activations informative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if param.ndim > 1 and leaf == "weight":
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
            elif leaf == "weight":  # norm scales
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:  # biases, tokens, position embeddings, attention-bias tables
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.2)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max() / reference.abs().max()
    assert error < 1e-4, float(error)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("ours_name, timm_name", PAIRS)
def test_logits_match_timm_and_keys_load_strictly(ours_name, timm_name, images):
    reference = timm.create_model(timm_name, num_classes=1000).eval()
    randomise(reference)
    ours = backbones.create(ours_name, num_classes=1000).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(ours(images), reference(images))


@pytest.mark.parametrize("ours_name, timm_name", PAIRS)
def test_features_match_timm_pre_logits(ours_name, timm_name, images):
    reference = timm.create_model(timm_name, num_classes=0).eval()
    randomise(reference, seed=2)
    ours = backbones.create(ours_name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        expected = reference(images)
        assert_close(ours(images), expected)
        if ours.capabilities.patch_tokens:
            tokens = reference.forward_features(images)
            if tokens.ndim == 4:  # Swin: (B, H, W, D), final-normed
                tokens = tokens.flatten(1, 2)
            else:  # ViT: (B, 1 + N, D)
                tokens = tokens[:, 1:]
            assert_close(ours.forward_features(images)["patches"], tokens)


def test_levit_reuses_trained_biases_at_a_smaller_resolution():
    """At 96 px our 224-trained tables, indexed per resolution, equal timm built for 96 px."""
    reference = timm.create_model("levit_128s", num_classes=0, img_size=96).eval()
    randomise(reference, seed=3)
    ours = backbones.create("levit_128s").eval()
    state = reference.state_dict()
    ours_state = ours.state_dict()
    for key, table in state.items():
        if key.endswith("attention_biases"):
            small, large = (int(math.isqrt(t.shape[1])) for t in (table, ours_state[key]))
            remapped = torch.zeros_like(ours_state[key])
            for dy in range(small):
                remapped[:, dy * large : dy * large + small] = table[:, dy * small : (dy + 1) * small]
            state[key] = remapped
    ours.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(ours(images), reference(images))
