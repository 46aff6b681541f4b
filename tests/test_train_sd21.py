"""train.py at the sd21 preset (LoRA on SD 2.1-base): gradient parity with diffusers + PEFT for one loss of each
stage, stage 2 on one copy of the base (teacher and EMA target as LoRA adapters), exact resume of that
LoRA-only state, and the exported stage-2 file upscaling through sample.py.

Everything runs on a tiny SD folder in the real diffusers layout (random weights, see test_flowsr.py); the
gradient parity also runs at the full SD 2.1-base size with FLOWSR_FULLSIZE=1 (about 9 GB of memory).
"""
import itertools
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import sample
import train
from consistency import ConsistencyFlowDistillation
from data import to_model
from degradations import degrade_bicubic
from flow import RectifiedSRFlow
from flowsr import UNET_LORA_TARGETS, FlowSR, super_resolve, vae_encoder_targets
from plumbing import training
from plumbing.training import LogWindow
from test_flowsr import build_sd_folder
from test_train_reliability import args, assert_same_run, photos, run, signal_at  # noqa: F401 (fixture)
from test_unet import SD21_BASE

SD21_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FULLSIZE = pytest.mark.skipif(os.environ.get("FLOWSR_FULLSIZE") != "1",
                              reason="full-size SD 2.1-base training parity: FLOWSR_FULLSIZE=1")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd_folder(str(tmp_path_factory.mktemp("sd21_tiny")))


def fullsize_folder(root):
    """unet/ and vae/ of SD 2.1-base size with random weights (the context is given, so no text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(0)
    UNet2DConditionModel(**SD21_BASE).save_pretrained(os.path.join(root, "unet"))
    AutoencoderKL(**SD21_VAE).save_pretrained(os.path.join(root, "vae"))
    return str(root)


# ---- gradient parity with diffusers + PEFT ----------------------------------------------------------------

class DiffusersAE:
    """A diffusers AutoencoderKL with the decode() / scaling_factor interface that the objectives use."""

    def __init__(self, vae):
        self.vae, self.scaling_factor = vae, vae.config.scaling_factor

    def decode(self, z):
        return self.vae.decode(z).sample


def peft_adapters(model, adapters, targets, rank):
    """PEFT LoRA adapters on a diffusers model, their weights copied from ours ({adapter: PEFT state dict})."""
    from peft import LoraConfig, inject_adapter_in_model
    for name in adapters:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=lora.DEFAULT_ALPHA, target_modules=targets), model,
                                adapter_name=name)
    loaded = {k: v for state in adapters.values() for k, v in state.items()}
    assert model.load_state_dict(loaded, strict=False).unexpected_keys == []
    assert {k for k in model.state_dict() if ".lora_" in k} == set(loaded)
    set_peft_adapter(model, "default")
    return model


def set_peft_adapter(model, name):
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(name)


def parity_case(folder, context, rank, lora_std, adapters=("default",)):
    """(ours, reference unet, reference vae, reference vae without LoRA): our FlowSR with LoRA injected as
    train.py does, and diffusers + PEFT with the same weights; random LoRA (B too) and random extra adapters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    ours = FlowSR.sd21(folder, context=context)
    lora.inject_lora(ours.unet, UNET_LORA_TARGETS, rank)
    lora.inject_lora(ours.ae, vae_encoder_targets(ours.ae), rank)
    lora.mark_only_lora_trainable(ours)
    with torch.no_grad():
        for p in lora.lora_parameters(ours):
            p.normal_(0, lora_std)
    for name in adapters[1:]:
        lora.add_adapter(ours, name)
        with torch.no_grad():
            for p in lora.AdapterView(ours, name).parameters():
                p.add_(lora_std * torch.randn_like(p))
    views = {name: lora.AdapterView(ours, name) for name in adapters}
    unet_states = {name: {k.removeprefix("unet."): v.clone() for k, v in view.state_dict().items()
                          if k.startswith("unet.")} for name, view in views.items()}
    vae_state = {k.removeprefix("ae."): v.clone() for k, v in views["default"].state_dict().items()
                 if k.startswith("ae.")}
    unet = peft_adapters(UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")), unet_states,
                         UNET_LORA_TARGETS, rank)
    plain_vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
    vae = peft_adapters(AutoencoderKL.from_pretrained(os.path.join(folder, "vae")), {"default": vae_state},
                        vae_encoder_targets(ours.ae), rank)
    return ours, unet, vae, plain_vae


