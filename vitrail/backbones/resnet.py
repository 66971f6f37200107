"""ResNet (He et al., 2016) from torchvision, as the convolutional baseline of SSL work.

Built with torchvision's own constructors, so keys are torchvision's and its checkpoints load
with `strict=True` (the `fc` layer exists only with `num_classes`).
"""

from __future__ import annotations

from torch import nn

from vitrail.backbones.capabilities import Capabilities

VARIANTS = {
    "resnet18": dict(depth=18),
    "resnet50": dict(depth=50),
}

def build_resnet(depth: int = 50, in_chans: int = 3, small_images: bool = False, num_classes: int = 0) -> nn.Module:
    """torchvision ResNet whose `forward` gives pooled (B, embed_dim) features.

    `small_images` replaces the 7x7 stride-2 stem and its max-pool by one 3x3 stride-1 conv,
    the CIFAR-style stem of SimCLR (Appendix B.9) and later SSL work on 32 px images, so
    28/32 px inputs keep a 4x4 final map instead of collapsing to 1x1.
    """
    # Imported here: torchvision's import (all its model zoo) costs ~2.5 s of CPU in every process
    # that imports the backbone registry (each Ray worker, view task and controller) and only
    # ResNet runs need it.
    from torchvision.models import resnet

    model = {18: resnet.resnet18, 50: resnet.resnet50}[depth](weights=None, num_classes=max(num_classes, 1))
    embed_dim = model.fc.in_features  # 512 for ResNet-18, 2048 for ResNet-50
    if small_images:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_images or in_chans != 3:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if num_classes == 0:
        model.fc = nn.Identity()
    model.embed_dim = embed_dim
    model.capabilities = Capabilities()
    return model
