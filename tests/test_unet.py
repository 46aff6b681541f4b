"""unet.py against diffusers' UNet2DConditionModel: parity, both file layouts, strict loading, checkpointing."""
import json
import os
import random
import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from plumbing import single_file
import unet
from plumbing import weights
from plumbing.weights import WeightsError

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# Tiny configs (diffusers keyword arguments). The two loaded from LDM files follow the SD families,
# since a single file carries no config: 32 norm groups; 64-dim heads with linear proj (SD 2.x), or
# 8 heads with conv proj (SD 1.x).
LINEAR_2_LEVELS = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                       attention_head_dim=4, use_linear_projection=True,
                       down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP))
CONV_3_LEVELS = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=24,
                     norm_num_groups=8, attention_head_dim=[2, 4, 8], use_linear_projection=False,
                     transformer_layers_per_block=2, in_channels=5, out_channels=3,
                     down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP))
SD2_STYLE = dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=32, norm_num_groups=32,
                 attention_head_dim=[1, 2], use_linear_projection=True,
                 down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP))
SD1_STYLE = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=24, norm_num_groups=32,
                 attention_head_dim=8, use_linear_projection=False,
                 down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP))
SD21_BASE = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=64,
                 down_block_types=(CA_DOWN, CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP, CA_UP))



def reference(config):
    """A diffusers UNet with random weights; the biases too, so that no path hides behind a zero."""
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(model, size=(8, 8), batch=2):
    config = model.config
    z = torch.randn(batch, config.in_channels, *size)
    t = torch.tensor([857.69, 8.93][:batch])
    return z, t, torch.randn(batch, 7, config.cross_attention_dim)


def assert_same_output(ours, ref, z, t, context):
    with torch.no_grad():
        expected = ref(z, t, context).sample
        got = ours(z, t, context)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def to_ldm(state_dict, config):
    """diffusers names -> the original LDM (CompVis) names; the inverse of single_file.convert_ldm_unet."""
    layers = config["layers_per_block"]
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    ldm = {}
    for key, tensor in state_dict.items():
        module, param = key.rsplit(".", 1)
        parts = module.split(".")
        if module in simple:
            new = simple[module]
        elif parts[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
            inner = resnet[parts[3]] if parts[1] == "resnets" else ".".join(parts[3:])
            new = f"middle_block.{index}.{inner}"
        elif parts[0] == "down_blocks":
            first = 1 + int(parts[1]) * (layers + 1)
            if parts[2] == "downsamplers":
                new = f"input_blocks.{first + layers}.0.op"
            elif parts[2] == "resnets":
                new = f"input_blocks.{first + int(parts[3])}.0.{resnet[parts[4]]}"
            else:
                new = f"input_blocks.{first + int(parts[3])}.1." + ".".join(parts[4:])
        else:
            level = int(parts[1])
            first = level * (layers + 1)
            if parts[2] == "upsamplers":
                slot = 2 if config["up_block_types"][level] == CA_UP else 1
                new = f"output_blocks.{first + layers}.{slot}.conv"
            elif parts[2] == "resnets":
                new = f"output_blocks.{first + int(parts[3])}.0.{resnet[parts[4]]}"
            else:
                new = f"output_blocks.{first + int(parts[3])}.1." + ".".join(parts[4:])
        ldm[f"{new}.{param}"] = tensor
    return ldm


def write_single_file(ref, path):
    """An original-layout SD checkpoint: UNet under model.diffusion_model., plus VAE and text keys."""
    state_dict = ref.state_dict()
    ldm = {single_file.UNET_PREFIX + k: v for k, v in to_ldm(state_dict, ref.config).items()}
    # diffusers' own converter maps it back exactly: the file is a genuine LDM layout
    back = convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    ldm["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 8)
    if path.endswith(".safetensors"):
        save_file(ldm, path)
    else:
        torch.save({"state_dict": ldm}, path)
    return ldm


@pytest.mark.parametrize("config", [LINEAR_2_LEVELS, CONV_3_LEVELS], ids=["linear-2-levels", "conv-3-levels"])
def test_diffusers_folder_matches_diffusers(config, tmp_path):
    ref = reference(config)
    ref.save_pretrained(tmp_path / "unet")
    ours = unet.UNet.from_pretrained(tmp_path)  # an SD folder holding unet/
    assert_same_output(ours, ref, *inputs(ref))
    z, _, context = inputs(ref, size=(8, 12))  # odd sizes on the way down: the decoder upsamples to the skips
    assert_same_output(ours, ref, z, 999.5, context)
    assert_same_output(ours, ref, z, torch.tensor(0.25), context)


def test_bin_weights_and_dtype(tmp_path):
    ref = reference(LINEAR_2_LEVELS)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.bin")
    assert_same_output(unet.UNet.from_pretrained(tmp_path), ref, *inputs(ref))
    half = unet.UNet.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("source", ["folder", "single file"])
def test_channels_last_kernels_and_in_place_inference_change_nothing(tmp_path, source):
    """What inference loads (channels-last kernels) and runs (in-place SiLU and adds without autograd) computes
    what the plain model computes, and leaves its inputs alone."""
    ref = reference(SD2_STYLE)
    if source == "folder":
        ref.save_pretrained(tmp_path / "unet")
        path = tmp_path
    else:
        path = tmp_path / "sd.safetensors"
        write_single_file(ref, str(path))
    fast = unet.UNet.from_pretrained(path, channels_last=True)
    plain = unet.UNet.from_pretrained(path)
    kernels = [p for p in fast.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4)
    z, t, context = inputs(ref)
    z = z.contiguous(memory_format=torch.channels_last)
    z_before = z.clone()
    expected = plain(z, t, context)  # autograd on: the out-of-place path
    with torch.no_grad():
        got = fast(z, t, context)
    assert torch.equal(z, z_before)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("config,name", [(SD2_STYLE, "sd2.safetensors"), (SD1_STYLE, "sd1.ckpt")])
def test_single_file_matches_diffusers(config, name, tmp_path):
    ref = reference(config)
    write_single_file(ref, str(tmp_path / name))
    ours = unet.UNet.from_pretrained(tmp_path / name)
    expected = unet.UNetConfig.from_diffusers({k: v for k, v in ref.config.items() if k != "sample_size"})
    assert ours.config == expected
    assert_same_output(ours, ref, *inputs(ref))


def test_module_names_and_lora_targets_match_diffusers():
    ref = reference(CONV_3_LEVELS)
    ours = unet.UNet(unet.UNetConfig.from_diffusers(dict(ref.config)))

    def layers(model):
        kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
        return {name: type(m) for name, m in model.named_modules() if isinstance(m, kinds)}

    assert layers(ours) == layers(ref)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_in", "conv_out", "proj_in", "proj_out",
               "ff.net.0.proj", "ff.net.2", "time_emb_proj", "conv_shortcut", "conv", "linear_1", "linear_2"]

    def adapted(model):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), model)
        return {name for name, m in model.named_modules() if hasattr(m, "lora_A")}

    assert adapted(ours) == adapted(ref) != set()