def reference_net(unet, context, adapter="default"):
    """v(z, 1000 t) of the diffusers UNet with PEFT adapter `adapter`: the student's, or a frozen one without
    gradients (the teacher's, the target's)."""
    def net(z, timesteps, _context):
        c = context.expand(len(z), -1, -1)
        if adapter == "default":
            return unet(z, timesteps, encoder_hidden_states=c).sample
        with torch.no_grad():
            set_peft_adapter(unet, adapter)
            try:
                return unet(z, timesteps, encoder_hidden_states=c).sample
            finally:
                set_peft_adapter(unet, "default")
    return net


def reference_latents(vae, plain_vae, up, x_hr):
    """z_H from the encoder without LoRA, z_L through the LoRA (both posterior means, times s)."""
    s = vae.config.scaling_factor
    with torch.no_grad():
        z_H = s * plain_vae.encode(x_hr).latent_dist.mean
    return z_H, s * vae.encode(up).latent_dist.mean


def inputs(crop, batch):
    """x_HR crops of a shipped photo in [-1, 1] and their bicubic x4 LR."""
    photo = np.asarray(Image.open(os.path.join(os.path.dirname(__file__), "..", "photos", "train", "astronaut.png"))
                       .convert("RGB").resize((2 * crop, 2 * crop)))
    image = torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255
    hr01 = torch.stack([image[:, :crop, :crop], image[:, crop:, crop:]][:batch])
    return to_model(hr01), to_model(torch.stack([degrade_bicubic(x, 4) for x in hr01]))


def gradient_errors(ours, vae, unet):
    """{PEFT key: ||g_ours - g_ref|| / ||g_ref||} for every trained LoRA weight of ours."""
    reference = {**{f"unet.{k}": p.grad for k, p in unet.named_parameters() if ".lora_" in k},
                 **{f"ae.{k}": p.grad for k, p in vae.named_parameters() if ".lora_" in k}}
    errors = {}
    for key, p in ours.named_parameters():
        if p.requires_grad:
            expected = reference[key]
            assert p.grad is not None and expected is not None and expected.norm() > 0, key
            errors[key] = ((p.grad - expected).norm() / expected.norm()).item()
    return errors


def check_parity(errors, label):
    worst = max(errors, key=errors.get)
    print(f"{label}: {len(errors)} LoRA gradients, worst relative error {errors[worst]:.2e} ({worst}), "
          f"median {np.median(list(errors.values())):.2e}")
    assert errors[worst] <= 1e-4, (worst, errors[worst])


def stage1_parity(folder, context, crop, batch, rank, lora_std):
    """One stage-1 loss (SPEC 2) through ours and diffusers + PEFT; relative errors of every LoRA gradient."""
    ours, unet, vae, plain_vae = parity_case(folder, context, rank, lora_std)
    x_hr, x_lr = inputs(crop, batch)
    t = torch.tensor([0.8, 0.3])[:batch]
    z_H, z_L = train.latents(ours, x_hr, x_lr)
    RectifiedSRFlow(ours.ae).loss(ours, x_hr, z_H, z_L, t, None)[0].backward()
    z_H, z_L = reference_latents(vae, plain_vae, ours.upsample_lr(x_lr), x_hr)
    RectifiedSRFlow(DiffusersAE(vae)).loss(reference_net(unet, context), x_hr, z_H, z_L, t, None)[0].backward()
    return gradient_errors(ours, vae, unet)


def stage2_parity(folder, context, crop, batch, rank, lora_std):
    """One stage-2 loss (SPEC 3) with the teacher and the target as adapters of ours, and as PEFT adapters of the
    reference; the student's encoder LoRA trains (--stage2-encoder train), so its gradients are compared too."""
    ours, unet, vae, plain_vae = parity_case(folder, context, rank, lora_std, ("default", "teacher", "target"))
    x_hr, x_lr = inputs(crop, batch)
    t_n, t_prev = torch.tensor([0.75, 0.25])[:batch], torch.tensor([0.5, 0.0])[:batch]
    z_H, z_L = train.latents(ours, x_hr, x_lr)
    ConsistencyFlowDistillation(ours.ae).loss(ours, lora.AdapterView(ours, "teacher"), lora.AdapterView(ours, "target"),
                                              x_hr, z_H, z_L, t_n, t_prev, None)[0].backward()
    z_H, z_L = reference_latents(vae, plain_vae, ours.upsample_lr(x_lr), x_hr)
    nets = [reference_net(unet, context, name) for name in ("default", "teacher", "target")]
    ConsistencyFlowDistillation(DiffusersAE(vae)).loss(*nets, x_hr, z_H, z_L, t_n, t_prev, None)[0].backward()
    return gradient_errors(ours, vae, unet)


PEFT_SECOND_ADAPTER = "ignore:Already found a `peft_config`:UserWarning"  # PEFT's note on several adapters


