import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

import lora
from plumbing.weights import WeightsError, save_atomic

UNET_TARGETS = ["conv1", "conv2", "conv_in", "to_q", "to_k", "to_v", "to_out.0"]
# An encoder-only regex, the way published SR checkpoints (S3Diff, OSEDiff) target the VAE encoder.
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
RANK = 4


def tiny_unet(cross_attention_dim=8):
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4,
        use_linear_projection=True).eval()


def tiny_vae():
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def assert_close(out, ref, rel=1e-5):
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= rel * ref.abs().max().item()


def peft_reference(base, targets):
    """PEFT-injected copy of ``base`` with random (non-identity) LoRA weights."""
    ref = inject_adapter_in_model(LoraConfig(r=RANK, target_modules=targets, init_lora_weights="gaussian"),
                                  copy.deepcopy(base))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    wrapped = sorted(name for name, m in ref.named_modules() if isinstance(m, LoraLayer))
    return ref, wrapped


@pytest.fixture(scope="module")
def unet_case():
    torch.manual_seed(1)
    base = tiny_unet()
    ref, wrapped = peft_reference(base, UNET_TARGETS)
    with torch.no_grad():  # fully trained layers: a LoRA-wrapped one (base_layer keys) and a plain one
        ref.conv_in.base_layer.weight.normal_()
        ref.conv_out.weight.normal_()
    state_dict = {k: v for k, v in ref.state_dict().items()
                  if "lora_" in k or k.startswith(("conv_in.", "conv_out."))}
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([999, 300]), torch.randn(2, 5, 8))
    return base, ref, wrapped, state_dict, inputs


@pytest.fixture(scope="module")
def vae_case():
    torch.manual_seed(2)
    base = tiny_vae()
    ref, wrapped = peft_reference(base, VAE_TARGETS)
    state_dict = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    return base, ref, wrapped, state_dict, torch.randn(1, 3, 16, 16)


def run_unet(model, inputs):
    x, t, context = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=context).sample


def run_vae(model, x):
    with torch.no_grad():
        mean = model.encode(x).latent_dist.mean
        return torch.cat([mean.flatten(), model.decode(mean).sample.flatten()])


def test_unet_parity_with_peft_before_and_after_merge(unet_case):
    base, ref, wrapped, state_dict, inputs = unet_case
    expected = run_unet(ref, inputs)
    assert (expected - run_unet(base, inputs)).abs().max() > 0.1 * expected.abs().max()  # LoRA really acts

    model = copy.deepcopy(base)
    names = lora.inject_lora(model, UNET_TARGETS, RANK)
    assert sorted(names) == wrapped
    assert any(isinstance(model.get_submodule(n).base_layer, nn.Conv2d) for n in names)
    assert any(isinstance(model.get_submodule(n).base_layer, nn.Linear) for n in names)
    lora.load_lora_state_dict(model, state_dict, "peft")
    assert_close(run_unet(model, inputs), expected)

    lora.merge_lora(model)
    assert not lora.lora_layers(model)
    assert list(model.state_dict()) == list(base.state_dict())
    assert_close(run_unet(model, inputs), expected)


def test_vae_encoder_regex_parity_and_lora_disabled(vae_case):
    base, ref, wrapped, state_dict, x = vae_case
    model = copy.deepcopy(base)
    names = lora.inject_lora(model, VAE_TARGETS, RANK)
    assert sorted(names) == wrapped and all(n.startswith("encoder.") for n in names)
    lora.load_lora_state_dict(model, state_dict, "peft")
    expected = run_vae(ref, x)
    assert_close(run_vae(model, x), expected)

    with lora.lora_disabled(model):
        with lora.lora_disabled(model):
            pass
        assert_close(run_vae(model, x), run_vae(base, x))  # still disabled after the nested block
    assert_close(run_vae(model, x), expected)

    lora.merge_lora(model)
    assert list(model.state_dict()) == list(base.state_dict())
    assert_close(run_vae(model, x), expected)


