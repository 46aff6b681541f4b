import gzip
import json
import math
import os
import re
import warnings

import lpips
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import clip
from conftest import projected
import losses
from plumbing.weights import WeightsError



# ---------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """The lpips package with a random VGG trunk and its real v0.1 heads, plus our two input files."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips still calls torchvision with the deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    folder = tmp_path_factory.mktemp("lpips")
    trunk = {}
    for name, tensor in reference.net.state_dict().items():  # "slice1.0.weight"
        _, index, kind = name.split(".")
        trunk[f"features.{index}.{kind}"] = tensor.clone()
    torch.save({**trunk, "classifier.0.weight": torch.zeros(4, 4)}, folder / "vgg16-397923af.pth")
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    return reference, str(folder / "vgg16-397923af.pth"), heads, trunk


def test_lpips_matches_reference_package(lpips_files):
    reference, vgg_path, heads_path, _ = lpips_files
    ours = losses.LPIPS.from_files(vgg_path, heads_path)
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).flatten()  # (B,)
        got = ours(x, y)
    assert got.shape == (2,)
    assert expected.abs().min() > 0
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_lpips_identity_frozen_and_differentiable(lpips_files):
    _, vgg_path, heads_path, _ = lpips_files
    model = losses.LPIPS.from_files(vgg_path, heads_path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x, x).item() == 0.0
    x.requires_grad_(True)
    model(x, torch.zeros_like(x)).sum().backward()
    assert x.grad.abs().sum() > 0


def test_lpips_features_only_file(lpips_files, tmp_path):
    _, vgg_path, heads_path, trunk = lpips_files
    features_only = {k.removeprefix("features."): v for k, v in trunk.items()}
    torch.save(features_only, tmp_path / "features.pth")
    a = losses.LPIPS.from_files(vgg_path, heads_path)
    b = losses.LPIPS.from_files(str(tmp_path / "features.pth"), heads_path)
    x, y = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    assert torch.equal(a(x, y), b(x, y))


