"""The image-space loss terms besides the flow and consistency losses (SPEC sections 2 and 5).

- LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric", CVPR), VGG variant: d(x, y) = sum_l mean_hw w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2
  over the VGG-16 activations relu1_2 .. relu5_3, with learned non-negative channel weights w_l.
- A GAN critic: the U-Net discriminator with spectral norm of Real-ESRGAN (Wang et al. 2021,
  "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", ICCVW),
  which scores every pixel, and the hinge / non-saturating GAN losses.
- CLIP-IQA (Wang, Chan & Loy 2023, "Exploring CLIP for Assessing the Look and Feel of Images", AAAI):
  with antonym prompts, p = softmax(100 * [cos(e_img, e_pos), cos(e_img, e_neg)])[0] and
  L_IQA = mean(-log p) pushes images toward "good, sharp, high resolution".

Every pretrained piece is loaded from local files; with no files at hand the `try_load_*` helpers
switch the term off with one clear log line instead of ever using random weights.
"""
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import clip
from plumbing.vgg16 import VGG16_URL, vgg16_feature_weights, vgg16_features
from plumbing.weights import WeightsError, load_strict, read_state_dict

# ---------------------------------------------------------------------------------------------
# LPIPS

LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in .features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's ScalingLayer: maps [-1, 1] images to ImageNet-normalised inputs.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

LPIPS_HEADS_HINT = "weights/v0.1/vgg.pth of the lpips package (pip install lpips, or github.com/richzhang/PerceptualSimilarity)"


def unit_normalize(features, eps=1e-10):
    """Divide every spatial position's feature vector by its L2 norm (eps as in the lpips package)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance; forward(x, y) takes images in [-1, 1] and returns (B,) distances."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.freeze()

    def freeze(self):
        self.requires_grad_(False)
        return self.eval()

    def taps(self, x):
        """The five tapped activations, each unit-normalised over channels."""
        shift = x.new_tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
        scale = x.new_tensor(LPIPS_SCALE).view(1, 3, 1, 1)
        h = (x - shift) / scale
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in LPIPS_TAPS:
                out.append(unit_normalize(h))  # (B, C_l, H / 2^l, W / 2^l)
        return out

    def forward(self, x, y):
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 pixels (VGG pools 4 times), got {tuple(x.shape[-2:])}")
        distance = 0
        for head, fx, fy in zip(self.heads, self.taps(x), self.taps(y)):
            distance = distance + head((fx - fy) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return distance

    @classmethod
    def from_files(cls, vgg16_path, heads_path):
        """vgg16_path: torchvision's vgg16-397923af.pth (classifier.* ignored) or a features-only dict;
        heads_path: the lpips package's weights/v0.1/vgg.pth (keys lin0.model.1.weight ...)."""
        with torch.device("meta"):
            model = cls()
        load_strict(model.features, vgg16_feature_weights(read_state_dict(vgg16_path)), vgg16_path)
        load_strict(model.heads, lpips_head_weights(read_state_dict(heads_path)), heads_path)
        return model.freeze()


def lpips_head_weights(state_dict):
    """The lpips package names head l 'lin{l}.model.1' (after a Dropout at .model.0); ours is 'heads.{l}'."""
    return {re.sub(r"^lin(\d)\.model\.1\.", r"\1.", k): v for k, v in state_dict.items()}


def try_load_lpips(vgg16_path, heads_path, log=print):
    """LPIPS from local files, or None (with one log line) when neither file is given. A file given but not
    there, one of the two alone, or files that do not fit raise WeightsError: a typo must not switch a loss off."""
    wanted = ((vgg16_path, f"torchvision's vgg16-397923af.pth ({VGG16_URL})"), (heads_path, LPIPS_HEADS_HINT))
    if not vgg16_path and not heads_path:
        log(f"LPIPS off: no weights given (it needs {wanted[0][1]} and {wanted[1][1]})")
        return None
    for path, hint in wanted:
        if not path:
            raise WeightsError(f"LPIPS needs two files (--lpips-vgg, --lpips-heads); {hint} is not given")
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: no such file ({hint}, for LPIPS)")
    return LPIPS.from_files(vgg16_path, heads_path)


# ---------------------------------------------------------------------------------------------
# GAN: Real-ESRGAN's U-Net discriminator with spectral norm


def leaky(h):
    return F.leaky_relu(h, 0.2)


def upsample2x(h):
    return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)