def test_published_format_round_trip(tmp_path, unet_case, vae_case):
    unet_base, unet_ref, _, unet_sd, unet_inputs = unet_case
    vae_base, vae_ref, _, vae_sd, x = vae_case
    fields = {"unet_rank": RANK, "unet_lora_target_modules": UNET_TARGETS,
              "vae_rank": RANK, "vae_lora_target_modules": VAE_TARGETS}
    path = tmp_path / "flowsr.safetensors"
    lora.write_flowsr_checkpoint(path, fields, unet_sd, vae_sd)

    read_fields, read_unet, read_vae = lora.read_flowsr_checkpoint(path)
    assert read_fields == fields
    assert all(torch.equal(read_unet[k], unet_sd[k]) for k in unet_sd) and read_unet.keys() == unet_sd.keys()
    assert all(torch.equal(read_vae[k], vae_sd[k]) for k in vae_sd) and read_vae.keys() == vae_sd.keys()

    unet, vae = copy.deepcopy(unet_base), copy.deepcopy(vae_base)
    lora.apply_flowsr_checkpoint(path, unet, vae)
    assert list(unet.state_dict()) == list(unet_base.state_dict())
    assert_close(run_unet(unet, unet_inputs), run_unet(unet_ref, unet_inputs))
    assert_close(run_vae(vae, x), run_vae(vae_ref, x))

    # Another adapter name (S3Diff stores its VAE LoRA as "vae_skip"), unmerged.
    renamed = {k.replace(".default.", ".vae_skip."): v for k, v in vae_sd.items()}
    lora.write_flowsr_checkpoint(path, fields, unet_sd, renamed)
    unet, vae = copy.deepcopy(unet_base), copy.deepcopy(vae_base)
    lora.apply_flowsr_checkpoint(path, unet, vae, merge=False)
    assert lora.lora_layers(vae)[0][1].adapter == "vae_skip"
    assert_close(run_vae(vae, x), run_vae(vae_ref, x))


def test_checkpoint_that_does_not_fit_the_base(tmp_path, unet_case, vae_case):
    _, _, _, unet_sd, _ = unet_case
    vae_base, _, _, vae_sd, _ = vae_case
    fields = {"unet_rank": RANK, "unet_lora_target_modules": UNET_TARGETS,
              "vae_rank": RANK, "vae_lora_target_modules": VAE_TARGETS}
    path = tmp_path / "flowsr.safetensors"
    lora.write_flowsr_checkpoint(path, fields, unet_sd, vae_sd)
    sd1_like = tiny_unet(cross_attention_dim=12)  # other text width: cross-attention to_k/to_v differ
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))} \(unet\).*shape mismatch.*attn2\.to_k\.lora_A"):
        lora.apply_flowsr_checkpoint(path, sd1_like, copy.deepcopy(vae_base))

    lora.write_flowsr_checkpoint(path, dict(fields, unet_rank=2), unet_sd, vae_sd)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))} \(unet\).*shape mismatch.*lora_A\.default\.weight"):
        lora.apply_flowsr_checkpoint(path, tiny_unet(), copy.deepcopy(vae_base))

    lora.write_flowsr_checkpoint(path, dict(fields, unet_lora_target_modules=["to_qq"]), unet_sd, vae_sd)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))} \(unet\).*'to_qq' match no module"):
        lora.apply_flowsr_checkpoint(path, tiny_unet(), copy.deepcopy(vae_base))


def write_raw(path, tensors, payload):
    metadata = None if payload is None else {lora.METADATA_KEY: payload if isinstance(payload, str)
                                             else json.dumps(payload)}
    save_atomic(tensors, path, metadata)


GOOD_FIELDS = {"unet_rank": 4, "unet_lora_target_modules": ["to_q"], "vae_rank": 4, "vae_lora_target_modules": []}
GOOD_NAMES = {"unet_state_dict": {"unet.a": "a"}, "vae_state_dict": {}}


