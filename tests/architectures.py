"""Real architectures as their authors publish them, written out here (no CPU torchvision can be
installed on these machines): torchvision's ResNet-18 and MobileNetV2 (same modules, same forward
code, in-place ops included), a ResMLP/Mixer block, a text-CNN, a GELU MLP and a LiResNet-style
residual network with MaxMin. Used by tests/test_architectures.py and benchmarks/architectures.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bcpc


# --- torchvision ResNet-18 (torchvision/models/resnet.py, BasicBlock) --------------------------

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


# --- torchvision MobileNetV2 (torchvision/models/mobilenetv2.py) -------------------------------

def _make_divisible(v, divisor, min_value=None):
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=nn.ReLU6):
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]

    def __init__(self, num_classes=10, width_mult=1.0, dropout=0.2):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, 8)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), 8)
        features = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTING:
            output_channel = _make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# --- a ResMLP / MLP-Mixer block (Touvron et al. 2021: Affine instead of LayerNorm) ------------

class Affine(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.alpha * x + self.beta


class MixerBlock(nn.Module):
    def __init__(self, dim, tokens, hidden=2):
        super().__init__()
        self.pre_token, self.pre_channel = Affine(dim), Affine(dim)
        self.token_mix = nn.Linear(tokens, tokens)
        self.channel_mix = nn.Sequential(nn.Linear(dim, hidden * dim), nn.GELU(), nn.Linear(hidden * dim, dim))

    def forward(self, x):  # x: (batch, tokens, dim)
        x = x + self.token_mix(self.pre_token(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mix(self.pre_channel(x))
        return x


class Mixer(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, image=16, patch=4, dim=16, depth=2):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.blocks = nn.Sequential(*[MixerBlock(dim, tokens) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).permute(0, 2, 1)  # (batch, tokens, dim)
        x = self.blocks(x)
        return self.head(x.mean(dim=1))


# --- a text-CNN (Kim 2014): Conv1d filters of several widths, max over time -----------------

class TextCNN(nn.Module):
    def __init__(self, embed=8, length=20, filters=6, widths=(2, 3, 4), num_classes=2):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(embed, filters, w) for w in widths])
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(filters * len(widths), num_classes)

    def forward(self, x):  # x: (batch, embed, length), the embedded sentence
        pooled = [F.relu(conv(x)).max(dim=2)[0] for conv in self.convs]
        return self.fc(self.dropout(torch.cat(pooled, 1)))


# --- a GELU MLP ---------------------------------------------------------------------------------

def gelu_mlp(in_features=20, hidden=32, num_classes=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, num_classes))


# --- a LiResNet-style network (Hu et al. 2023): residual convs with MaxMin ---------------------

class LiResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)  # MaxMin, as the authors write it
        h = torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
        return x + self.conv(h)


class LiResNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, width=8, depth=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[LiResBlock(width) for _ in range(depth)])
        self.act = bcpc.nn.MaxMin()
        self.neck = nn.Linear(width * 16, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.avg_pool2d(self.act(x), 2).flatten(1)
        return self.head(self.act(self.neck(x)))


#: name -> (factory, per-sample input shape)
ARCHITECTURES = {
    "resnet18": (lambda: ResNet18(10), (3, 16, 16)),
    "mobilenet_v2": (lambda: MobileNetV2(10, width_mult=0.5), (3, 16, 16)),
    "mixer": (lambda: Mixer(), (1, 16, 16)),
    "text_cnn": (lambda: TextCNN(), (8, 20)),
    "gelu_mlp": (lambda: gelu_mlp(), (20,)),
    "liresnet": (lambda: LiResNet(), (1, 16, 16)),
}