@pytest.mark.filterwarnings(PEFT_SECOND_ADAPTER)
@pytest.mark.parametrize("parity", [stage1_parity, stage2_parity])
def test_lora_gradients_match_diffusers_peft(sd_folder, parity):
    context = FlowSR.sd21(sd_folder).context
    errors = parity(sd_folder, context, crop=32, batch=2, rank=4, lora_std=0.1)
    assert any(k.startswith("ae.encoder.") for k in errors) and any(".attn2.to_k." in k for k in errors)
    check_parity(errors, parity.__name__)


@FULLSIZE
@pytest.mark.filterwarnings(PEFT_SECOND_ADAPTER)
@pytest.mark.parametrize("parity", [stage1_parity, stage2_parity])
def test_lora_gradients_match_diffusers_peft_full_size(tmp_path, parity):
    folder = fullsize_folder(tmp_path)
    # 128 px: the mid block's self-attention sees 2 x 2 tokens. Over one token (64 px) softmax is constant, so
    # the gradients of its to_q / to_k LoRA are zero up to rounding, and their relative error is noise.
    errors = parity(folder, torch.randn(1, 77, 1024), crop=128, batch=1, rank=4, lora_std=1e-3)
    check_parity(errors, f"full size, {parity.__name__}")


# ---- stage 2 on one copy of the base ----------------------------------------------------------------------

def sd21_args(photos, out, folder, *extra):
    return args(photos, out, "--preset", "sd21", "--base", folder, "--lora-rank", "2", "--vae-lora-rank", "2", *extra)


@pytest.fixture(scope="module")
def stage1_dir(sd_folder, photos, tmp_path_factory):
    """An out dir holding a one-step stage-1 run of the sd21 preset."""
    out = tmp_path_factory.mktemp("stage1")
    model, _ = run(sd21_args(photos, out, sd_folder, "--stage", "1", "--max-steps", "1"))
    assert isinstance(model, FlowSR), model
    return out


def build_stage2(photos, out, folder, encoder):
    cfg = train.parse(train.TrainConfig, sd21_args(photos, out, folder, "--stage2-encoder", encoder))
    ranks = training.setup(cfg, train.PRESETS)
    return cfg, ranks, train.build_stage2(cfg, ranks.device, print)


def test_stage2_holds_one_base_and_lora_only_state(sd_folder, photos, stage1_dir):
    cfg, ranks, s = build_stage2(photos, stage1_dir, sd_folder, "frozen")
    base = sum(p.numel() for p in FlowSR.sd21(sd_folder, context=s.model.context).parameters())
    lora_size = sum(p.numel() for p in lora.lora_parameters(s.model))
    assert sum(p.numel() for p in s.model.parameters()) == base + 3 * lora_size  # student, teacher, target
    assert isinstance(s.teacher, lora.AdapterView) and isinstance(s.target, lora.AdapterView)
    assert not any(p.requires_grad for p in lora.lora_parameters(s.model.ae))  # the encoder's LoRA is frozen
    assert all(p.requires_grad for p in lora.lora_parameters(s.model.unet))

    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        v = s.model(z, torch.tensor([1000.0]))
    assert torch.equal(s.teacher(z, torch.tensor([1000.0])), v)  # all three start as the stage-1 LoRA
    with torch.no_grad():
        for p in lora.lora_parameters(s.model):
            p.add_(0.1)
    train.update_ema(s.target, s.online, 0.75)
    for p_target, p_student in zip(s.target.parameters(), lora.lora_parameters(s.model), strict=True):
        torch.testing.assert_close(p_target, p_student - 0.075)  # 0.75 W + 0.25 (W + 0.1) = (W + 0.1) - 0.075
    assert torch.equal(s.teacher(z, torch.tensor([1000.0])), v)  # the teacher stays frozen

    state = train.Checkpoints(cfg, s, ranks).state(0, LogWindow())
    assert state["model"] and all(".lora_" in k and ".default." in k for k in state["model"])
    assert state["target"] and all(".target." in k for k in state["target"])
    assert "teacher" not in state and len(state["teacher_digest"]) == 16  # rebuilt from the stage-1 file it names


def test_teacher_runs_on_the_stage1_encoders_latent(sd_folder, photos, stage1_dir, monkeypatch):
    """--stage2-encoder train-teacher-stage1: the student's encoder trains, the teacher gets the stage-1 one's z_L."""
    cfg, ranks, s = build_stage2(photos, stage1_dir, sd_folder, "train-teacher-stage1")
    assert all(p.requires_grad for p in lora.lora_parameters(s.model.ae))
    with torch.no_grad():
        for p in lora.lora_parameters(s.model.ae):
            p.add_(0.05)  # as if the student's encoder had trained for a while
    calls, loss = [], s.objective.loss
    monkeypatch.setattr(s.objective, "loss", lambda *a: calls.append(a) or loss(*a))
    x_hr, x_lr = inputs(32, 2)
    train.stage2_step(cfg, s, {"hr": x_hr, "lr": x_lr}, torch.Generator().manual_seed(0), ranks)
    (args,) = calls
    z_L, z_L_teacher = args[5], args[-1]
    stage1 = FlowSR.load(stage1_dir / "stage1.safetensors", base=sd_folder)
    with torch.no_grad():
        expected = stage1.encode(stage1.upsample_lr(x_lr))
    torch.testing.assert_close(z_L_teacher, expected, rtol=1e-4, atol=1e-5)
    assert (z_L - expected).abs().max() > 0.01