@pytest.mark.parametrize("tensors, payload, message", [
    ({"unet.a": torch.zeros(1)}, None, "no 'flowsr_checkpoint_metadata' metadata"),
    ({"unet.a": torch.zeros(1)}, "{not json", "is not valid JSON"),
    ({"unet.a": torch.zeros(1)}, {"tensor_names": GOOD_NAMES}, "'fields' is not a JSON object"),
    ({"unet.a": torch.zeros(1)}, {"fields": {"unet_rank": 4}, "tensor_names": GOOD_NAMES}, "lacks the field"),
    ({"unet.a": torch.zeros(1)}, {"fields": dict(GOOD_FIELDS, vae_rank="4"), "tensor_names": GOOD_NAMES},
     "vae_rank must be a positive integer"),
    ({"unet.a": torch.zeros(1)}, {"fields": GOOD_FIELDS, "tensor_names": {"unet_state_dict": {"unet.a": "a"}}},
     "lacks a .* object 'vae_state_dict'"),
    ({"unet.a": torch.zeros(1)}, {"fields": GOOD_FIELDS,
                                  "tensor_names": dict(GOOD_NAMES, unet_state_dict={"unet.b": "a"})},
     "not in the file: unet.b"),
    ({"unet.a": torch.zeros(1), "extra": torch.zeros(1)}, {"fields": GOOD_FIELDS, "tensor_names": GOOD_NAMES},
     "not named in the metadata: extra"),
])
def test_read_flowsr_checkpoint_errors(tmp_path, tensors, payload, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, tensors, payload)
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(path))}: .*{message}"):
        lora.read_flowsr_checkpoint(path)


def test_read_flowsr_checkpoint_accepts_any_stored_names(tmp_path):
    path = tmp_path / "ok.safetensors"
    write_raw(path, {"t0": torch.ones(2), "t1": torch.zeros(3)},
              {"fields": dict(GOOD_FIELDS, lora_alpha=16),
               "tensor_names": {"unet_state_dict": {"t0": "a.weight"}, "vae_state_dict": {"t1": "b.weight"}}})
    fields, unet_sd, vae_sd = lora.read_flowsr_checkpoint(path)
    assert fields["lora_alpha"] == 16
    assert torch.equal(unet_sd["a.weight"], torch.ones(2)) and torch.equal(vae_sd["b.weight"], torch.zeros(3))


