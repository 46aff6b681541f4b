"""VGG-16's convolutional trunk (Simonyan & Zisserman 2015, ICLR) in torchvision's layout.

LPIPS (losses.py) and DISTS (dists.py) both stand on it and both load it from torchvision's
`vgg16-397923af.pth`; they differ only in the pooling layer, which DISTS makes anti-aliased.
"""
from torch import nn

# torchvision's vgg16().features up to relu5_3; "M" is a pool (its fifth, after relu5_3, is left out: no metric uses it)
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def vgg16_features(pool=None):
    """The trunk as nn.Sequential with torchvision's module indices (so keys are 'N.weight'); `pool()` makes
    each pooling layer (default: 2 x 2 max-pooling, as in VGG-16)."""
    layers, channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(pool() if pool else nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


def vgg16_feature_weights(state_dict):
    """torchvision VGG-16 keys 'features.N.*' -> 'N.*'; the classifier is dropped; a features-only dict
    passes as it is; any other key is kept so that the strict check reports it."""
    if not any(k.startswith("features.") for k in state_dict):
        return state_dict
    return {k.removeprefix("features."): v for k, v in state_dict.items() if not k.startswith("classifier.")}
