"""flowsr.py: the model container, its two checkpoint kinds, the SD 1.x refusal and the prompt cache.

The helpers at the top build a tiny Stable Diffusion folder in the real diffusers / transformers layout
(random weights, open_clip's real BPE) and a FlowSR LoRA checkpoint on it in the published layout (SPEC 8),
made with PEFT; tests/test_sample.py imports them for its parity test.
"""
import copy
import gzip
import importlib.util
import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clip
import lora
from flowsr import FLOWSR_PROMPT, FLOWSR_PROMPT_IDS, UNET_LORA_TARGETS, FlowSR, context_cache_key, vae_encoder_targets
from plumbing.weights import WeightsError

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
TEXT_WIDTH = 64  # the tiny "SD 2.x" text encoder; its SD 1.x-like sibling is SD1_TEXT_WIDTH wide
SD1_TEXT_WIDTH = 48
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
UNET_RANK, VAE_RANK = 4, 2


# ---- a tiny SD folder -------------------------------------------------------------------------------------

def noisy_(module, std=0.05):
    """Move every weight and bias off its init, so that no zero bias or unit norm hides a mapping bug."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module.eval()


def write_tokenizer(folder):
    """open_clip's real BPE as transformers' CLIP files, with SD 2.x's pad token "!" (id 0)."""
    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    lines = gzip.open(os.path.join(package, "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(clip.bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                   "unk_token": "<|endoftext|>"}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}, f)


def diffusers_unet(text_width=TEXT_WIDTH, linear=True):
    from diffusers import UNet2DConditionModel
    return noisy_(UNet2DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP), cross_attention_dim=text_width,
        attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=linear))


def diffusers_vae():
    """Three levels (x4 down), so with the UNet's two levels inputs pad to a multiple of 8."""
    from diffusers import AutoencoderKL
    return noisy_(AutoencoderKL(
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3))


def text_encoder(text_width=TEXT_WIDTH):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=49408, hidden_size=text_width, intermediate_size=2 * text_width,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return noisy_(CLIPTextModel(config), std=0.2)


def build_sd_folder(root, text_width=TEXT_WIDTH, sd1=False, tokenizer_from=None):
    """root/{unet, vae, text_encoder, tokenizer} as diffusers saves SD 2.x (sd1: conv projections, as SD 1.x)."""
    torch.manual_seed(text_width)
    diffusers_unet(text_width, linear=not sd1).save_pretrained(os.path.join(root, "unet"))
    diffusers_vae().save_pretrained(os.path.join(root, "vae"))
    text_encoder(text_width).save_pretrained(os.path.join(root, "text_encoder"))
    if tokenizer_from:
        os.makedirs(os.path.join(root, "tokenizer"))
        for name in os.listdir(os.path.join(tokenizer_from, "tokenizer")):
            with open(os.path.join(tokenizer_from, "tokenizer", name), "rb") as f:
                data = f.read()
            with open(os.path.join(root, "tokenizer", name), "wb") as f:
                f.write(data)
    else:
        write_tokenizer(os.path.join(root, "tokenizer"))
    return str(root)


