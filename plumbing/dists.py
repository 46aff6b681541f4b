"""DISTS: Deep Image Structure and Texture Similarity (Ding et al., TPAMI 2020).

Both images go through VGG16 with its max-pools replaced by L2 pooling (a 3x3 Hann-window blur of x^2,
stride 2, then sqrt), which keeps the features free of aliasing. The input and the output of each of the
five stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: 3 + 64 + 128 + 256 + 512 + 512 = 1475 channels)
are compared channel by channel through their global statistics:

    texture    s1 = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    structure  s2 = (2 cov_xy + c2) / (var_x + var_y + c2)              c1 = c2 = 1e-6
    DISTS      = 1 - sum over channels (alpha s1 + beta s2) / (sum alpha + sum beta)

alpha and beta, (1, 1475, 1, 1) each, were fitted to human similarity judgements; they come from the
DISTS_pytorch `weights.pt` file (keys alpha, beta). The backbone comes from torchvision's VGG16 file
(`vgg16-397923af.pth`, keys features.N.*; its classifier is unused; a features-only dict loads too).
Inputs are RGB in [0, 1] at full resolution (DISTS_pytorch's example script first resizes the shorter
side to 256; we do not).
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from plumbing.vgg16 import vgg16_feature_weights, vgg16_features
from plumbing.weights import WeightsError, load_strict, read_state_dict

STAGE_CHANNELS = (3, 64, 128, 256, 512, 512)  # the image itself, then the five VGG stages
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
HANN_3X3 = torch.outer(torch.tensor([0.5, 1.0, 0.5]), torch.tensor([0.5, 1.0, 0.5])) / 4.0  # sums to 1


class L2Pool(nn.Module):
    """Stride-2 anti-aliased pooling: sqrt(Hann blur of x^2). A parameter-free stand-in for max-pooling."""

    def forward(self, x):
        channels = x.shape[1]
        window = HANN_3X3.to(x).expand(channels, 1, 3, 3)
        pooled = F.conv2d(x * x, window, stride=2, padding=1, groups=channels)  # (B, C, H/2, W/2) rounded up
        return (pooled + 1e-12).sqrt()


class DISTS(nn.Module):
    """VGG16 trunk with L2 pooling plus the learned per-channel mixing weights; forward(x, y) -> (B,)."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features(pool=L2Pool)  # indices match torchvision's vgg16().features[:30]
        self.mixing = nn.ParameterDict({
            "alpha": nn.Parameter(torch.empty(1, sum(STAGE_CHANNELS), 1, 1)),  # texture weights
            "beta": nn.Parameter(torch.empty(1, sum(STAGE_CHANNELS), 1, 1)),  # structure weights
        })

    def stage_features(self, x):
        """The image and the last ReLU of each VGG stage (the activation right before each pool)."""
        feats = [x]
        h = (x - IMAGENET_MEAN.to(x)) / IMAGENET_STD.to(x)
        for layer in self.features:
            if isinstance(layer, L2Pool):
                feats.append(h)
            h = layer(h)
        feats.append(h)
        return feats

    def forward(self, x, y):
        """(B, 3, H, W) images in [0, 1] -> (B,) distances; 0 for identical images."""
        alphas = self.mixing["alpha"].split(STAGE_CHANNELS, dim=1)
        betas = self.mixing["beta"].split(STAGE_CHANNELS, dim=1)
        c1 = c2 = 1e-6
        similarity = 0.0
        for fx, fy, alpha, beta in zip(self.stage_features(x), self.stage_features(y), alphas, betas):
            mean_x, mean_y = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
            var_x = (fx - mean_x).pow(2).mean((2, 3), keepdim=True)
            var_y = (fy - mean_y).pow(2).mean((2, 3), keepdim=True)
            cov_xy = (fx * fy).mean((2, 3), keepdim=True) - mean_x * mean_y
            texture = (2 * mean_x * mean_y + c1) / (mean_x ** 2 + mean_y ** 2 + c1)
            structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
            similarity = similarity + (alpha * texture + beta * structure).sum((1, 2, 3))  # (B,)
        total = self.mixing["alpha"].sum() + self.mixing["beta"].sum()
        return 1 - similarity / total


def load_dists(vgg16_path, dists_path):
    """Build DISTS on the meta device and fill it strictly from the two files."""
    with torch.device("meta"):
        model = DISTS()
    load_strict(model.features, vgg16_feature_weights(read_state_dict(vgg16_path)), vgg16_path)
    load_strict(model.mixing, read_state_dict(dists_path), dists_path)
    return model.eval().requires_grad_(False)


def try_load_dists(vgg16_path, dists_path, log=print):
    """DISTS from its two files, or None with a note when neither is given; a file given but not there, one of
    the two alone, or a file that does not fit is a WeightsError."""
    if not vgg16_path and not dists_path:
        log("DISTS off: no weights given (--dists and --vgg)")
        return None
    for path, flag in ((dists_path, "--dists"), (vgg16_path, "--vgg")):
        if not path:
            raise WeightsError(f"DISTS needs two files; {flag} is not given")
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: no such file ({flag}, for DISTS)")
    return load_dists(vgg16_path, dists_path)
