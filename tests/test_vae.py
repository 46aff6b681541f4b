"""vae.py against diffusers' AutoencoderKL (random weights saved in the real file layouts)."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from plumbing import single_file
import vae
from plumbing import weights
from plumbing.weights import WeightsError

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def diffusers_vae(block_out_channels, layers_per_block, norm_num_groups, seed=0):
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    model = DiffusersAutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                   norm_num_groups=norm_num_groups, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * levels,
                                   up_block_types=("UpDecoderBlock2D",) * levels).eval()
    with torch.no_grad():  # move norms and biases off their 1/0 init so a mis-mapped one shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def to_ldm(state_dict, levels):
    """diffusers VAE names -> original LDM names, written independently of vae.py."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[1] == "down_blocks":
            rest = ".".join(parts[5:])
            inner = "downsample." + rest if parts[3] == "downsamplers" else f"block.{parts[4]}.{rest}"
            key = f"encoder.down.{parts[2]}.{inner}"
        elif parts[1] == "up_blocks":
            level = levels - 1 - int(parts[2])
            rest = ".".join(parts[5:])
            inner = "upsample." + rest if parts[3] == "upsamplers" else f"block.{parts[4]}.{rest}"
            key = f"decoder.up.{level}.{inner}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            key = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
            key = f"{parts[0]}.mid.attn_1.{name}.{parts[-1]}"
            if name != "norm" and value.ndim == 2:
                value = value[:, :, None, None]  # LDM attention projections are 1x1 convs
        elif parts[1] == "conv_norm_out":
            key = f"{parts[0]}.norm_out.{parts[2]}"
        out[key.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def assert_close(ours, reference):
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    assert error <= 1e-4 * reference.abs().max().item(), f"max abs diff {error}"


def assert_parity(ours, reference, x):
    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        assert_close(ours.encode(x), mean)
        assert_close(ours.decode(mean), reference.decode(mean).sample)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers VAE saved as a whole SD folder: root/vae/{config.json, *.safetensors}."""
    model = diffusers_vae(**TINY)
    root = tmp_path_factory.mktemp("sd")
    model.save_pretrained(root / "vae")
    return model, root


def lora_layers(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def image(h=32, w=32):
    return torch.rand(1, 3, h, w) * 2 - 1


def test_diffusers_folder_parity(tiny):
    reference, root = tiny
    for path in (root, root / "vae"):
        ours = vae.AutoencoderKL.from_pretrained(path)
        assert ours.config == vae.AutoencoderKLConfig(**TINY)
        assert (ours.downscale, ours.latent_channels, ours.scaling_factor) == (2, 4, 0.18215)
        assert_parity(ours, reference, image())
    assert ours.encode(image()).shape == (1, 4, 16, 16)
    # LoRA targets name modules: every Linear / Conv2d sits at the same dotted name as in diffusers.
    assert lora_layers(ours) == lora_layers(reference)


def test_old_attention_names_in_bin_file(tiny, tmp_path):
    reference, root = tiny
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, value in load_file(root / "vae" / "diffusion_pytorch_model.safetensors").items():
        for new_name, old_name in old.items():
            key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        state_dict[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state_dict
    folder = tmp_path / "vae"
    folder.mkdir()
    torch.save(state_dict, folder / "diffusion_pytorch_model.bin")
    (folder / "config.json").write_text((root / "vae" / "config.json").read_text())
    assert_parity(vae.AutoencoderKL.from_pretrained(folder), reference, image())


def test_ldm_single_file(tiny, tmp_path):
    reference, _ = tiny
    diffusers_sd = reference.state_dict()
    ldm = {"first_stage_model." + k: v for k, v in to_ldm(diffusers_sd, levels=2).items()}
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # diffusers' own converter maps our LDM dict back exactly: it is a genuine LDM layout.
    back = convert_ldm_vae_checkpoint(ldm, dict(reference.config))
    assert back.keys() == diffusers_sd.keys()
    assert all(torch.equal(back[k], diffusers_sd[k]) for k in back)

    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    ldm["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 16)
    path = tmp_path / "v2-1_tiny.safetensors"
    save_file(ldm, path)
    # norm_num_groups is invisible in shapes: the inferred config assumes SD's 32 groups.
    inferred = vae.AutoencoderKL.from_pretrained(path).config
    assert inferred == vae.AutoencoderKLConfig((32, 64), 1, norm_num_groups=32)
    ours = vae.AutoencoderKL.from_pretrained(path, config=vae.AutoencoderKLConfig(**TINY))
    assert_parity(ours, reference, image())
    # A standalone LDM VAE (like vae-ft-mse-840000-ema-pruned.ckpt): no prefix, pickled under "state_dict".
    bare = tmp_path / "vae-ft.ckpt"
    torch.save({"state_dict": to_ldm(diffusers_sd, levels=2)}, bare)
    assert_parity(vae.AutoencoderKL.from_pretrained(bare, config=vae.AutoencoderKLConfig(**TINY)), reference, image())


def test_single_file_reads_only_vae_tensors(tiny, tmp_path, monkeypatch):
    ldm = {"first_stage_model." + k: v for k, v in to_ldm(tiny[0].state_dict(), levels=2).items()}
    save_file({**ldm, "model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "sd.safetensors")
    read = []

    def recording(path, prefix=None, dtype=None, channels_last=False):
        tensors = weights.read_state_dict(path, prefix, dtype, channels_last)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(single_file, "read_state_dict", recording)
    vae.AutoencoderKL.from_pretrained(tmp_path / "sd.safetensors", config=vae.AutoencoderKLConfig(**TINY))
    assert sorted(read) == sorted(ldm)


def test_from_pretrained_dtype(tiny):
    _, root = tiny
    half = vae.AutoencoderKL.from_pretrained(root, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert not any(p.is_meta for p in half.parameters())


def test_channels_last_kernels_and_in_place_inference_change_nothing(tiny):
    """Inference's channels-last kernels and in-place SiLU / adds (no autograd) give the plain model's output."""
    _, root = tiny
    fast, plain = vae.AutoencoderKL.from_pretrained(root, channels_last=True), vae.AutoencoderKL.from_pretrained(root)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    x = image().contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    expected = plain.decode(plain.encode(x))  # autograd on: the out-of-place path
    with torch.no_grad():
        got = fast.decode(fast.encode(x))
    assert torch.equal(x, x_before) and (got - expected).abs().max() < 1e-5


def test_tiled_single_tile_is_exact(tiny):
    ours = vae.AutoencoderKL.from_pretrained(tiny[1])
    x = image(32, 24)
    with torch.no_grad():
        z = ours.encode(x)
        assert torch.equal(ours.encode(x, tile_size=32, tile_overlap=8), z)
        assert torch.equal(ours.decode(z, tile_size=16), ours.decode(z))


def test_blend_ramps_span_the_overlap_in_output_pixels():
    """Two tiles that each give a constant (1, then 2): across the overlap of 4 input pixels, which is 32 output
    pixels at scale 8, the blend rises linearly from 1 to 2 (ramp weights (i + 1) / (overlap + 1))."""
    assert torch.equal(vae._ramp(8, 3, torch.zeros(1)), torch.tensor([0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]))
    calls = []

    def constant_per_tile(t):
        calls.append(t.shape)
        return torch.full((1, 1, 8 * t.shape[-2], 8 * t.shape[-1]), float(len(calls)))
    row = vae.blend_tiles(constant_per_tile, torch.zeros(1, 1, 4, 12), 8, 4, 8)[0, 0, 0]  # (96,)
    assert len(calls) == 2 and torch.equal(row[:32], torch.ones(32)) and torch.equal(row[64:], torch.full((32,), 2.0))
    torch.testing.assert_close(row[32:64], 1 + torch.arange(1, 33) / 33)


def test_blend_tiles_is_exact_for_local_functions():
    # For a per-pixel function, the blend weights must cancel exactly at every position, whatever
    # the tiling: this checks tile placement and normalisation in both scale directions.
    x = image(44, 36)
    upsample = lambda t: 2 * F.interpolate(t, scale_factor=8.0, mode="nearest") + 1  # noqa: E731
    assert_close(vae.blend_tiles(upsample, x, tile_size=16, overlap=4, scale=8), upsample(x))
    unshuffle = lambda t: F.pixel_unshuffle(t, 2)  # noqa: E731
    x = image(88, 72)
    assert_close(vae.blend_tiles(unshuffle, x, tile_size=48, overlap=16, scale=0.5), unshuffle(x))


@pytest.mark.parametrize("length,tile,overlap,align", [(1024, 768, 192, 8), (1024, 512, 128, 8), (128, 96, 24, 1),
                                                     (200, 64, 16, 1), (2048, 768, 192, 8), (64, 64, 16, 1)])
def test_tile_spans_cover_with_the_fewest_equal_tiles(length, tile, overlap, align):
    spans = vae.tile_spans(length, tile, overlap, align)
    sizes = {size for _, size in spans}
    assert len(sizes) == 1 and max(sizes) <= tile
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length
    assert all(start % align == 0 and size % align == 0 for start, size in spans)
    for (a, size), (b, _) in zip(spans, spans[1:]):
        assert a < b and a + size - b >= overlap - align  # consecutive tiles overlap (by ~overlap)
    fewer = len(spans) - 1  # one tile less cannot cover the length with the required overlap
    assert fewer == 0 or fewer * tile - (fewer - 1) * overlap < length
    smaller = max(sizes) - align  # and tiles one step smaller would not cover it either: no wasted work
    assert len(spans) == 1 or len(spans) * smaller - (len(spans) - 1) * overlap < length


def test_tiled_close_to_untiled_on_smooth_input(tiny):
    ours = vae.AutoencoderKL.from_pretrained(tiny[1])
    ys, xs = torch.meshgrid(torch.arange(80.0), torch.arange(72.0), indexing="ij")
    # A smooth pattern with the same statistics everywhere (period 16 px), so that each tile's
    # GroupNorm statistics are close to the whole image's.
    x = 0.8 * torch.stack([torch.sin(torch.pi * (xs / 8 + p)) * torch.cos(torch.pi * (ys / 8 - p))
                           for p in (0.0, 0.6, 1.2)])[None]  # (1, 3, 80, 72)
    with torch.no_grad():
        z = ours.encode(x)
        z_tiled = ours.encode(x, tile_size=48, tile_overlap=16)  # 48 divides neither 80 nor 72
        image_full = ours.decode(z)
        image_tiled = ours.decode(z, tile_size=24, tile_overlap=8)
    assert z_tiled.shape == z.shape == (1, 4, 40, 36) and image_tiled.shape == image_full.shape == x.shape
    encode_error = ((z_tiled - z).abs().max() / z.abs().max()).item()
    decode_error = ((image_tiled - image_full).abs().max() / image_full.abs().max()).item()
    # Tiles see their own GroupNorm statistics and attention context, so the match is close, not
    # exact; with these random weights it measures 0.105 (encode) and 0.160 (decode), about half
    # of what diffusers' own tiled_encode / tiled_decode give at the same tile sizes (0.21, 0.33).
    assert encode_error < 0.15 and decode_error < 0.2, (encode_error, decode_error)


def test_tiled_encode_rejects_misaligned_tiles(tiny):
    ours = vae.AutoencoderKL.from_pretrained(tiny[1])
    with pytest.raises(ValueError, match="divisible by 2"):
        ours.encode(image(40, 40), tile_size=33, tile_overlap=8)
    with pytest.raises(ValueError, match="tile_overlap"):
        ours.decode(torch.zeros(1, 4, 20, 20), tile_size=8, tile_overlap=8)


def test_pixel_autoencoder():
    pixel = vae.PixelAutoencoder()
    assert (pixel.downscale, pixel.latent_channels, pixel.scaling_factor) == (4, 48, 1.0)
    assert list(pixel.parameters()) == []
    x = image(32, 24)
    z = pixel.encode(x, tile_size=8, tile_overlap=4)
    assert z.shape == (1, 48, 8, 6)
    assert torch.equal(z[0, :16, 1, 2].reshape(4, 4), x[0, 0, 4:8, 8:12])  # channel-major 4x4 blocks
    assert torch.equal(pixel.decode(z, tile_size=2), x)
    with pytest.raises(ValueError, match="divisible by 4"):
        pixel.encode(image(30, 32))


def test_vae_from_config_round_trip():
    pixel = vae.vae_from_config(json.loads(json.dumps(vae.PixelAutoencoder(2).to_dict())))
    assert isinstance(pixel, vae.PixelAutoencoder) and pixel.latent_channels == 12
    config = vae.AutoencoderKLConfig(**TINY, scaling_factor=0.5)
    kl = vae.vae_from_config(json.loads(json.dumps(config.to_dict())))
    assert isinstance(kl, vae.AutoencoderKL) and kl.config == config
    with pytest.raises(ValueError, match="unknown autoencoder kind"):
        vae.vae_from_config({"kind": "vqgan"})


def copy_folder(root, tmp_path, edit_state_dict=None, edit_config=None):
    folder = tmp_path / "vae"
    folder.mkdir(parents=True)
    state_dict = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    config = json.loads((root / "vae" / "config.json").read_text())
    save_file(edit_state_dict(state_dict) if edit_state_dict else state_dict,
              folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return folder


def expect_error(path, pattern, **kwargs):
    with pytest.raises(WeightsError) as info:
        vae.AutoencoderKL.from_pretrained(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and pattern in message, message
    return message


def test_strict_missing_extra_and_mismatched_keys(tiny, tmp_path):
    _, root = tiny
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    folder = copy_folder(root, tmp_path / "missing", lambda sd: {k: v for k, v in sd.items() if k != key})
    assert str(folder) in expect_error(folder, f"1 missing: {key}")
    folder = copy_folder(root, tmp_path / "extra", lambda sd: {**sd, "encoder.extra.weight": torch.zeros(1)})
    expect_error(folder, "1 unexpected: encoder.extra.weight")
    folder = copy_folder(root, tmp_path / "shape", edit_config=lambda c: {**c, "latent_channels": 8})
    expect_error(folder, "shape mismatch: encoder.conv_out.weight")


def test_unet_and_corrupt_files_are_refused(tiny, tmp_path):
    _, root = tiny
    unet_file = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, unet_file)
    assert str(unet_file) in expect_error(unet_file, "not an AutoencoderKL checkpoint")
    unet_folder = copy_folder(root, tmp_path / "unet",
                              edit_config=lambda c: {**c, "_class_name": "UNet2DConditionModel"})
    expect_error(unet_folder, f"{unet_folder / 'config.json'}: config is for UNet2DConditionModel")

    truncated = tmp_path / "truncated.safetensors"
    data = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    expect_error(truncated, f"{truncated}: not a readable safetensors file")
    expect_error(tmp_path / "nowhere", "no such file")


def test_configs_of_other_autoencoders_are_refused(tiny, tmp_path):
    """Settings that change the math (SD3 / FLUX VAEs, other activations or blocks) fail on their key."""
    _, root = tiny
    for name, edit, key in [("act", {"act_fn": "gelu"}, "act_fn"),
                            ("quant", {"use_quant_conv": False}, "use_quant_conv"),
                            ("shift", {"shift_factor": 0.0609}, "shift_factor"),
                            ("blocks", {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
                             "down_block_types")]:
        folder = copy_folder(root, tmp_path / name, edit_config=lambda c, edit=edit: {**c, **edit})
        expect_error(folder, f"{folder / 'config.json'}: unsupported AutoencoderKL config {key}=")


@pytest.mark.skipif(os.environ.get("FLOWSR_FULLSIZE") != "1", reason="set FLOWSR_FULLSIZE=1 for the full SD 2.1 VAE")
def test_full_size_sd21_vae(tmp_path):
    reference = diffusers_vae((128, 256, 512, 512), 2, 32)
    assert sum(p.numel() for p in reference.parameters()) == 83_653_863
    reference.save_pretrained(tmp_path / "sd" / "vae")
    x = image(64, 64)
    assert_parity(vae.AutoencoderKL.from_pretrained(tmp_path / "sd"), reference, x)
    ldm = {"first_stage_model." + k: v for k, v in to_ldm(reference.state_dict(), levels=4).items()}
    save_file(ldm, tmp_path / "v2-1.safetensors")
    ours = vae.AutoencoderKL.from_pretrained(tmp_path / "v2-1.safetensors")
    assert ours.config == vae.AutoencoderKLConfig((128, 256, 512, 512), 2)
    assert_parity(ours, reference, x)