class Block(nn.Module):
    """A diffusers-like tree: names that test PEFT's suffix rule."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv1x = nn.Conv2d(6, 6, 1)
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(6, 6)
        self.attn1.to_out = nn.ModuleDict({"0": nn.Linear(6, 6), "01": nn.Linear(6, 6), "1": nn.Dropout(0.0)})

    def forward(self, x):  # (B, 3, H, W) -> (B, 6, H, W)
        h = self.conv1x(self.conv1(self.conv_in(x)))
        q = self.attn1.to_q(h.movedim(1, -1))
        return (self.attn1.to_out["0"](q) + self.attn1.to_out["01"](q)).movedim(-1, 1)


def test_target_matching_rule():
    assert lora.inject_lora(Block(), ["to_out.0"], 2) == ["attn1.to_out.0"]
    assert lora.inject_lora(Block(), ["conv1"], 2) == ["conv1"]
    assert lora.inject_lora(Block(), ["conv1x"], 2) == ["conv1x"]
    assert lora.inject_lora(Block(), ["attn1.to_q", "conv_in"], 2) == ["conv_in", "attn1.to_q"]
    assert lora.inject_lora(Block(), r"conv1x?", 2) == ["conv1", "conv1x"]
    assert not lora.target_matches("attn1.to_out.01", ["to_out.0"])
    assert not lora.target_matches("xconv1", ["conv1"])
    assert not lora.target_matches("a.conv1", r"conv1")  # a regex must match the whole name

    with pytest.raises(ValueError, match=r"'to_qq' match no module of Block"):
        lora.inject_lora(Block(), ["to_q", "to_qq"], 2)
    with pytest.raises(ValueError, match=r"attn1\.to_out \(ModuleDict\)"):
        lora.inject_lora(Block(), ["to_out"], 2)
    with pytest.raises(ValueError, match=r"attn1\.to_out\.1 \(Dropout\)"):
        lora.inject_lora(Block(), ["to_out.1"], 2)


def test_fresh_lora_is_identity_and_only_lora_trains():
    base = Block()
    model = copy.deepcopy(base)
    lora.inject_lora(model, ["conv1", "to_q", "to_out.0"], 3)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(model(x), base(x))
    assert model.conv1.lora_A.default.weight.shape == (3, 6, 3, 3)
    assert model.conv1.lora_B.default.weight.shape == (6, 3, 1, 1)
    assert model.attn1.to_q.scale == 8 / 3

    lora.mark_only_lora_trainable(model)
    lora_keys = {f"{m}.lora_{ab}.default.weight" for m in ("conv1", "attn1.to_q", "attn1.to_out.0") for ab in "AB"}
    assert set(lora.lora_state_dict(model)) == lora_keys
    assert {id(p) for p in lora.lora_parameters(model)} == {id(p) for n, p in model.named_parameters()
                                                            if n in lora_keys}
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        trains = name in lora_keys
        assert (p.grad is not None and p.grad.abs().sum() > 0) == trains, name


def test_conv_merge_with_stride_dilation_and_reflect_padding():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
    model = nn.Sequential(conv)
    lora.inject_lora(model, ["0"], 2, alpha=4)
    with torch.no_grad():
        model[0].lora_B.default.weight.normal_()
    x = torch.randn(1, 3, 9, 9)
    expected = model(x).detach()
    assert (expected - conv(x)).abs().max() > 0.1 * expected.abs().max()
    lora.merge_lora(model)
    assert model[0] is conv
    assert_close(model(x).detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_merge_in_place_keeps_the_kernel_layout(layout, dtype):
    """Merging adds B @ A into the kernel where it lies (channels-last too), one rounding in bf16."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.set_(conv.weight.contiguous(memory_format=layout))
    model = nn.Sequential(conv)
    lora.inject_lora(model, ["0"], 2, alpha=4)
    with torch.no_grad():
        model[0].lora_B.default.weight.normal_()
    x = torch.randn(1, 6, 8, 8).contiguous(memory_format=layout)
    expected = model(x).detach()  # fp32, unmerged
    exact = conv.weight.detach() + 2 * (model[0].lora_B.default.weight.flatten(1)
                                       @ model[0].lora_A.default.weight.flatten(1)).view(5, 6, 3, 3)
    model.to(dtype)
    pointer = conv.weight.data_ptr()
    lora.merge_lora(model)
    assert model[0] is conv and conv.weight.data_ptr() == pointer  # in place
    assert conv.weight.is_contiguous(memory_format=layout)
    if dtype == torch.float32:
        assert_close(model(x).detach(), expected)
        assert (conv.weight - exact).abs().max() < 1e-5
    else:
        assert torch.equal(conv.weight.float(), exact.bfloat16().float()) or \
            (conv.weight.float() - exact).abs().max() <= exact.abs().max() * 2 ** -7  # within a bf16 rounding