def test_config_round_trips_and_refusals():
    config = unet.UNetConfig.from_diffusers({**SD21_BASE, "_class_name": "UNet2DConditionModel",
                                             "_diffusers_version": "0.8.0", "act_fn": "silu",
                                             "center_input_sample": False, "mid_block_scale_factor": 1,
                                             "upcast_attention": False})
    assert config == unet.UNetConfig(sample_size=64)
    assert config.heads() == (5, 10, 20, 20)
    assert unet.UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    tiny = unet.UNetConfig.from_diffusers(LINEAR_2_LEVELS)
    assert unet.UNetConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
    for bad, words in [({"class_embed_type": "timestep"}, "class_embed_type"),
                       ({"only_cross_attention": True}, "only_cross_attention"),
                       ({"dual_cross_attention": True}, "dual_cross_attention"),
                       ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
                       ({"layers_per_block": [1, 2]}, "layers_per_block"),
                       ({"some_new_feature": 1}, "some_new_feature"),
                       ({"_class_name": "AutoencoderKL"}, "AutoencoderKL")]:
        with pytest.raises(ValueError, match=words):
            unet.UNetConfig.from_diffusers({**LINEAR_2_LEVELS, **bad})
    with pytest.raises(ValueError, match="unknown keys"):
        unet.UNetConfig.from_dict({"in_channels": 4, "colour": "red"})


def assert_weights_error(path, words=""):
    with pytest.raises(WeightsError) as info:
        unet.UNet.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and words in message, message