def with_peft_lora(model, targets, rank):
    """A PEFT-injected copy of `model` with random (non-identity) LoRA weights, alpha 8 (PEFT's default)."""
    from peft import LoraConfig, inject_adapter_in_model
    model = inject_adapter_in_model(LoraConfig(r=rank, target_modules=targets, init_lora_weights="gaussian"),
                                    copy.deepcopy(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return model.eval()


def write_published_checkpoint(path, unet, vae):
    """The published FlowSR layout (SPEC 8), written by hand: tensors under arbitrary stored names, the
    metadata maps them to PEFT keys. The UNet's conv_in is fully trained (a plain `conv_in.weight` key)."""
    unet_sd = {k: v for k, v in unet.state_dict().items() if ".lora_" in k or k.startswith("conv_in.")}
    vae_sd = {k: v for k, v in vae.state_dict().items() if ".lora_" in k}
    vae_targets = sorted({k.split(".lora_")[0] for k in vae_sd})  # full dotted names, the other matching rule
    tensors, names = {}, {"unet_state_dict": {}, "vae_state_dict": {}}
    for group, state_dict in (("unet_state_dict", unet_sd), ("vae_state_dict", vae_sd)):
        for key, value in state_dict.items():
            stored = f"t{len(tensors):04d}"
            tensors[stored] = value.contiguous()
            names[group][stored] = key
    fields = {"unet_rank": UNET_RANK, "unet_lora_target_modules": UNET_TARGETS,
              "vae_rank": VAE_RANK, "vae_lora_target_modules": vae_targets}
    save_file(tensors, path, metadata={lora.METADATA_KEY: json.dumps({"fields": fields, "tensor_names": names})})
    return str(path)


def published_case(root):
    """(SD folder, checkpoint path, PEFT UNet, PEFT VAE): the reference models carry the LoRA unmerged."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    folder = build_sd_folder(os.path.join(root, "sd21"))
    torch.manual_seed(1)
    unet = with_peft_lora(UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")), UNET_TARGETS, UNET_RANK)
    with torch.no_grad():
        unet.conv_in.weight.add_(0.1 * torch.randn_like(unet.conv_in.weight))
    vae = with_peft_lora(AutoencoderKL.from_pretrained(os.path.join(folder, "vae")),
                         r"^encoder\..*(conv1|conv2|conv_in|conv_out|to_q|to_k|to_v|to_out\.0)$", VAE_RANK)
    path = write_published_checkpoint(os.path.join(root, "flowsr.safetensors"), unet, vae)
    return folder, path, unet, vae


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return published_case(str(tmp_path_factory.mktemp("published")))


def velocity(model, z):
    with torch.no_grad():
        return model(z, torch.tensor([1000.0]))


# ---- the prompt -------------------------------------------------------------------------------------------

def test_builtin_prompt_ids_are_the_tokenizers(case):
    """A single-file base has no tokenizer: the built-in ids must be what the real tokenizers give."""
    from transformers import CLIPTokenizer
    folder = case[0]
    expected = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))(
        FLOWSR_PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert expected[0, :len(FLOWSR_PROMPT_IDS)].tolist() == list(FLOWSR_PROMPT_IDS)
    assert torch.equal(clip.CLIPTokenizer.from_pretrained(folder)([FLOWSR_PROMPT]), expected)


def test_prompt_cache_key(case, tmp_path):
    """The key of a cached embedding follows the prompt and the text encoder's files, not the UNet's.
    (tests/test_sample.py checks that a second run really uses the cache.)"""
    base = str(tmp_path / "sd")
    shutil.copytree(case[0], base)
    key = context_cache_key(base, FLOWSR_PROMPT)
    assert context_cache_key(base, "a photo") != key
    unet = os.path.join(base, "unet", "diffusion_pytorch_model.safetensors")
    os.utime(unet, ns=(0, 10 ** 9))
    assert context_cache_key(base, FLOWSR_PROMPT) == key
    text = os.path.join(base, "text_encoder", "model.safetensors")
    os.utime(text, ns=(0, 10 ** 9))  # a replaced text encoder
    assert context_cache_key(base, FLOWSR_PROMPT) != key
    assert context_cache_key(text, FLOWSR_PROMPT) != context_cache_key(unet, FLOWSR_PROMPT)  # single files


def test_prompt_changes_the_context(case, tmp_path):
    folder, path = case[0], case[1]
    default = FlowSR.load(path, base=folder)
    other = FlowSR.load(path, base=folder, prompt="a blurry photo")
    assert default.context.shape == other.context.shape == (1, 77, TEXT_WIDTH)
    assert (default.context - other.context).abs().max() > 0.1


# ---- LoRA checkpoints -------------------------------------------------------------------------------------

def test_lora_is_merged_once_at_load(case):
    folder, path, peft_unet, _ = case
    model = FlowSR.load(path, base=folder)
    assert not lora.lora_layers(model) and model.upsample == "bilinear"  # published weights: bilinear up
    plain = FlowSR.sd21(folder, context=model.context)
    assert list(model.state_dict()) == list(plain.state_dict())
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = peft_unet(z, 1000, encoder_hidden_states=model.context).sample
    assert (velocity(model, z) - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (velocity(plain, z) - expected).abs().max() > 0.05 * expected.abs().max()  # the LoRA really acts


def test_sd1_base_for_sd2_checkpoint_is_refused_by_name(case, tmp_path):
    sd1 = build_sd_folder(str(tmp_path / "sd15"), SD1_TEXT_WIDTH, sd1=True, tokenizer_from=case[0])
    with pytest.raises(WeightsError, match=rf"^{re.escape(case[1])}: .*{TEXT_WIDTH} wide.*takes {SD1_TEXT_WIDTH}.*"
                                           r"an SD 1\.x base for an SD 2\.x checkpoint"):
        FlowSR.load(case[1], base=sd1)


def test_lora_checkpoint_errors(case, tmp_path):
    folder, path = case[0], case[1]
    with pytest.raises(WeightsError, match=rf"^{re.escape(path)}: .*give the base model \(--base\)"):
        FlowSR.load(path)
    with pytest.raises(WeightsError, match=rf"^{re.escape(path)}: its base model .*nowhere is not there"):
        FlowSR.load(path, base=str(tmp_path / "nowhere"))
    tiny = str(tmp_path / "tiny.safetensors")
    FlowSR.tiny().save(tiny)
    with pytest.raises(WeightsError, match=rf"^{re.escape(tiny)}: a full FlowSR checkpoint; it needs no --base"):
        FlowSR.load(tiny, base=folder)
    with pytest.raises(WeightsError, match=rf"^{re.escape(tiny)}: this model has a fixed context; a prompt does"):
        FlowSR.load(tiny, prompt="a photo")
    with pytest.raises(WeightsError, match=rf"^{re.escape(tiny)}: this model has a fixed context; a context does"):
        FlowSR.load(tiny, context=torch.zeros(1, 77, 32))


@pytest.mark.parametrize("vae_rank", [3, 0])
def test_train_py_lora_checkpoint_round_trip_without_base(case, tmp_path, vae_rank):
    """What train.py --preset sd21 writes (save_lora) loads from the file alone: the run recorded its base."""
    folder = case[0]
    model = FlowSR.sd21(folder, upsample="bicubic")
    lora.inject_lora(model.unet, UNET_LORA_TARGETS, 4)
    if vae_rank:
        lora.inject_lora(model.ae, vae_encoder_targets(model.ae), vae_rank)
    lora.mark_only_lora_trainable(model)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.1)
    assert vae_encoder_targets(model.ae) == vae_encoder_targets(FlowSR.sd21(folder, context=model.context).ae)
    path = str(tmp_path / "run.safetensors")
    model.save_lora(path, 4, vae_rank, extra={"train_config": {"base": folder, "prompt": FLOWSR_PROMPT}})

    loaded = FlowSR.load(path)
    assert loaded.upsample == "bicubic" and not lora.lora_layers(loaded)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert (loaded.encode(x) - z).abs().max() < 1e-5 * z.abs().max()
        assert (velocity(loaded, z) - velocity(model, z)).abs().max() < 1e-4 * velocity(model, z).abs().max()
    with lora.lora_disabled(model), torch.no_grad():
        assert (velocity(loaded, z) - velocity(model, z)).abs().max() > 1e-2  # the LoRA was in the file


# ---- full checkpoints -------------------------------------------------------------------------------------

def test_full_checkpoint_round_trip_and_dtype(tmp_path):
    model = noisy_(FlowSR.tiny(upsample="bilinear"))
    model.context = torch.randn_like(model.context)
    path = str(tmp_path / "tiny.safetensors")
    model.save(path, extra={"step": 7})
    loaded = FlowSR.load(path)
    z = torch.randn(1, 48, 8, 8)
    assert loaded.upsample == "bilinear" and torch.equal(loaded.context, model.context)
    assert loaded.flat_gate == model.flat_gate > 0
    assert torch.equal(loaded.head.conv_out.weight, model.head.conv_out.weight)
    assert torch.equal(loaded.state_dict()["unet.conv_in.weight"], model.state_dict()["unet.conv_in.weight"])
    # the same weights in other memory can take other kernel paths: equal up to float rounding
    assert (velocity(loaded, z) - velocity(model, z)).abs().max() < 1e-5 * velocity(model, z).abs().max()
    half = FlowSR.load(path, dtype=torch.bfloat16)
    assert half.context.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())


def rewrite(path, out, edit_tensors=None, edit_config=None):
    from safetensors.torch import load_file
    from plumbing.weights import read_metadata
    tensors, meta = load_file(path), read_metadata(path)
    config = json.loads(meta["flowsr_model"])
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    config = edit_config(config) if edit_config else config
    save_file(tensors, out, metadata={"flowsr_model": config if isinstance(config, str) else json.dumps(config)})
    return out


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (lambda t: {k: v.long() if k == "unet.conv_in.weight" else v for k, v in t.items()}, None,
     r"not floating point: unet\.conv_in\.weight"),
    (lambda t: {k: v for k, v in t.items() if k != "context"}, None, r"no 'context' tensor of shape \(1, L, 32\)"),
    (lambda t: {**t, "context": torch.zeros(1, 77, 16)}, None, r"no 'context' tensor"),
    (lambda t: {**t, "unet.extra": torch.zeros(1)}, None, r"1 unexpected: extra"),
    (None, lambda c: {**c, "unet": {**c["unet"], "block_out_channels": [64, 256]}}, r"shape mismatch"),
    (None, lambda c: {**c, "unet": {**c["unet"], "block_out_channels": [-64, 128]}}, r"bad model config"),
    (None, lambda c: {**c, "unet": {**c["unet"], "wrong": 1}}, r"bad model config"),
    (None, lambda c: {**c, "autoencoder": {"kind": "pixel", "factor": -4, "channels": 3}}, r"pixel autoencoder"),
    (None, lambda c: {**c, "autoencoder": "pixel"}, r"bad model config"),
    (None, lambda c: {**c, "upsample": "nearest"}, r"unknown upsample mode 'nearest'"),
    (lambda t: {k: v for k, v in t.items() if k != "head.conv_mid.bias"}, None, r"1 missing: conv_mid\.bias"),
    (None, lambda c: {**c, "pixel_head": 0}, r"head\.\* tensors but no pixel_head"),
    (None, lambda c: {**c, "pixel_head": 16}, r"shape mismatch"),
    (None, lambda c: {**c, "pixel_head": 2.5}, r"pixel_head in metadata must be an integer >= 0"),
    (None, lambda c: "[1, 2]", r"metadata is not a JSON object"),
    (None, lambda c: "{", r"metadata is not valid JSON"),
])
def test_full_checkpoint_errors(tmp_path, edit_tensors, edit_config, message):
    path = str(tmp_path / "tiny.safetensors")
    FlowSR.tiny().save(path)
    bad = rewrite(path, str(tmp_path / "bad.safetensors"), edit_tensors, edit_config)
    with pytest.raises(WeightsError, match=rf"^{re.escape(bad)}: .*{message}"):
        FlowSR.load(bad)


# ---- the flat gate of the tiny preset ---------------------------------------------------------------------

def test_detail_gate_keeps_flat_content_exactly_and_opens_on_detail():
    model = noisy_(FlowSR.tiny())
    t = torch.tensor([1000.0])
    flat = model.encode(torch.full((1, 3, 64, 64), 0.3))  # (1, 48, 16, 16)
    ramp = model.encode(torch.linspace(-0.5, 0.5, 64).expand(1, 3, 64, 64))  # a slope under the contrast k
    detail = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    with torch.no_grad():
        assert torch.equal(model(flat, t), torch.zeros_like(flat))  # exactly: no texture, no grid on a flat sky
        assert model.detail_gate(ramp)[..., 4:-4, 4:-4].max() == 0  # a smooth slope is flat too (borders aside)
        levels = torch.randint(-1, 2, (1, 3, 64, 64)) * 2 / 255  # -1, 0, +1 grey levels around a flat field
        assert model.detail_gate(model.encode(0.3 + levels)).max() == 0  # faint noise is not detail
        assert model.detail_gate(model.encode(0.3 + 4 * levels)).min() > 0  # four grey levels are
        gate = model.detail_gate(detail)
        assert gate.shape == (1, 1, 16, 16) and gate.min() > 0.9
        ungated = FlowSR(model.unet, model.ae, model.context, flat_gate=0.0)
        ungated.head = model.head
        assert torch.equal(model(detail, t), ungated(detail, t) * gate)
        assert ungated(flat, t).abs().max() > 1e-3  # without the gate the network does paint the flat image


def test_detail_gate_needs_the_pixel_autoencoder():
    from vae import AutoencoderKL, AutoencoderKLConfig
    model = FlowSR.tiny()
    ae = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8))
    with pytest.raises(ValueError, match="the flat gate and the pixel head need the pixel autoencoder"):
        FlowSR(model.unet, ae, model.context, flat_gate=0.01)
    with pytest.raises(ValueError, match="the flat gate and the pixel head need the pixel autoencoder"):
        FlowSR(model.unet, ae, model.context, pixel_head=8)


# ---- the pixel head of the tiny preset --------------------------------------------------------------------

def test_pixel_head_makes_the_velocity_from_upsampled_features_and_pixels():
    model = noisy_(FlowSR.tiny(flat_gate=0.0))
    head = model.head
    z, t = torch.randn(2, 48, 8, 8), torch.tensor([1000.0, 500.0])
    with torch.no_grad():
        u = model.unet(z, t, model.context.expand(2, -1, -1))  # (2, 48, 8, 8): features, not a velocity
        pixels = torch.cat([F.interpolate(u, scale_factor=4, mode="bilinear"), F.pixel_shuffle(z, 4)], 1)
        by_hand = head.conv_out(F.silu(head.conv_mid(F.silu(head.conv_in(pixels)))))  # (2, 3, 32, 32)
        assert torch.allclose(model(z, t), F.pixel_unshuffle(by_hand, 4), atol=1e-6)


def test_pixel_head_output_does_not_repeat_with_the_4x4_blocks():
    """Features that vary smoothly give a velocity that varies smoothly: no pattern locked to the blocks.

    A UNet output read as a velocity through pixel-shuffle (the pixel autoencoder's decoder) turns a feature
    map constant across the latent into a pattern that repeats every 4 pixels; the head does not.
    """
    head = noisy_(FlowSR.tiny()).head
    u = torch.randn(1, 48, 1, 1).expand(1, 48, 8, 8)  # the same features in every latent pixel
    z = torch.zeros(1, 48, 8, 8)  # a flat image
    with torch.no_grad():
        inner = F.pixel_shuffle(head(u, z), 4)[..., 4:-4, 4:-4]  # (1, 3, 24, 24), away from the zero padding
        assert (inner - inner[..., :1, :1]).abs().max() < 1e-5
        block_locked = F.pixel_shuffle(u, 4)[..., 4:-4, 4:-4]
        assert (block_locked - block_locked[..., :1, :1]).abs().max() > 0.1  # what the test would catch


def test_full_checkpoint_without_head_loads_as_before(tmp_path):
    """Checkpoints written before the head existed (no pixel_head, no head.* tensors) load without one."""
    model = noisy_(FlowSR.tiny(pixel_head=0))
    path = str(tmp_path / "old.safetensors")
    model.save(path)
    old = rewrite(path, str(tmp_path / "old2.safetensors"),
                  edit_config=lambda c: {k: v for k, v in c.items() if k != "pixel_head"})
    loaded = FlowSR.load(old)
    z = torch.randn(1, 48, 8, 8)
    assert loaded.head is None
    assert (velocity(loaded, z) - velocity(model, z)).abs().max() < 1e-5 * velocity(model, z).abs().max()
