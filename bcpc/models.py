"""Reference architectures: the paper's model zoo (4C3F, 6C2F, 8C2F, WRN), an MLP, and a small ResNet.

4C3F, 6C2F, 8C2F and the WRN follow the convex-adversarial / BCP code bases (Wong et al. 2018;
Lee et al. 2020); their parameter counts match the paper's Table 2 (1,974,762 for MNIST 4C3F,
2,466,858 for CIFAR-10 4C3F, 2,250,378 for CIFAR-10 6C2F, 4,214,850 for CIFAR-10 WRN, 4,342,984
for Tiny ImageNet 8C2F).
"""
from __future__ import annotations

from torch import nn

from bcpc.nn import MaxMin

#: the activations the reference architectures take (``activation=``)
ACTIVATIONS = {"relu": nn.ReLU, "maxmin": MaxMin}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def conv_4c3f(in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
              activation: str = "relu", width: float = 1.0,
              dense_width: int | None = None) -> nn.Sequential:
    """conv 32-3/1, conv 32-4/2, conv 64-3/1, conv 64-4/2, fc 512, fc 512, fc classes, with
    ``activation`` between: ReLU (the paper's) or MaxMin (GloRo's 4C3F-MinMax, same parameters).
    ``width`` scales every hidden width (rounded to an even number, as MaxMin pairs channels);
    ``dense_width``, when given, sets the two hidden dense layers' width alone."""
    side = image_size // 4
    act = _activation(activation)
    c1, c2, f = (2 * round(width * n / 2) for n in (32, 64, 512))
    if dense_width is not None:
        if dense_width < 2 or dense_width % 2:
            raise ValueError(f"dense_width must be an even number >= 2 (MaxMin pairs units), got {dense_width}")
        f = dense_width
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, 1, 1), act(),
        nn.Conv2d(c1, c1, 4, 2, 1), act(),
        nn.Conv2d(c1, c2, 3, 1, 1), act(),
        nn.Conv2d(c2, c2, 4, 2, 1), act(),
        nn.Flatten(),
        nn.Linear(c2 * side * side, f), act(),
        nn.Linear(f, f), act(),
        nn.Linear(f, num_classes),
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


def conv_8c2f(in_channels: int = 3, image_size: int = 64, num_classes: int = 200) -> nn.Sequential:
    """conv 64-3/1, 64-3/1, 64-4/2, 128-3/1, 128-3/1, 128-4/2, 256-3/1, 256-4/2, fc 256, fc classes.

    The paper's Tiny ImageNet 8C2F (``tinyimagenet()`` in the BCP code base, Lee et al. 2020): the
    3x3 convolutions are padded by 1, the 4x4 stride-2 ones are unpadded, so a 64x64 input shrinks
    to 31, 14 and 6 pixels and the first dense layer has 256*6*6 = 9216 inputs. 4,342,984
    parameters at 3x64x64 and 200 classes, the paper's Table 2 figure. ReLU between layers.
    """
    side = image_size
    for _ in range(3):
        side = (side - 4) // 2 + 1
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, 2, 0), nn.ReLU(),
        nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(128, 128, 4, 2, 0), nn.ReLU(),
        nn.Conv2d(128, 256, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(256, 256, 4, 2, 0), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256 * side * side, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


class ConvSkipBlock(nn.Module):
    """``relu(skip(x) + conv2(relu(conv1(x))))`` with a convolutional skip, all convs biased, no BN.

    One block of Wong et al.'s CIFAR ResNet: ``Dense(conv1), ReLU, Dense(skip, None, conv2), ReLU``
    in convex_adversarial's ``DenseSequential``, where a ``Dense`` sums its convolutions applied to
    the latest activations (here the block input and the inner ReLU output). Without downsampling
    conv1 is 3x3/1 (pad 1) and skip 1x1/1; with it conv1 is 4x4/2 (pad 1) and skip 2x2/2 (pad 0),
    both halving the side. conv2 is 3x3/1 (pad 1).
    """

    def __init__(self, cin: int, cout: int, downsample: bool = False):
        super().__init__()
        k_first, k_skip, stride = (4, 2, 2) if downsample else (3, 1, 1)
        self.conv1 = nn.Conv2d(cin, cout, k_first, stride, 1)
        self.skip = nn.Conv2d(cin, cout, k_skip, stride, 0)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)

    def forward(self, x):
        h = self.conv1(x).relu()
        return (self.skip(x) + self.conv2(h)).relu()