def test_load_lora_state_dict_is_strict():
    model = Block()
    lora.inject_lora(model, ["conv1", "to_q"], 2)
    good = {k: torch.randn_like(v) for k, v in lora.lora_state_dict(model).items() if "lora_" in k}
    good["conv1.base_layer.weight"] = torch.randn(6, 6, 3, 3)
    good["conv_in.bias"] = torch.randn(6)
    lora.load_lora_state_dict(model, good, "ok.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())

    with pytest.raises(WeightsError, match=r"^src\.pt: .*1 unknown: conv1\.lora_A\.other\.weight"):
        lora.load_lora_state_dict(model, dict(good, **{"conv1.lora_A.other.weight": torch.zeros(2, 6, 3, 3)}),
                                  "src.pt")
    with pytest.raises(WeightsError, match=r"^src\.pt: .*1 missing LoRA: attn1\.to_q\.lora_B\.default\.weight"):
        lora.load_lora_state_dict(model, {k: v for k, v in good.items() if k != "attn1.to_q.lora_B.default.weight"},
                                  "src.pt")
    with pytest.raises(WeightsError, match=r"^src\.pt: .*shape mismatch: conv1\.lora_A\.default\.weight \(4, 6, 3, 3\)"):
        lora.load_lora_state_dict(model, dict(good, **{"conv1.lora_A.default.weight": torch.zeros(4, 6, 3, 3)}),
                                  "src.pt")
    with pytest.raises(WeightsError, match=r"^src\.pt: .*unknown: conv1\.weight"):  # wrapped: base_layer key only
        lora.load_lora_state_dict(model, dict(good, **{"conv1.weight": torch.zeros(6, 6, 3, 3)}), "src.pt")


def test_load_flowsr_lora_to_train_on_refuses_another_alpha_and_plain_weights(tmp_path):
    unet, vae = Block(), Block()
    lora.inject_lora(unet, ["conv1", "to_q"], 2)
    lora.inject_lora(vae, ["conv1"], 2)
    stored = {name: {k: torch.randn_like(v) for k, v in lora.lora_state_dict(m).items() if "lora_" in k}
              for name, m in (("unet", unet), ("vae", vae))}
    fields = {"unet_rank": 2, "unet_lora_target_modules": ["conv1", "to_q"], "vae_rank": 2,
              "vae_lora_target_modules": ["conv1"], "lora_alpha": lora.DEFAULT_ALPHA}
    lora.write_flowsr_checkpoint(tmp_path / "a.safetensors", fields, stored["unet"], stored["vae"])
    lora.load_flowsr_lora(tmp_path / "a.safetensors", unet, vae)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in stored["unet"].items())
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in stored["vae"].items())
    lora.write_flowsr_checkpoint(tmp_path / "b.safetensors", dict(fields, lora_alpha=16), stored["unet"], stored["vae"])
    with pytest.raises(WeightsError, match=r"b\.safetensors: lora_alpha 16; training goes on from alpha 8 only"):
        lora.load_flowsr_lora(tmp_path / "b.safetensors", unet, vae)
    with_plain = dict(stored["unet"], **{"conv1.base_layer.weight": torch.zeros(6, 6, 3, 3)})
    lora.write_flowsr_checkpoint(tmp_path / "c.safetensors", fields, with_plain, stored["vae"])
    with pytest.raises(WeightsError, match=r"c\.safetensors: 1 plain \(non-LoRA\) weight\(s\): "
                                           r"unet\.conv1\.base_layer\.weight; training goes on from LoRA-only"):
        lora.load_flowsr_lora(tmp_path / "c.safetensors", unet, vae)


def test_adapters_share_the_base_and_one_is_active_per_call():
    """Teacher / target adapters over one base (stage 2, issue 10): a view computes with its own LoRA only, the
    model stays the student, and only the student's adapter is exported, trained and counted."""
    model = Block()
    lora.inject_lora(model, ["conv1", "to_q"], 2)
    lora.mark_only_lora_trainable(model)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_()
    lora.add_adapter(model, "teacher")
    teacher = lora.AdapterView(model, "teacher")
    x = torch.randn(2, 3, 5, 5)
    student_out = model(x)
    assert torch.equal(teacher(x), student_out)  # a copy of the student's LoRA at first
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    alone = copy.deepcopy(model)  # the teacher's weights as the only adapter of a separate model
    lora.load_lora_state_dict(alone, {k.replace(".teacher.", ".default."): v for k, v in teacher.state_dict().items()},
                              "teacher")
    out = teacher(x)
    assert torch.equal(out, alone(x)) and not torch.equal(out, student_out) and not out.requires_grad
    assert torch.equal(model(x), student_out)  # the student is active again after the call
    size = lambda params: sum(p.numel() for p in params)
    assert size(model.parameters()) == size(Block().parameters()) + 2 * size(teacher.parameters())  # one base

    lora_keys = {f"{m}.lora_{ab}.default.weight" for m in ("conv1", "attn1.to_q") for ab in "AB"}
    assert set(lora.lora_state_dict(model)) == lora_keys  # the published export: the student only
    assert set(teacher.state_dict()) == {k.replace(".default.", ".teacher.") for k in lora_keys}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_keys
    assert [p.shape for p in teacher.parameters()] == [p.shape for p in lora.lora_parameters(model)]

    saved = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
    teacher.load_state_dict(saved)
    assert torch.equal(teacher(x), out)
    with pytest.raises(ValueError, match=r"adapter 'teacher' does not fit: unknown none; missing conv1\.lora_A"):
        teacher.load_state_dict({k: v for k, v in saved.items() if "conv1.lora_A" not in k})
    with pytest.raises(ValueError, match=r"no LoRA adapter 'target' in conv1, attn1\.to_q"):
        lora.AdapterView(model, "target")(x)
    with pytest.raises(ValueError, match=r"conv1 already has a LoRA adapter 'teacher'"):
        lora.add_adapter(model, "teacher")
