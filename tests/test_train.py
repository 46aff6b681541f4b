"""train.py: the command line, what checkpoints hold, the stage-1 objective, data order, bad input, the LPIPS
and CLIP-IQA terms from weight files, and the sd21 preset end to end on a tiny Stable Diffusion folder (random
weights in the real diffusers layout)."""
import contextlib
import gzip
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lora
import train
from data import HRFolderDataset, load_image, to_model
from degradations import degrade_bicubic
from flow import RectifiedSRFlow
from flowsr import UNET_LORA_TARGETS, FlowSR
from plumbing import training
from plumbing.vgg16 import vgg16_features
from plumbing.weights import read_metadata
from schedulers import sample_times

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three shipped photos, shrunk to 64 x 64 so that loading them costs nothing."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "brick.png", "camera.png"):
        Image.open(os.path.join(ROOT, "photos", "train", name)).convert("RGB").resize((64, 64)).save(folder / name)
    return folder


def args(photos, out, *extra, steps=2):
    return ["--data", str(photos), "--val-data", str(photos), "--out-dir", str(out), "--crop-size", "32",
            "--batch-size", "2", "--max-steps", str(steps), "--num-workers", "0", "--log-every", "1",
            "--val-every", "2", "--ckpt-every", "1", *extra]


def run(argv):
    """train.main in this process; returns (model or SystemExit, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            result = train.main(argv)
        except SystemExit as e:
            result = e
    return result, out.getvalue()


def one_line_error(result, *words):
    assert isinstance(result, SystemExit) and isinstance(result.code, str), result
    assert result.code.startswith("error: ") and "\n" not in result.code, result.code
    for word in words:
        assert word in result.code, result.code


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """Both stages of the tiny preset, 2 steps each: (model, stdout, out dir)."""
    out = tmp_path_factory.mktemp("run")
    model, stdout = run(args(photos, out))
    assert isinstance(model, FlowSR), model
    return model, stdout, out


# ---- command line and checkpoints -----------------------------------------------------------------------

def test_command_line_help_and_errors(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "train.py")]
    shown = subprocess.run(command + ["-h"], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and "--max-steps" in shown.stdout and "--resume" in shown.stdout
    (tmp_path / "empty").mkdir()
    failed = subprocess.run(command + ["--data", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [f"error: {tmp_path / 'empty'}: no image files "
                                          "(.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, .gif)"]
    with pytest.raises(SystemExit) as unknown, contextlib.redirect_stderr(io.StringIO()) as stderr:
        train.main(["--no-such-flag", "3"])
    assert unknown.value.code == 2 and "unrecognized arguments: --no-such-flag" in stderr.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["--grad-accum", "0"], "--grad-accum 0: must be >= 1"),
    (["--p-fast", "1.5"], "--p-fast 1.5: must be in [0, 1]"),  # would fail only at stage 2's first step
    (["--ema-decay", "-0.1"], "--ema-decay -0.1: must be in [0, 1]"),
    (["--slow-steps", "0"], "--slow-steps 0: must be >= 1"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--vae-lora-rank", "-1"], "--vae-lora-rank -1: must be >= 0"),
    (["--clip", "/no/such/clip"], "--clip /no/such/clip: no such file or folder"),  # not a silently dropped loss
    (["--lpips-vgg", "/no/vgg.pth"], "--lpips-vgg /no/vgg.pth: no such file or folder"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be >= 0"),  # clip_grad_norm_ would flip the gradients
    (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["--zoom-out", "0.5"], "--zoom-out 0.5: must be >= 1"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: must be in [0, {2 ** 63 - 1}]"),
])
def test_values_out_of_range_stop_before_training(argv, message):
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as stderr:
        train.main(argv)
    assert stop.value.code == 2 and stderr.getvalue().splitlines()[-1].endswith(f": error: {message}")


@pytest.mark.parametrize("device, message", [("foo", "not a device"), ("mps", "not available on this machine")])
def test_a_device_that_cannot_run_is_one_line(photos, tmp_path, device, message):
    result, _ = run(args(photos, tmp_path, "--device", device))
    one_line_error(result, f"--device {device}: {message}")


def test_validation_crops_are_exact_and_degraded_like_the_run(tmp_path):
    from plumbing.validation import validation_batch
    photo = load_image(os.path.join(ROOT, "photos", "train", "brick.png"))[0]  # (3, 512, 512)
    Image.fromarray((photo.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "a.png")
    x_hr, x_lr = validation_batch(tmp_path, 72, "bicubic", print)  # 72: not a multiple of 16
    top, left = (512 - 72) // 2, (512 - 72) // 2
    assert x_hr.shape == (1, 3, 72, 72) and torch.allclose(x_hr[0], photo[:, top:top + 72, left:left + 72] * 2 - 1,
                                                            atol=1e-6)
    assert torch.allclose(x_lr[0], degrade_bicubic((x_hr[0] + 1) / 2, 4) * 2 - 1, atol=1e-6)


def test_config_is_printed_at_start_and_stored_in_every_checkpoint(trained):
    _, stdout, out = trained
    lines = stdout.splitlines()
    assert lines[0] == "config:" and "  max_steps          = 2" in lines and "  crop_size          = 32" in lines
    assert lines[-1] == f"saved: {out / 'stage2.safetensors'}"
    expected = train.parse(train.TrainConfig, args("", out))
    training.setup(expected, train.PRESETS)  # the preset's defaults filled in, as printed
    for stage in (1, 2):
        meta = json.loads(read_metadata(out / f"stage{stage}.safetensors")["flowsr_model"])
        assert meta["stage"] == stage and meta["step"] == 2
        assert {k: v for k, v in meta["train_config"].items() if k not in ("data", "val_data")} == \
            {k: v for k, v in vars(expected).items() if k not in ("data", "val_data")}
        state = torch.load(out / f"stage{stage}_state.pt", weights_only=True)
        assert json.loads(state["config"]) == meta["train_config"]


def test_checkpoint_rebuilds_the_trained_model(trained):
    model, _, out = trained
    rebuilt = FlowSR.load(out / "stage2.safetensors")
    z, t = torch.randn(2, 48, 8, 8), torch.tensor([1000.0, 250.0])
    with torch.no_grad():
        assert torch.equal(rebuilt(z, t), model.eval()(z, t))
    assert rebuilt.upsample == model.upsample and len(rebuilt.state_dict()) == len(model.state_dict())


def test_stage1_fits_the_texture_predictor_without_changing_the_flow(trained, photos, tmp_path):
    """Stage 1 trains texture.py's predictor beside the flow, each clipped on its own: the flow's weights are those
    of a run without a predictor, bit for bit. Stage 2 keeps the predictor as stage 1 left it, and a stage 2 whose
    --texture differs from its stage-1 model's is refused."""
    _, _, out = trained
    clipped = ("--stage", "1", "--grad-clip", "1e-4")  # every step clipped: a shared norm would show
    with_texture, _ = run(args(photos, tmp_path / "a", *clipped, steps=3))
    plain, _ = run(args(photos, tmp_path / "b", *clipped, "--texture", "0", steps=3))
    assert plain.texture is None and with_texture.texture is not None
    flow = {k: v for k, v in with_texture.state_dict().items() if not k.startswith("texture.")}
    assert flow.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in flow.items())
    torch.manual_seed(0)
    fresh = FlowSR.tiny()  # the initial weights of the run (seed 0)
    assert not torch.equal(fresh.texture.net[0].weight, with_texture.texture.net[0].weight)  # it trained
    distilled, stage1 = FlowSR.load(out / "stage2.safetensors"), FlowSR.load(out / "stage1.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(distilled.texture.parameters(), stage1.texture.parameters()))
    result, _ = run(args(photos, tmp_path / "s2", "--stage", "2", "--init", str(out / "stage1.safetensors"),
                         "--texture", "0"))
    one_line_error(result, "texture")


# ---- the method ------------------------------------------------------------------------------------------

def test_stage1_loss_falls_on_a_fixed_batch():
    """60 AdamW steps on one batch at fixed times: the loss falls 4x, and at t = 1 (one-step SR) the decoded
    endpoint beats plain bicubic up-sampling (v = 0) by 2x in squared error."""
    crops = []
    for name in ("astronaut.png", "camera.png"):
        image = load_image(os.path.join(ROOT, "photos", "train", name))[0]
        side = min(image.shape[1:])
        crops.append(F.interpolate(image[None, :, :side, :side], size=32, mode="bicubic", antialias=True)[0])
    hr01 = torch.stack(crops).clamp(0, 1)  # (2, 3, 32, 32)
    hr, lr = to_model(hr01), to_model(torch.stack([degrade_bicubic(x, 4) for x in hr01]))
    model, t = FlowSR.tiny(), torch.tensor([1.0, 0.5])
    method = RectifiedSRFlow(model.ae)
    with torch.no_grad():
        z_H, z_L = model.encode(hr), model.encode(model.upsample_lr(lr))
    bicubic_error = (model.upsample_lr(lr)[0] - hr[0]).pow(2).mean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(60):
        loss, per_sample, _ = method.loss(model, hr, z_H, z_L, t, None)
        history.append((loss.item(), per_sample[0].item()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[-1][0] < 0.25 * history[0][0]
    assert history[-1][1] < 0.5 * bicubic_error


def test_batches_and_time_draws_depend_only_on_seed_step_and_rank(photos):
    dataset = HRFolderDataset(photos, 32, 4, "realesrgan", seed=0, length=4 * 2 * 2)

    def batches(start, rank=0, world=1, workers=0):
        return [(b["hr"], b["lr"]) for b in training.batches(dataset, 2, start, 4, rank, world, workers)]
    full = batches(0)
    assert len(full) == 4 and full[0][0].shape == (2, 3, 32, 32) and full[0][1].shape == (2, 3, 8, 8)
    assert all(torch.equal(a, b) for x, y in zip(full[2:], batches(2)) for a, b in zip(x, y))  # resumed at step 2
    assert all(torch.equal(a, b) for x, y in zip(full, batches(0, workers=2)) for a, b in zip(x, y))
    rank0, rank1 = batches(0, 0, 2), batches(0, 1, 2)  # two ranks split the one item sequence
    assert torch.equal(rank0[0][0], full[0][0]) and torch.equal(rank1[0][0], full[1][0])
    assert torch.equal(rank0[1][1], full[2][1]) and torch.equal(rank1[1][1], full[3][1])

    def times(seed=0, stage=1, step=3, rank=0):
        return sample_times(64, 1000, training.step_generator(seed, stage, step, rank))
    assert torch.equal(times(), times())
    for change in (dict(seed=1), dict(stage=2), dict(step=4), dict(rank=1)):
        assert not torch.equal(times(**change), times())


# ---- bad input -------------------------------------------------------------------------------------------

def test_data_folder_errors_and_corrupt_files(photos, tmp_path):
    empty, broken, mixed = tmp_path / "empty", tmp_path / "broken", tmp_path / "mixed"
    for folder in (empty, broken, mixed):
        folder.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "b.jpg").write_bytes(b"")
    for name in os.listdir(photos):
        (mixed / name).write_bytes((photos / name).read_bytes())
    (mixed / "truncated.png").write_bytes((photos / "brick.png").read_bytes()[:200])

    result, _ = run(args(empty, tmp_path / "out"))
    one_line_error(result, str(empty), "no image files")
    result, _ = run(args(tmp_path / "missing", tmp_path / "out"))
    one_line_error(result, str(tmp_path / "missing"), "no such folder")
    result, stdout = run(args(broken, tmp_path / "out"))
    one_line_error(result, str(broken), "none of its 2 image files is readable")
    assert [line.split(":")[0] for line in stdout.splitlines() if "skipping" in line] == ["warning"] * 2
    model, stdout = run(args(mixed, tmp_path / "out", "--max-steps", "1", "--val-data", str(broken)))  # 2 stages
    assert isinstance(model, FlowSR)
    for path in (mixed / "truncated.png", broken / "a.png", broken / "b.jpg"):  # training data, validation
        warned = [line for line in stdout.splitlines() if str(path) in line]
        assert len(warned) == 1 and warned[0].startswith(f"warning: skipping {path}: "), stdout
    assert f"no validation grids: no readable photos in {broken}" in stdout


def test_flags_that_cannot_work_stop_before_anything_is_written(photos, tmp_path):
    """--init beside a stage 1 that trains (stage 2 would distil --init, not it), a crop the degradation cannot
    take, a mistyped --val-data, sample.py's results in --data: one line each, and no --out-dir is made."""
    out = tmp_path / "out"
    for extra, words in ((["--init", str(tmp_path / "x.safetensors")], ["--init is the stage-1 model for --stage 2"]),
                         (["--stage", "1", "--init", "x.safetensors"], ["--init"]),
                         (["--crop-size", "8"], ["crop size 8 for the mixed degradation", "at least 16"]),
                         (["--val-data", str(tmp_path / "typo")], [f"--val-data {tmp_path / 'typo'}: no such folder"])):
        result, _ = run(args(photos, out, *extra))
        one_line_error(result, *words)
        assert not out.exists(), extra
    (tmp_path / "file").write_text("")
    result, _ = run(args(photos, tmp_path / "file"))
    one_line_error(result, f"--out-dir {tmp_path / 'file'}: a file, not a folder")
    mixed = tmp_path / "mine"
    mixed.mkdir()
    for name in ("brick.png", "camera.png"):
        (mixed / name).write_bytes((photos / name).read_bytes())
    (mixed / "brick_x4.png").write_bytes((photos / "brick.png").read_bytes())  # what sample.py mine/ writes
    (mixed / "brick_x4_compare.png").write_bytes((photos / "brick.png").read_bytes())
    model, stdout = run(args(mixed, out, "--stage", "1", "--max-steps", "1"))
    assert isinstance(model, FlowSR)
    assert f"warning: {mixed}: 2 results of sample.py (_x4.png, _x4_compare.png) are no training photos; left out" \
        in stdout
    with pytest.warns(UserWarning, match="2 results of sample.py"):
        assert [os.path.basename(p) for p in HRFolderDataset(mixed, 32).paths] == ["brick.png", "camera.png"]
    only = tmp_path / "only"
    only.mkdir()
    (only / "a_x4.png").write_bytes((photos / "brick.png").read_bytes())
    result, _ = run(args(only, tmp_path / "out2"))
    one_line_error(result, f"{only}: every image in it (1) is named as sample.py's results")


def test_default_photo_folders_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train.parse(train.TrainConfig, [])
    assert os.path.isdir(cfg.data) and os.path.isdir(cfg.val_data) and os.path.isabs(cfg.val_data)


def test_resume_refuses_a_checkpoint_of_another_model(photos, tmp_path, monkeypatch):
    model, stdout = run(args(photos, tmp_path, "--stage", "1", "--max-steps", "1", "--resume"))
    assert isinstance(model, FlowSR)  # nothing to resume: said, and the stage starts over
    assert f"note: --resume: no {tmp_path / 'stage1_state.pt'}; stage 1 starts at step 0" in stdout
    result, _ = run(args(photos, tmp_path, "--stage", "1", "--resume", "--upsample", "bilinear"))
    one_line_error(result, str(tmp_path / "stage1_state.pt"), "does not fit this run",
                   "model.upsample 'bicubic' in the checkpoint, 'bilinear' here")
    saved = torch.load(tmp_path / "stage1_state.pt", weights_only=True)
    learning_rates = []

    def recording_step(optimizer, *rest, **kwargs):
        learning_rates.extend(group["lr"] for group in optimizer.param_groups)
        return training.synced_step(optimizer, *rest, **kwargs)
    monkeypatch.setattr(train, "synced_step", recording_step)
    result, stdout = run(args(photos, tmp_path, "--stage", "1", "--resume", "--max-steps", "2", "--lr", "1e-4"))
    assert isinstance(result, FlowSR) and "resumed stage 1 at step 1" in stdout
    assert "note: resuming with changed settings: max_steps 1 -> 2, lr 0.0002 -> 0.0001" in stdout
    assert learning_rates == [1e-4, 1e-3]  # the flow's changed rate is used, not the one saved (then the texture's)
    monkeypatch.undo()
    del saved["optimizer"]
    torch.save(saved, tmp_path / "stage1_state.pt")
    result, _ = run(args(photos, tmp_path, "--stage", "1", "--resume"))
    one_line_error(result, str(tmp_path / "stage1_state.pt"), "not a readable training state (no optimizer)")
    (tmp_path / "stage1_state.pt").write_bytes(b"PK\x03\x04 damaged")
    result, _ = run(args(photos, tmp_path, "--stage", "1", "--resume"))
    one_line_error(result, str(tmp_path / "stage1_state.pt"), "not a readable training state")
    result, _ = run(args(photos, tmp_path / "fresh", "--stage", "2"))
    one_line_error(result, str(tmp_path / "fresh" / "stage1.safetensors"), "no stage-1 checkpoint")
    # stage 2 goes on from the stage-1 model: flags that describe another one are refused, not ignored
    result, _ = run(args(photos, tmp_path / "s2", "--stage", "2", "--init", str(tmp_path / "stage1.safetensors"),
                         "--flat-gate", "0"))
    one_line_error(result, str(tmp_path / "stage1.safetensors"), "does not fit this run",
                   "flat_gate 0.02 in the checkpoint, 0.0 here")


# ---- the sd21 preset on a tiny Stable Diffusion folder ---------------------------------------------------

def write_tokenizer(folder):
    """open_clip's BPE as transformers' CLIP tokenizer files, padded with "!" as in SD 2.x (see test_clip.py)."""
    from clip import bytes_to_unicode
    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    lines = gzip.open(os.path.join(package, "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!", "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    """unet/ vae/ text_encoder/ tokenizer/ like stabilityai/stable-diffusion-2-1-base, at toy sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    root = tmp_path_factory.mktemp("sd21_tiny")
    torch.manual_seed(0)
    UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                         attention_head_dim=4, use_linear_projection=True, sample_size=16,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu")
                  ).save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    return root


def test_sd21_preset_end_to_end(sd_base, photos, tmp_path):
    sd_args = args(photos, tmp_path / "sd", "--preset", "sd21", "--base", str(sd_base), "--lora-rank", "2",
                   "--vae-lora-rank", "2")
    model, stdout = run(sd_args)
    assert isinstance(model, FlowSR), model
    assert stdout.splitlines()[-1] == f"saved: {tmp_path / 'sd' / 'stage2.safetensors'}"
    for stage in (1, 2):
        path = tmp_path / "sd" / f"stage{stage}.safetensors"
        fields, unet_sd, vae_sd = lora.read_flowsr_checkpoint(path)  # the published layout
        assert fields["unet_rank"] == fields["vae_rank"] == 2
        assert fields["unet_lora_target_modules"] == UNET_LORA_TARGETS
        assert unet_sd and vae_sd and all(".lora_A.default." in k or ".lora_B.default." in k
                                          for k in [*unet_sd, *vae_sd])
        assert json.loads(read_metadata(path)["flowsr_model"])["train_config"]["preset"] == "sd21"

    # needs flowsr.check_sd2_base to accept this toy base's cross-attention width (see the report)
    rebuilt = FlowSR.load(tmp_path / "sd" / "stage2.safetensors", base=str(sd_base))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        model.eval()
        z = model.encode(x)
        assert torch.allclose(rebuilt.encode(x), z, atol=1e-5)  # the VAE encoder's LoRA
        assert torch.allclose(rebuilt(z, torch.tensor([1000.0])), model(z, torch.tensor([1000.0])), atol=1e-5)

    result, _ = run(sd_args + ["--resume", "--lora-rank", "3"])
    one_line_error(result, "stage1_state.pt does not fit this run", "lora_rank 2 in the checkpoint, 3 here")
    result, _ = run(sd_args + ["--stage", "2", "--out-dir", str(tmp_path / "sd2"), "--upsample", "bilinear",
                               "--init", str(tmp_path / "sd" / "stage1.safetensors")])
    one_line_error(result, "stage1.safetensors does not fit this run", "upsample 'bicubic' in the checkpoint, "
                   "'bilinear' here")
    tiny, _ = run(args(photos, tmp_path / "tiny", "--stage", "1", "--max-steps", "1"))
    assert isinstance(tiny, FlowSR)
    result, _ = run(args(photos, tmp_path / "tiny", "--stage", "1", "--resume", "--preset", "sd21",
                         "--base", str(sd_base)))
    one_line_error(result, "preset 'tiny' in the checkpoint, 'sd21' here")


def test_tiny_preset_trains_with_lpips_and_clip_iqa_files(photos, tmp_path):
    """The paper's perceptual terms (SPEC 5) on the tiny preset: with the files given, stage 1 logs LPIPS, stage 2
    the HR LPIPS and CLIP-IQA. Random weights in the real formats: the lpips package's VGG layout with its real
    v0.1 heads, and a tiny transformers CLIP folder."""
    import lpips as lpips_package
    from test_losses import save_tiny_clip_folder
    torch.manual_seed(0)
    trunk = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}  # torchvision's layout
    torch.save(trunk, tmp_path / "vgg16-397923af.pth")
    heads = os.path.join(os.path.dirname(lpips_package.__file__), "weights", "v0.1", "vgg.pth")
    save_tiny_clip_folder(tmp_path / "clip")
    out = tmp_path / "run"
    model, stdout = run(args(photos, out, "--lpips-vgg", str(tmp_path / "vgg16-397923af.pth"), "--lpips-heads", heads,
                             "--clip", str(tmp_path / "clip")))
    assert isinstance(model, FlowSR), stdout
    with open(out / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert {r["stage"] for r in records} == {1, 2}, records
    cfg = json.loads(read_metadata(out / "stage2.safetensors")["flowsr_model"])["train_config"]
    for record in records:
        terms = {"lpips"} if record["stage"] == 1 else {"hr_lpips", "iqa"}
        assert terms <= set(record) and all(math.isfinite(record[term]) for term in terms), record
        # each step's loss is the weighted sum of its logged terms: a term that is logged but not trained on fails
        if record["stage"] == 1:
            expected = record["pixel_mse"] + cfg["lpips_weight"] * record["lpips"]
        else:
            expected = (record["consistency"] + cfg["hr_reg_weight"] * (record["hr_mse"] + cfg["lpips_weight"]
                        * record["hr_lpips"]) + cfg["gan_weight"] * record["gan_g"] + cfg["iqa_weight"] * record["iqa"])
        assert record["loss"] == pytest.approx(expected, rel=1e-5), record