def test_lpips_bad_files_raise(lpips_files, tmp_path):
    _, vgg_path, heads_path, trunk = lpips_files
    short = {k: v for k, v in trunk.items() if k != "features.28.bias"}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match=r"short\.pth.*missing.*28\.bias"):
        losses.LPIPS.from_files(str(tmp_path / "short.pth"), heads_path)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "heads.pth")
    with pytest.raises(WeightsError, match=r"heads\.pth.*missing"):
        losses.LPIPS.from_files(vgg_path, str(tmp_path / "heads.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"corrupt\.pth"):
        losses.try_load_lpips(str(tmp_path / "corrupt.pth"), heads_path, log=lambda line: None)


def test_lpips_is_off_only_when_no_file_is_given(tmp_path):
    lines = []
    assert losses.try_load_lpips(None, None, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("LPIPS off: no weights given") and "\n" not in lines[0]
    missing = str(tmp_path / "vgg16-397923af.pth")  # a typo must not quietly change the objective
    with pytest.raises(WeightsError, match=f"^{re.escape(missing)}: no such file"):
        losses.try_load_lpips(missing, missing, log=pytest.fail)
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="LPIPS needs two files"):
        losses.try_load_lpips(missing, None, log=pytest.fail)


# ---------------------------------------------------------------------------------------------
# GAN


def test_discriminator_shapes_and_spectral_norm():
    d = losses.UNetDiscriminatorSN(num_feat=8)
    assert d(torch.randn(2, 3, 32, 24)).shape == (2, 1, 32, 24)
    with pytest.raises(ValueError, match="divisible by 8"):
        d(torch.randn(1, 3, 30, 32))
    normed = [f"conv{i}" for i in range(1, 9)]
    for name in normed:
        conv = getattr(d, name)
        assert parametrize.is_parametrized(conv, "weight"), name
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05, name
    assert not parametrize.is_parametrized(d.conv0) and not parametrize.is_parametrized(d.conv9)


def test_discriminator_forward_is_real_esrgans_u_net():
    """Real-ESRGAN's forward written out on the module's own layers: encoder, bilinear x2 decoder with the skips
    x2, x1, x0 added after each decoder convolution, two more convolutions, LeakyReLU 0.2 throughout."""
    d = losses.UNetDiscriminatorSN(num_feat=8).eval()
    x = torch.randn(2, 3, 32, 24)
    act = lambda h: F.leaky_relu(h, 0.2)
    up = lambda h: F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        x0 = act(d.conv0(x))
        x1 = act(d.conv1(x0))
        x2 = act(d.conv2(x1))
        x3 = act(d.conv3(x2))
        x4 = act(d.conv4(up(x3))) + x2
        x5 = act(d.conv5(up(x4))) + x1
        x6 = act(d.conv6(up(x5))) + x0
        expected = d.conv9(act(d.conv8(act(d.conv7(x6)))))
        torch.testing.assert_close(d(x), expected)


def test_gan_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    hinge_d = (0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3
    assert losses.d_loss(real, fake, "hinge").item() == pytest.approx(hinge_d, abs=1e-6)
    assert losses.g_loss(fake, "hinge").item() == pytest.approx(0.5 / 3, abs=1e-6)
    softplus = lambda v: math.log1p(math.exp(v))
    nonsat_d = sum(softplus(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(softplus(f) for f in (-2.0, 0.0, 1.5)) / 3
    nonsat_g = sum(-math.log(1 / (1 + math.exp(-f))) for f in (-2.0, 0.0, 1.5)) / 3
    assert losses.d_loss(real, fake, "nonsat").item() == pytest.approx(nonsat_d, abs=1e-6)
    assert losses.g_loss(fake, "nonsat").item() == pytest.approx(nonsat_g, abs=1e-6)
    with pytest.raises(ValueError, match="unknown GAN loss kind"):
        losses.d_loss(real, fake, "wgan")


@pytest.mark.parametrize("kind", losses.GAN_KINDS)
def test_discriminator_learns_constant_vs_noise(kind):
    d = losses.UNetDiscriminatorSN(num_feat=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.99))

    def batch():
        real = (torch.rand(4, 3, 1, 1) * 2 - 1).expand(4, 3, 16, 16)  # flat colour images
        fake = torch.rand(4, 3, 16, 16) * 2 - 1  # noise
        return real, fake

    real, fake = batch()
    with torch.no_grad():
        before = losses.d_loss(d(real), d(fake), kind).item()
    for _ in range(25):
        real, fake = batch()
        loss = losses.d_loss(d(real), d(fake), kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    d.eval()
    real, fake = batch()
    with torch.no_grad():
        real_logits, fake_logits = d(real), d(fake)
        after = losses.d_loss(real_logits, fake_logits, kind).item()
    assert after < 0.5 * before
    assert real_logits.mean() > 0 > fake_logits.mean()


# ---------------------------------------------------------------------------------------------
# CLIP-IQA


class StandInCLIP(nn.Module):
    """Text: positive prompts embed near `good`, negative ones near `bad`. Image: the brighter the image,
    the closer its embedding is to `good` (so brightness is an "image quality" knob)."""

    image_size = 8

    def __init__(self, positives, dim=6):
        super().__init__()
        self.positives = set(positives)
        good = F.normalize(torch.randn(dim), dim=0)
        self.good = nn.Parameter(good)
        self.bad = nn.Parameter(F.normalize(good + 0.2 * torch.randn(dim), dim=0))  # cosines stay close
        self.text_noise = nn.Parameter(0.02 * torch.randn(16, dim))
        self.pixel_weights = nn.Parameter(torch.randn(3 * 8 * 8))

    def encode_text(self, ids):  # ids: (B, 2) = (prompt index, is positive)
        base = torch.where(ids[:, 1:] == 1, self.good, self.bad)
        return base + self.text_noise[ids[:, 0]]  # (B, P)

    def encode_image(self, pixels):
        assert pixels.shape[-2:] == (8, 8)
        brightness = torch.sigmoid(pixels.mean(dim=(1, 2, 3), keepdim=True).squeeze(-1).squeeze(-1))  # (B, 1)
        wiggle = 0.01 * torch.tanh(pixels.flatten(1) @ self.pixel_weights)[:, None]
        return brightness * self.good + (1 - brightness) * self.bad + wiggle  # (B, P)


def stand_in():
    positives = [pos for pos, _ in losses.DEFAULT_PAIRS]
    model = StandInCLIP(positives)
    order = [p for pair in losses.DEFAULT_PAIRS for p in pair]
    tokenizer = lambda prompts: torch.tensor([[order.index(p), int(p in model.positives)] for p in prompts])
    return model, tokenizer


def hand_iqa(model, tokenizer, x, pairs):
    """The CLIP-IQA formula written out once more, step by step."""
    pixels = F.interpolate((x + 1) / 2, size=(model.image_size,) * 2, mode="bicubic", antialias=True)
    mean = torch.tensor(clip.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip.CLIP_STD).view(1, 3, 1, 1)
    e = F.normalize(model.encode_image((pixels - mean) / std), dim=-1)
    terms = []
    for pos, neg in pairs:
        t = F.normalize(model.encode_text(tokenizer([pos, neg])), dim=-1)
        cos_pos, cos_neg = e @ t[0], e @ t[1]
        p = 1 / (1 + torch.exp(100 * (cos_neg - cos_pos)))  # = e^(100 cos_pos) / (e^(100 cos_pos) + e^(100 cos_neg))
        terms.append(-torch.log(p))
    return torch.stack(terms).mean(), torch.stack(terms, dim=1)


def test_clip_iqa_matches_hand_computation_and_passes_gradients():
    model, tokenizer = stand_in()
    iqa = losses.CLIPIQALoss(model, tokenizer)
    assert not any(p.requires_grad for p in model.parameters())
    x = (0.2 * torch.randn(3, 3, 20, 28)).clamp(-1, 1).requires_grad_(True)
    expected, per_pair = hand_iqa(model, tokenizer, x.detach(), losses.DEFAULT_PAIRS)
    assert torch.allclose(-iqa.positive_log_probs(x.detach()), per_pair, atol=1e-5)
    loss = iqa(x)
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_clip_iqa_falls_as_embedding_moves_toward_positive_prompts():
    model, tokenizer = stand_in()
    iqa = losses.CLIPIQALoss(model, tokenizer)
    with torch.no_grad():
        values = [iqa(torch.full((1, 3, 16, 16), level)).item() for level in (-0.9, -0.3, 0.3, 0.9)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1] + 1
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    iqa(x).backward()
    assert iqa(x.detach() - 0.05 * x.grad.sign()).item() < iqa(x.detach()).item()


def test_clip_iqa_is_off_only_when_no_folder_is_given(tmp_path):
    lines = []
    assert losses.try_load_clip_iqa(None, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("CLIP-IQA off: no CLIP folder given")
    with pytest.raises(WeightsError, match="no-clip: no such folder"):
        losses.try_load_clip_iqa(str(tmp_path / "no-clip"), log=pytest.fail)


def save_tiny_clip_folder(folder):
    """A tiny random transformers CLIPModel (save_pretrained) with open_clip's real BPE as vocab.json +
    merges.txt, i.e. the layout of a Hugging Face CLIP folder such as openai/clip-vit-base-patch32."""
    import open_clip.tokenizer
    from transformers import CLIPConfig, CLIPModel as HFCLIPModel
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                  image_size=32, patch_size=8)
    reference = HFCLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    with torch.no_grad():
        for p in reference.parameters():  # well away from the tiny default init, so the cosines differ
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(str(folder))
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(clip.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return reference


class TransformersCLIP:
    """transformers' CLIPModel seen through the encode_image / encode_text interface of hand_iqa."""

    def __init__(self, model):
        self.model, self.image_size = model, model.config.vision_config.image_size

    def encode_image(self, pixels):
        return projected(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, ids):
        return projected(self.model.get_text_features(input_ids=ids))


def test_clip_iqa_with_real_clip_module_matches_transformers(tmp_path):
    from transformers import CLIPTokenizerFast as HFTokenizer
    reference = save_tiny_clip_folder(tmp_path / "clip")
    iqa = losses.try_load_clip_iqa(str(tmp_path / "clip"), log=pytest.fail)
    assert isinstance(iqa.clip, clip.CLIPModel) and iqa.clip.image_size == 32
    hf_tokenizer = HFTokenizer.from_pretrained(str(tmp_path / "clip"))
    tokenize = lambda prompts: hf_tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = (torch.rand(2, 3, 40, 48) * 2 - 1).requires_grad_(True)
    with torch.no_grad():
        expected, per_pair = hand_iqa(TransformersCLIP(reference), tokenize, x, losses.DEFAULT_PAIRS)
        got = -iqa.positive_log_probs(x)
    assert per_pair.std() > 0.01  # the pairs and images really differ
    assert (got - per_pair).abs().max() <= 1e-4 * per_pair.abs().max()
    loss = iqa(x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in iqa.clip.parameters())