class UNetDiscriminatorSN(nn.Module):
    """Per-pixel real/fake logits: a 3-level conv encoder, a decoder with skip connections, and two
    extra convolutions; spectral norm on every inner convolution keeps each one's Lipschitz constant near 1,
    which stabilises adversarial training."""

    def __init__(self, in_channels=3, num_feat=64):
        super().__init__()
        c = num_feat
        self.conv0 = nn.Conv2d(in_channels, c, 3, 1, 1)
        self.conv1 = spectral_norm(nn.Conv2d(c, c * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(c * 2, c * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(c * 4, c * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(nn.Conv2d(c * 8, c * 4, 3, 1, 1, bias=False))
        self.conv5 = spectral_norm(nn.Conv2d(c * 4, c * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(c * 2, c, 3, 1, 1, bias=False))
        self.conv7 = spectral_norm(nn.Conv2d(c, c, 3, 1, 1, bias=False))
        self.conv8 = spectral_norm(nn.Conv2d(c, c, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(c, 1, 3, 1, 1)

    def forward(self, x):
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"UNetDiscriminatorSN needs H and W divisible by 8, got {tuple(x.shape[-2:])}")
        x0 = leaky(self.conv0(x))  # (B, C, H, W)
        x1 = leaky(self.conv1(x0))  # (B, 2C, H/2, W/2)
        x2 = leaky(self.conv2(x1))  # (B, 4C, H/4, W/4)
        x3 = leaky(self.conv3(x2))  # (B, 8C, H/8, W/8)
        x4 = leaky(self.conv4(upsample2x(x3))) + x2  # (B, 4C, H/4, W/4)
        x5 = leaky(self.conv5(upsample2x(x4))) + x1  # (B, 2C, H/2, W/2)
        x6 = leaky(self.conv6(upsample2x(x5))) + x0  # (B, C, H, W)
        out = leaky(self.conv8(leaky(self.conv7(x6))))
        return self.conv9(out)  # (B, 1, H, W)


GAN_KINDS = ("hinge", "nonsat")


def d_loss(real_logits, fake_logits, kind="hinge"):
    """Discriminator loss: hinge  E[relu(1 - D(real))] + E[relu(1 + D(fake))];
    non-saturating  E[softplus(-D(real))] + E[softplus(D(fake))]  (= BCE with labels 1 / 0)."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "nonsat":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ValueError(f"unknown GAN loss kind {kind!r} (expected one of {GAN_KINDS})")


def g_loss(fake_logits, kind="hinge"):
    """Generator loss: hinge  -E[D(fake)];  non-saturating  E[softplus(-D(fake))] = -E[log sigmoid(D(fake))]."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsat":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown GAN loss kind {kind!r} (expected one of {GAN_KINDS})")


# ---------------------------------------------------------------------------------------------
# CLIP-IQA

DEFAULT_PAIRS = (("Good photo.", "Bad photo."),
                 ("Sharp photo.", "Blurry photo."),
                 ("High resolution photo.", "Low resolution photo."))
CLIP_LOGIT_SCALE = 100.0


class CLIPIQALoss(nn.Module):
    """L_IQA = mean over images and prompt pairs of -log p(positive prompt | image).
    The CLIP model is frozen (a submodule, so .to(device) moves it); gradients flow to the image."""

    def __init__(self, clip_model, tokenizer, prompt_pairs=DEFAULT_PAIRS):
        super().__init__()
        self.clip = clip_model.requires_grad_(False).eval()
        prompts = [prompt for pair in prompt_pairs for prompt in pair]  # pos0, neg0, pos1, neg1, ...
        device = next(self.clip.parameters()).device
        with torch.no_grad():
            text = F.normalize(self.clip.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
        # derived constants, not weights: kept out of the state dict
        self.register_buffer("text_embeddings", text.view(len(prompt_pairs), 2, -1), persistent=False)  # (K, 2, P)
        self.register_buffer("mean", torch.tensor(clip.CLIP_MEAN, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(clip.CLIP_STD, device=device).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: never switch CLIP to training behaviour
        return self

    def image_embeddings(self, x):
        """Unit CLIP embeddings of images in [-1, 1]."""
        size = self.clip.image_size
        pixels = F.interpolate((x + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = (pixels - self.mean) / self.std  # (B, 3, S, S)
        clip_dtype = next(self.clip.parameters()).dtype
        return F.normalize(self.clip.encode_image(pixels.to(clip_dtype)).float(), dim=-1)  # (B, P)

    def positive_log_probs(self, x):
        """log p(positive | image) for every image and pair: (B, K)."""
        cosines = torch.einsum("bp,kjp->bkj", self.image_embeddings(x), self.text_embeddings.float())  # (B, K, 2)
        return F.log_softmax(CLIP_LOGIT_SCALE * cosines, dim=-1)[..., 0]

    def forward(self, x):
        return -self.positive_log_probs(x).mean()


CLIP_HINT = "a CLIP model folder in Hugging Face format (config.json, model.safetensors, vocab.json, merges.txt)"


def try_load_clip_iqa(clip_dir, log=print):
    """CLIPIQALoss from a local CLIP folder, or None (with one log line) when none is given. A folder given but
    not there, or one with unreadable or unfitting files, raises WeightsError."""
    if not clip_dir:
        log(f"CLIP-IQA off: no CLIP folder given; get {CLIP_HINT}, e.g. openai/clip-vit-base-patch32")
        return None
    if not os.path.isdir(clip_dir):
        raise WeightsError(f"{clip_dir}: no such folder (CLIP-IQA needs {CLIP_HINT})")
    return CLIPIQALoss(clip.CLIPModel.from_pretrained(clip_dir), clip.CLIPTokenizer.from_pretrained(clip_dir))
