"""Reference architectures: the paper's 4C3F and 6C2F, an MLP, and a small ResNet.

4C3F and 6C2F follow the convex-adversarial / BCP code bases (Wong et al. 2018; Lee et al. 2020);
their parameter counts match the paper's Table 2 (1,974,762 for MNIST 4C3F, 2,466,858 for
CIFAR-10 4C3F, 2,250,378 for CIFAR-10 6C2F).
"""
from __future__ import annotations

from torch import nn


def conv_4c3f(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """conv 32-3/1, conv 32-4/2, conv 64-3/1, conv 64-4/2, fc 512, fc 512, fc classes (ReLU between)."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def conv_6c2f(in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Sequential:
    """conv 32-3/1, 32-3/1, 32-4/2, 64-3/1, 64-3/1, 64-4/2, fc 512, fc classes (ReLU between)."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def conv_small(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """conv 16-4/2, conv 32-4/2, fc 100, fc classes: the fast model of ``bcpc demo``."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * side * side, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def mlp(in_features: int = 784, hidden=(256, 256), num_classes: int = 10) -> nn.Sequential:
    """Flatten, then Linear + ReLU per hidden width, then a Linear classifier."""
    layers: list = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """A small ResNet: stem conv, one BasicBlock per stage, global average pool, linear head."""

    def __init__(self, in_channels: int = 3, widths=(16, 32, 64), num_classes: int = 10, blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stages.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        x = self.stages(x)
        return self.fc(self.pool(x).flatten(1))


def resnet_small(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    return ResNet(in_channels, (16, 32, 64), num_classes)


def resnet18_like(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-18-sized (widths 64-512, two blocks per stage) for compile-time benchmarks."""
    return ResNet(in_channels, (64, 128, 256, 512), num_classes, blocks_per_stage=2)


ARCHITECTURES = {
    "mnist_4c3f": lambda: conv_4c3f(1, 28, 10),
    "cifar_4c3f": lambda: conv_4c3f(3, 32, 10),
    "cifar_6c2f": lambda: conv_6c2f(3, 32, 10),
    "mnist_mlp": lambda: mlp(784, (256, 256), 10),
    "mnist_small": lambda: conv_small(1, 28, 10),
    "resnet_small": lambda: resnet_small(3, 10),
}