def wrn(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, n: int = 1,
        factor: int = 1) -> nn.Sequential:
    """conv 16-3/1, then ConvSkipBlocks 16f, (16f) x n, 32f down, (32f) x (n-1), 64f down, (64f) x (n-1),
    then fc 1000, fc classes (f = ``factor``; ReLU between).

    The paper's CIFAR-10 "WRN": the residual network of Wong et al. 2018 ("Scaling provable
    adversarial defenses"), ``cifar_model_resnet(N=1, factor=1)`` in convex_adversarial
    (examples/problems.py), the model of the paper's WRN row (CAP, LMT and BCP are trained on it;
    the BCP code base's argparser has the matching defaults ``resnet_N=1``, ``resnet_factor=1``).
    The structure is rebuilt from that function: a stem conv, stage 1 of ``n + 1``
    non-downsampling blocks, stages 2 and 3 opening with a downsampling block and ``n - 1`` more,
    then ``Flatten`` and two dense layers on ``64f * (image_size/4)**2`` features. With the
    defaults (``n=1``, ``factor=1``: blocks 16, 16, 32 down, 64 down) it has 4,214,850
    parameters, exactly the paper's Table 2 figure; no other ``n``, ``factor`` in 1..3 x 1..11 does.
    4.1 M of them are in the 4096 x 1000 dense layer.
    """
    w1, w2, w3 = 16 * factor, 32 * factor, 64 * factor
    blocks = [ConvSkipBlock(16, w1)] + [ConvSkipBlock(w1, w1) for _ in range(n)]
    blocks += [ConvSkipBlock(w1, w2, downsample=True)] + [ConvSkipBlock(w2, w2) for _ in range(n - 1)]
    blocks += [ConvSkipBlock(w2, w3, downsample=True)] + [ConvSkipBlock(w3, w3) for _ in range(n - 1)]
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, 1, 1), nn.ReLU(),
        *blocks,
        nn.Flatten(),
        nn.Linear(w3 * side * side, 1000), nn.ReLU(),
        nn.Linear(1000, num_classes),
    )


def conv_small(in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
               activation: str = "relu") -> nn.Sequential:
    """conv 16-4/2, conv 32-4/2, fc 100, fc classes: the fast model of ``bcpc demo``."""
    side = image_size // 4
    act = _activation(activation)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, 2, 1), act(),
        nn.Conv2d(16, 32, 4, 2, 1), act(),
        nn.Flatten(),
        nn.Linear(32 * side * side, 100), act(),
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
    "mnist_4c3f_minmax": lambda: conv_4c3f(1, 28, 10, activation="maxmin"),
    "mnist_4c3f_minmax_w2": lambda: conv_4c3f(1, 28, 10, activation="maxmin", width=2.0),
    "mnist_4c3f_minmax_fc1024": lambda: conv_4c3f(1, 28, 10, activation="maxmin", dense_width=1024),
    "mnist_4c3f_minmax_fc2048": lambda: conv_4c3f(1, 28, 10, activation="maxmin", dense_width=2048),
    "cifar_4c3f": lambda: conv_4c3f(3, 32, 10),
    "cifar_6c2f": lambda: conv_6c2f(3, 32, 10),
    "cifar_wrn": lambda: wrn(3, 32, 10),
    "tiny_imagenet_8c2f": lambda: conv_8c2f(3, 64, 200),
    "mnist_mlp": lambda: mlp(784, (256, 256), 10),
    "mnist_small": lambda: conv_small(1, 28, 10),
    "mnist_small_minmax": lambda: conv_small(1, 28, 10, activation="maxmin"),
    "resnet_small": lambda: resnet_small(3, 10),
}