def test_strict_loading_errors(tmp_path):
    ref = reference(LINEAR_2_LEVELS)
    good = ref.state_dict()
    first = next(iter(good))
    for name, state_dict, words in [
            ("missing", {k: v for k, v in good.items() if k != first}, "1 missing"),
            ("extra", {**good, "down_blocks.0.extra.weight": torch.zeros(1)}, "1 unexpected"),
            ("shape", {**good, first: torch.zeros(3)}, "shape mismatch")]:
        folder = tmp_path / name
        ref.save_pretrained(folder)
        weights = folder / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, weights)
        assert_weights_error(folder, words)

    vae_folder = tmp_path / "vae"
    vae_folder.mkdir()
    (vae_folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    assert_weights_error(vae_folder, "config describes a AutoencoderKL")
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)},
              tmp_path / "vae.safetensors")
    assert_weights_error(tmp_path / "vae.safetensors", "no Stable Diffusion UNet")
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "sd_vae.safetensors")
    assert_weights_error(tmp_path / "sd_vae.safetensors", "no Stable Diffusion UNet")
    assert_weights_error(tmp_path / "extra" / "diffusion_pytorch_model.safetensors", "pass the folder")

    blob = (tmp_path / "extra" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    assert_weights_error(tmp_path / "truncated.safetensors")
    for name in ("random.safetensors", "random.ckpt"):
        (tmp_path / name).write_bytes(random.Random(0).randbytes(4096))  # the same bytes every run
        assert_weights_error(tmp_path / name)


def test_single_file_reads_only_unet_tensors(tmp_path, monkeypatch):
    write_single_file(reference(SD2_STYLE), str(tmp_path / "sd.safetensors"))
    read = []

    def recording(path, prefix=None, dtype=None, channels_last=False):
        tensors = weights.read_state_dict(path, prefix, dtype, channels_last)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(single_file, "read_state_dict", recording)
    unet.UNet.from_pretrained(tmp_path / "sd.safetensors")
    assert read and all(k.startswith(single_file.UNET_PREFIX) for k in read)  # not the VAE nor text encoder


def test_single_file_that_does_not_fit(tmp_path):
    ref = reference(SD1_STYLE)
    ldm = write_single_file(ref, str(tmp_path / "sd.safetensors"))
    key = single_file.UNET_PREFIX + "output_blocks.1.0.in_layers.2.weight"
    save_file({k: v for k, v in ldm.items() if k != key}, tmp_path / "missing.safetensors")
    assert_weights_error(tmp_path / "missing.safetensors", "up_blocks.0.resnets.1.conv1.weight")
    extra = {**ldm, single_file.UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(4, 4)}
    save_file(extra, tmp_path / "extra.safetensors")
    assert_weights_error(tmp_path / "extra.safetensors", "label_emb.0.0.weight")
    save_file({k: v for k, v in ldm.items() if "middle_block.1." not in k}, tmp_path / "no_mid.safetensors")
    assert_weights_error(tmp_path / "no_mid.safetensors", "middle_block.1.proj_in.weight")


def test_gradient_checkpointing_gives_same_gradients():
    model = unet.UNet(unet.UNetConfig.from_diffusers(LINEAR_2_LEVELS))
    z, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    grads, stored = [], []
    for checkpointed in (False, True):
        model.gradient_checkpointing = checkpointed
        model.zero_grad()
        z_leaf = z.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            out = model(z_leaf, torch.tensor([500.0, 20.5]), context)
        out.square().mean().backward()
        stored.append(sum(saved))
        grads.append([z_leaf.grad] + [p.grad for p in model.parameters()])
    assert stored[1] < stored[0] / 2, stored  # checkpointing did keep fewer activations for backward
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(os.environ.get("FLOWSR_FULLSIZE") != "1", reason="full-size SD 2.1-base UNet: FLOWSR_FULLSIZE=1")
def test_full_size_sd21_base(tmp_path):
    start = time.time()
    ref = UNet2DConditionModel(**SD21_BASE).eval()
    ref.save_pretrained(tmp_path / "unet")
    write_single_file(ref, str(tmp_path / "v2-1_512.safetensors"))
    z, t, context = torch.randn(1, 4, 32, 32), torch.tensor([1000.0]), torch.randn(1, 77, 1024)
    with torch.no_grad():
        expected = ref(z, t, context).sample
    del ref
    for path in (tmp_path, tmp_path / "v2-1_512.safetensors"):
        ours = unet.UNet.from_pretrained(path)
        assert ours.config.heads() == (5, 10, 20, 20)
        assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 865.9
        with torch.no_grad():
            got = ours(z, t, context)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        del ours
    print(f"full-size SD 2.1-base UNet: both layouts match diffusers in {time.time() - start:.0f} s")


@pytest.mark.parametrize("dim", [32, 33, 320])
def test_timestep_embedding_matches_diffusers(dim):
    """Both orders and frequency shifts, and an odd width (diffusers pads a zero column)."""
    from diffusers.models.embeddings import get_timestep_embedding
    from unet import timestep_embedding
    t = torch.tensor([0.0, 1.5, 500.0, 999.0])
    for flip in (True, False):
        for shift in (0, 1):
            ours = timestep_embedding(t, dim, flip, shift)
            reference = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
            assert ours.shape == (4, dim) and torch.allclose(ours, reference, atol=1e-5)