class Killed(Exception):
    """A process killed with no chance to save: whatever the last checkpoint holds is all that is left."""


def kill_at(monkeypatch, call):
    original, calls = ConsistencyFlowDistillation.loss, itertools.count(1)

    def loss(self, *a, **k):
        if next(calls) == call:
            raise Killed
        return original(self, *a, **k)
    monkeypatch.setattr(ConsistencyFlowDistillation, "loss", loss)


@pytest.fixture(scope="module")
def references(sd_folder, photos, tmp_path_factory):
    """Uninterrupted sd21 runs (both stages, STEPS each), by --stage2-encoder: {encoder: (out dir, student)}."""
    def reference(encoder):
        out = tmp_path_factory.mktemp(f"reference-{encoder}")
        model, _ = run(sd21_args(photos, out, sd_folder, "--stage2-encoder", encoder))
        assert isinstance(model, FlowSR), model
        return out, model
    return {encoder: reference(encoder) for encoder in ("frozen", "train-teacher-stage1")}


@pytest.mark.parametrize("how, encoder", [("sigterm", "frozen"), ("kill", "train-teacher-stage1")])
def test_interrupted_sd21_run_resumes_exactly(sd_folder, photos, references, tmp_path, monkeypatch, how, encoder):
    """Stopped inside stage 2 (SIGTERM saves step 3; a kill leaves the checkpoint of step 2), then --resume: the
    same student LoRA, AdamW moments, EMA-target LoRA, discriminator, log and model files as the uninterrupted run."""
    argv = sd21_args(photos, tmp_path, sd_folder, "--stage2-encoder", encoder)
    if how == "sigterm":
        signal_at(monkeypatch, ConsistencyFlowDistillation, 3, signal.SIGTERM)
        stopped, _ = run(argv)
        assert isinstance(stopped, SystemExit) and stopped.code == 0
    else:
        kill_at(monkeypatch, 3)
        with pytest.raises(Killed):
            run(argv)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "stage2_state.pt", weights_only=True)
    assert saved["step"] == (3 if how == "sigterm" else 2)
    model, stdout = run(argv + ["--resume"])
    assert isinstance(model, FlowSR) and f"resumed stage 2 at step {saved['step']}" in stdout
    assert_same_run(tmp_path, references[encoder][0])

    state = torch.load(tmp_path / "stage2_state.pt", weights_only=True)
    state["target"].pop(next(iter(state["target"])))
    torch.save(state, tmp_path / "stage2_state.pt")
    result, _ = run(argv + ["--resume"])
    assert isinstance(result, SystemExit) and result.code.startswith("error: ") and "\n" not in result.code
    assert "stage2_state.pt: its target does not fit this run (LoRA adapter 'target' does not fit" in result.code


def test_exported_stage2_upscales_through_sample_py(sd_folder, photos, references, tmp_path):
    """stage2.safetensors (published layout, the student's adapter only) + --base: sample.py gives what the
    trained student (unmerged, with its teacher and target adapters beside) gives."""
    out, student = references["frozen"]
    fields, unet_sd, vae_sd = lora.read_flowsr_checkpoint(out / "stage2.safetensors")
    assert unet_sd and vae_sd and all(".default." in k for k in [*unet_sd, *vae_sd])
    lr = np.asarray(Image.open(photos / "brick.png").convert("RGB").resize((16, 16)))
    Image.fromarray(lr).save(tmp_path / "lr.png")
    code = sample.main([str(tmp_path / "lr.png"), "-o", str(tmp_path / "sr.png"), "--base", sd_folder,
                        "--checkpoint", str(out / "stage2.safetensors"), "--dtype", "fp32", "--cache-dir",
                        str(tmp_path / "cache"), "-q"])
    assert code == 0
    written = np.asarray(Image.open(tmp_path / "sr.png")).astype(np.float64)  # (64, 64, 3)
    with torch.no_grad():
        expected = super_resolve(student.eval(), torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255)
    assert np.abs(written - expected[0].permute(1, 2, 0).numpy() * 255).max() <= 1.0  # 8-bit rounding
