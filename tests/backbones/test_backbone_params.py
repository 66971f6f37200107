"""Parameter counts at 224 px with the 1000-class head(s), against the published numbers."""

import pytest

from test_backbone_dinov2 import OFFICIAL_COUNTS as DINOV2  # checked there, on the meta device

from vitrail import backbones

PUBLISHED = {
    # DeiT / ViT papers and timm.
    "vit_tiny": 5_717_416,
    "vit_small": 22_050_664,
    "vit_base": 86_567_656,
    # Swin paper Table 1 / official model zoo.
    "swin_tiny": 28_288_354,
    "swin_small": 49_606_258,
    "swin_base": 87_768_224,
    # LeViT, unfused, class + distillation heads (official model zoo).
    "levit_128s": 7_777_058,
    "levit_384": 39_128_836,
    # Conformer, CNN + transformer heads (paper Table 1 / official repo).
    "conformer_tiny": 23_524_704,
    "conformer_base": 83_289_136,
    # Mobile-Former paper Tables / official repo.
    "mobileformer_26m": 3_232_788,
    "mobileformer_294m": 11_422_648,
    "mobileformer_508m": 13_976_976,
}

DERIVED = {
    # timm's levit model_cfgs (identical to the paper's Table 1: 9.2M, 11M, 19M).
    "levit_128": 9_213_936,
    "levit_192": 10_947_069,
    "levit_256": 18_893_876,
    # Official Conformer_small_patch16 config in pengzhiliang/Conformer models.py (paper: 37.7M).
    "conformer_small": 37_673_424,
    # Official configs in AAboys/MobileFormer mobile_former.py (paper: 3.5M, 4.6M, 7.6M, 9.4M).
    "mobileformer_52m": 3_469_092,
    "mobileformer_96m": 4_585_252,
    "mobileformer_151m": 7_595_828,
    "mobileformer_214m": 9_425_920,
    # torchvision resnet18 / resnet50 with their fc layer.
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}


def test_every_registered_variant_has_an_expected_count():
    assert set(backbones.names()) == set(PUBLISHED) | set(DERIVED) | set(DINOV2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name):
    model = backbones.create(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 1e-3, count


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_parameter_count(name):
    model = backbones.create(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == DERIVED[name]
