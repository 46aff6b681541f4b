"""Speed and peak memory of one-step x4 SR: this project vs a diffusers + PEFT reference.

    python bench/speed.py                                    # fp32 and bf16 rows, the default row, 3 photos end to end
    python bench/speed.py --cases tiled 2048 --dtypes fp32   # add (or redo) rows in the results file
    python bench/speed.py --device cuda --runs 10            # bench/gpu.sh does this on a GPU box

Rows: for each of --dtypes, ours against the reference at that dtype; then ours at sample.py's default dtype
(--dtype auto: bf16 where the hardware computes it natively) against the reference in fp32, which is what a
user of the published code runs; then the same two end to end on --photos photos (a fresh process per round:
imports, loading and every image, as a user waits for them).

Both pipelines run the same random weights at the real Stable Diffusion 2.1-base size (UNet 865.9 M
parameters, VAE 83.7 M), written once to --work-dir in the diffusers folder layout, plus a random rank-4
LoRA in the published FlowSR checkpoint layout (SPEC 8) on the usual targets (flowsr.UNET_LORA_TARGETS and
the VAE encoder). No pretrained weights are needed: speed and memory do not depend on the values.

- ours: sample.super_resolve on flowsr.FlowSR.load(checkpoint, base=...): unet.UNet + vae.AutoencoderKL,
  LoRA merged into the weights at load time.
- reference: diffusers' UNet2DConditionModel / AutoencoderKL with the LoRA injected by PEFT and left
  unmerged, as the published inference code runs it; the published conventions (SPEC 7) written out below:
  bilinear x4, reflect-pad to 64, posterior mean, FlowMatchEulerDiscreteScheduler(shift=3), Gaussian-blended
  latent tiles of 96 / overlap 32 when the latent is larger than 96, diffusers' VAE tiling (enable_tiling)
  in the tiled case, StableSR's wavelet colour fix.

The text context (1, 77, 1024) comes from a tiny random CLIP text encoder: both pipelines compute the
embedding of their fixed prompt once and cache it, so the text encoder is not part of either timing.
Each pipeline runs in its own subprocess, so its RSS high-water mark (ru_maxrss, loading included) is its
own; on CUDA the peak of torch.cuda.max_memory_allocated is reported too. Both processes of a row stay
loaded and their runs alternate, so a change of background load hits both alike. Times: median of --runs,
after one small warm-up run. Results: bench/results/speed_DEVICE.{json,md}, written after every row.
"""
import datetime
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.flags import flag, parse  # noqa: E402
from data import load_image  # noqa: E402
from flowsr import FLOWSR_PROMPT_IDS, SD2_PAD_ID, UNET_LORA_TARGETS, FlowSR, vae_encoder_targets  # noqa: E402
from report import machine, write_results  # noqa: E402  (bench/, the script's own folder)
from sample import DTYPES, SampleConfig, native_bf16, super_resolve  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = [os.path.join(os.path.dirname(HERE), "photos", "train", name)
          for name in ("astronaut.png", "camera.png", "brick.png")]
CASES = {  # key: (title, LR side, Euler steps, pipelines); latents above 96 run in tiles in both pipelines
    "1step": ("128->512, 1 step", 128, 1, ("ours", "reference")),
    "4steps": ("128->512, 4 steps", 128, 4, ("ours", "reference")),
    "tiled": ("256->1024, 1 step, tiled", 256, 1, ("ours", "reference")),
    "256": ("64->256, 1 step", 64, 1, ("ours",)),  # with 1step and tiled: how ours grows with the output size
    "2048": ("512->2048, 1 step, tiled", 512, 1, ("ours",)),
}
PAPER_GPU_SECONDS = 0.14  # FlowSR paper, 128->512, one step, on its GPU
SD21_BASE_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                      attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=64,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
LORA_RANK = 4


@dataclass
class BenchConfig:
    """Time and measure this project's one-step SR against a diffusers + PEFT reference."""
    device: str = flag("cpu", "cpu or cuda")
    dtypes: list = flag(["fp32", "bf16"], "for each, ours against the reference at that dtype (fp32, bf16)")
    default_row: bool = flag(True, "also ours at sample.py's default dtype against the reference in fp32")
    photos: int = flag(3, "end-to-end rows: this many 128-px photos per fresh process, rounds as --runs (0: none)")
    runs: int = flag(3, "timed runs per row and pipeline (the median is reported)")
    runs_tiled: int = flag(0, "timed runs of the tiled case (0: as --runs); the 2048 case runs once")
    cases: list = flag(list(CASES), f"cases to run ({', '.join(CASES)}); tiled and 2048 are slow on a CPU")
    fresh: bool = flag(False, "start a new results file instead of updating the cases of the existing one")
    work_dir: str = flag(os.path.join(tempfile.gettempdir(), "flowsr-bench"), "where the random SD 2.1 weights go (~4 GB)")
    out_dir: str = flag(os.path.join(HERE, "results"), "where the JSON and markdown results go")
    note: str = flag("", "free text saved with the results (e.g. what else ran on the machine)")
    worker: str = flag("", "internal: serve one pipeline's timed runs in this process", choices=("", "ours", "reference"))
    case: str = flag("", "internal: the case a worker runs", choices=("", *CASES))
    dtype: str = flag("fp32", "internal: the dtype a worker runs", choices=("fp32", "bf16"))
    oneshot: int = flag(0, "internal: run this many photos, report and exit (the end-to-end rows)")


# ---- the reference pipeline: diffusers + PEFT, the published inference conventions (SPEC 7) ---------

def read_published_lora(path):
    """{"unet"/"vae": (rank, target modules, state dict)} from a FlowSR LoRA file, as its metadata says."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["flowsr_checkpoint_metadata"])
        parts = {}
        for part in ("unet", "vae"):
            names = meta["tensor_names"][f"{part}_state_dict"]
            parts[part] = (meta["fields"][f"{part}_rank"], meta["fields"][f"{part}_lora_target_modules"],
                           {key: f.get_tensor(stored) for stored, key in names.items()})
    return parts


def load_reference(sd_dir, lora_path, device, dtype):
    """diffusers' UNet and VAE with the checkpoint's LoRA injected by PEFT, unmerged."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae", torch_dtype=dtype)
    for model, (rank, targets, state) in zip((unet, vae), read_published_lora(lora_path).values()):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=8, target_modules=targets), model)
        model.load_state_dict(state, strict=False)
        assert {k for k in model.state_dict() if ".lora_" in k} == set(state), "PEFT's LoRA differs from the file"
    return unet.to(device, dtype).eval(), vae.to(device, dtype).eval()


def gaussian_tile_weights(size, var=0.01):
    x = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) / size
    profile = torch.exp(-x ** 2 / (2 * var))
    return torch.outer(profile, profile)  # (size, size)


def reference_velocity(unet, z, t, context, tile=96, overlap=32):
    """One UNet call, or Gaussian-blended tiles of `tile` latent pixels when the latent is larger."""
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return unet(z, t, encoder_hidden_states=context).sample
    weights = gaussian_tile_weights(tile).to(z)
    out, total = torch.zeros_like(z), torch.zeros(h, w).to(z)

    def starts(n):  # every `tile - overlap`, the last tile flush with the end
        return sorted({min(s, n - tile) for s in range(0, n - overlap, tile - overlap)})
    for y in starts(h):
        for x in starts(w):
            out[:, :, y:y + tile, x:x + tile] += unet(z[:, :, y:y + tile, x:x + tile], t,
                                                      encoder_hidden_states=context).sample * weights
            total[y:y + tile, x:x + tile] += weights
    return out / total


def wavelet_reconstruction(content, style, levels=5):
    """StableSR's wavelet colour fix: high frequencies of `content` + low frequencies of `style`."""
    def low(image):
        for i in range(levels):
            kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]).to(image) / 16
            image = F.conv2d(F.pad(image, (2 ** i,) * 4, mode="replicate"), kernel.expand(3, 1, 3, 3),
                             groups=3, dilation=2 ** i)
        return image
    return (content - low(content) + low(style)).clamp(0, 1)


@torch.no_grad()
def reference_super_resolve(unet, vae, scheduler, context, lr, steps):
    """lr (1, 3, h, w) in [0, 1] -> (1, 3, 4h, 4w) in [0, 1]."""
    up = F.interpolate(lr, scale_factor=4, mode="bilinear") * 2 - 1  # (1, 3, H, W)
    H, W = up.shape[-2:]
    x = F.pad(up, (0, -W % 64, 0, -H % 64), mode="reflect").to(unet.dtype)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    scheduler.set_timesteps(steps)  # FlowMatchEuler, shift 3: one step is t = 1000
    for t in scheduler.timesteps:
        z = scheduler.step(reference_velocity(unet, z, t, context), t, z).prev_sample
    sr = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)[:, :, :H, :W].float()
    return wavelet_reconstruction((sr + 1) / 2, (up + 1) / 2)


# ---- the shared random weights -------------------------------------------------------------------------

def prepare(work_dir):
    """Random SD 2.1-base (diffusers layout), a random LoRA (FlowSR layout) and a context; made once."""
    sd_dir, lora_path = os.path.join(work_dir, "sd21-random"), os.path.join(work_dir, "lora.safetensors")
    context_path = os.path.join(work_dir, "context.safetensors")
    if os.path.exists(os.path.join(work_dir, "READY")):
        return sd_dir, lora_path, context_path
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file
    import lora
    print(f"writing random SD 2.1-base weights to {work_dir} (once)", file=sys.stderr)
    torch.manual_seed(0)
    lora_states, targets = {}, {}
    for part, model in (("unet", UNet2DConditionModel(**SD21_BASE_UNET)), ("vae", AutoencoderKL(**SD21_VAE))):
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert round(count, 1) == {"unet": 865.9, "vae": 83.7}[part], f"{part}: {count:.1f} M parameters"
        model.save_pretrained(os.path.join(sd_dir, part))
        targets[part] = UNET_LORA_TARGETS if part == "unet" else vae_encoder_targets(model)
        inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=8, target_modules=targets[part]), model)
        with torch.no_grad():  # B starts at zero in PEFT; a random B makes merged vs unmerged matter
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 1e-3)
        lora_states[part] = {k: v.contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
        del model
    fields = {"unet_rank": LORA_RANK, "unet_lora_target_modules": targets["unet"], "vae_rank": LORA_RANK,
              "vae_lora_target_modules": targets["vae"], "lora_alpha": 8}
    lora.write_flowsr_checkpoint(lora_path, fields, lora_states["unet"], lora_states["vae"],
                                 extra_metadata={"flowsr_model": json.dumps({"upsample": "bilinear"})})
    text = tiny_text_encoder()
    ids = torch.tensor([list(FLOWSR_PROMPT_IDS) + [SD2_PAD_ID] * (77 - len(FLOWSR_PROMPT_IDS))])
    with torch.no_grad():
        save_file({"context": text(ids).last_hidden_state.contiguous()}, context_path)  # (1, 77, 1024)
    with open(os.path.join(work_dir, "READY"), "w") as f:
        f.write(json.dumps({"torch": torch.__version__}))
    return sd_dir, lora_path, context_path


def tiny_text_encoder():
    """A random one-layer CLIP text encoder of SD 2.1's width (1024): the context has the real shape."""
    from transformers import CLIPTextConfig, CLIPTextModel  # a benchmark-only dependency, as diffusers is
    return CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                                        num_attention_heads=16, max_position_embeddings=77))


# ---- one pipeline in one process -------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Wraps a callable so that each call's time adds to totals[name] (encode / UNet / decode shares)."""

    def __init__(self, device):
        self.device, self.totals = device, {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed


def build(pipeline, sd_dir, lora_path, context_path, device, dtype, timer, steps, tiled):
    """A function lr -> sr for `pipeline`, with its VAE encode, UNet and VAE decode timed."""
    from safetensors.torch import load_file
    context = load_file(context_path)["context"].to(device, dtype)
    if pipeline == "ours":
        model = FlowSR.load(lora_path, base=sd_dir, context=context, dtype=dtype, channels_last=True).to(device).eval()
        model.encode, model.decode = timer.wrap("vae_encode", model.encode), timer.wrap("vae_decode", model.decode)
        model.unet.forward = timer.wrap("unet", model.unet.forward)
        cfg = SampleConfig(steps=steps, upsample="bilinear", device=device.type)
        return lambda lr: super_resolve(model, lr, cfg)
    from diffusers import FlowMatchEulerDiscreteScheduler
    unet, vae = load_reference(sd_dir, lora_path, device, dtype)
    if tiled:
        vae.enable_tiling()
    vae.encode, vae.decode = timer.wrap("vae_encode", vae.encode), timer.wrap("vae_decode", vae.decode)
    unet.forward = timer.wrap("unet", unet.forward)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return lambda lr: reference_super_resolve(unet, vae, scheduler, context, lr, steps)


def test_image(side, index=0):
    """A photo resized to side x side, (1, 3, side, side): the work does not depend on it, the output check does."""
    image = load_image(PHOTOS[index % len(PHOTOS)])[0][None]
    return F.interpolate(image, size=(side, side), mode="bicubic", antialias=True).clamp(0, 1)


def current_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(cfg):
    """Load one pipeline, warm it up, then time one run per "run" line on stdin until "done"."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    _, side, steps, _ = CASES[cfg.case]
    paths = prepare(cfg.work_dir)
    timer = StageTimer(device)
    start = time.perf_counter()
    run = build(cfg.worker, *paths, device, dtype, timer, steps, tiled=side * 4 // 8 > 96)
    load_s, rss_loaded = time.perf_counter() - start, current_rss_mib()
    if cfg.oneshot:  # as a user runs it: no warm-up, each photo once
        for i in range(cfg.oneshot):
            run(test_image(side, i).to(device))
        synchronize(device)
        return
    lr = test_image(side).to(device)
    run(test_image(32).to(device))  # warm-up: kernels, allocator, lazy inits
    print("READY", flush=True)
    times, stages = [], []
    while sys.stdin.readline().strip() == "run":
        timer.totals = {}
        synchronize(device)
        start = time.perf_counter()
        sr = run(lr)
        synchronize(device)
        times.append(time.perf_counter() - start)
        stages.append(dict(timer.totals))
        print(f"TIME {times[-1]}", flush=True)
    if not times:  # the parent went away before asking for a run
        return
    out_path = os.path.join(cfg.work_dir, f"out-{cfg.worker}-{cfg.dtype}-{side}-{steps}.pt")
    torch.save(sr.float().cpu(), out_path)
    result = {"times_s": times, "median_s": statistics.median(times), "stages_s": stages, "load_s": load_s,
              "rss_after_load_mib": rss_loaded,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "output": out_path}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(result), flush=True)


# ---- the whole benchmark -----------------------------------------------------------------------------------

class Worker:
    """A pipeline in its own process (so its memory high-water mark is its own), driven line by line."""

    def __init__(self, cfg, pipeline, case, dtype):
        self.name = f"{CASES[case][0]}: {pipeline} {dtype}"
        print(f"{self.name}: loading", file=sys.stderr, flush=True)
        args = worker_command(cfg, pipeline, case, dtype)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_1min = []  # the machine's load average after each run: what else was running
        self.expect("READY")

    def expect(self, tag):
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        sys.exit(f"error: {self.name}: the worker died (exit status {self.proc.wait()})")

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        seconds = float(self.expect("TIME"))
        self.load_1min.append(os.getloadavg()[0])
        print(f"{self.name}: {seconds:.2f} s (load {self.load_1min[-1]:.1f})", file=sys.stderr, flush=True)

    def finish(self):
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        result = json.loads(self.expect("RESULT"))
        self.proc.wait()
        return {**result, "load_1min": self.load_1min}


def worker_command(cfg, pipeline, case, dtype):
    return [sys.executable, os.path.abspath(__file__), "--worker", pipeline, "--case", case, "--device", cfg.device,
            "--dtype", dtype, "--work-dir", cfg.work_dir]


def measure(cfg, case, runs, dtypes):
    """A row {pipeline: result, ...} with `dtypes` {pipeline: dtype}; the pipelines' runs alternate, so background
    load hits both alike."""
    title, _, _, pipelines = CASES[case]
    workers = {p: Worker(cfg, p, case, dtypes[p]) for p in pipelines}
    for _ in range(runs):
        for w in workers.values():
            w.run()
    row = {"title": title, "dtypes": {p: dtypes[p] for p in pipelines},
           "date": datetime.datetime.now().isoformat(timespec="seconds"), **{p: w.finish() for p, w in workers.items()}}
    if "reference" in row:
        ours, ref = row["ours"], row["reference"]
        row["ratio"] = ref["median_s"] / ours["median_s"]
        row["ratio_per_run"] = [r / o for r, o in zip(ref["times_s"], ours["times_s"])]
        row["max_abs_diff"], row["psnr_between_db"] = output_difference(ours["output"], ref["output"])
    return row


def end_to_end(cfg, rounds, dtypes):
    """Each round, each pipeline in a fresh process: imports, loading and cfg.photos photos 128->512, wall clock."""
    times = {p: [] for p in dtypes}
    for _ in range(rounds):
        for pipeline, dtype in dtypes.items():
            command = worker_command(cfg, pipeline, "1step", dtype) + ["--oneshot", str(cfg.photos)]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[pipeline].append(time.perf_counter() - start)
            print(f"{cfg.photos} photos end to end: {pipeline} {dtype}: {times[pipeline][-1]:.1f} s", file=sys.stderr,
                  flush=True)
    row = {"title": f"{cfg.photos} photos 128->512, 1 step, end to end", "dtypes": dtypes,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           **{p: {"times_s": t, "median_s": statistics.median(t)} for p, t in times.items()}}
    row["ratio"] = row["reference"]["median_s"] / row["ours"]["median_s"]
    row["ratio_per_run"] = [r / o for r, o in zip(times["reference"], times["ours"])]
    return row


def output_difference(a_path, b_path):
    """(max |a - b|, PSNR in dB) between two outputs in [0, 1]."""
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    mse = (a - b).pow(2).mean().item()
    return (a - b).abs().max().item(), (10 * torch.log10(torch.tensor(1 / mse)).item() if mse else float("inf"))


def same_dtype(case, dtype):
    """{pipeline: dtype} for every pipeline of `case`."""
    return {pipeline: dtype for pipeline in CASES[case][3]}


def row_key(case, dtypes):
    return f"{case}/" + "/".join(dtypes[p] for p in ("ours", "reference") if p in dtypes)


def markdown(report):
    m, rows = report["machine"], report["rows"]
    mem = "peak_cuda_mib" if report["device"] == "cuda" else "peak_rss_mib"
    lines = [f"# Speed: {report['device']}", "",
             f"{m.get('gpu', m['cpu'])} (CPU flags: {', '.join(m.get('cpu_flags', [])) or 'none checked'}), "
             f"{m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; sample.py's default dtype "
             f"here: {report.get('default_dtype', '?')}. {report['note']}", "",
             "| row | ours | reference | reference / ours (per run) | peak memory ours / reference (MiB) "
             "| outputs: max abs diff / PSNR | date; load average after each run (ours/ref) |",
             "|---|---|---|---|---|---|---|"]
    for row in (r for r in rows.values() if "reference" in r):
        ours, ref = row["ours"], row["reference"]
        per_run = ", ".join(f"{r:.2f}" for r in row["ratio_per_run"])
        memory = f"{ours[mem]:.0f} / {ref[mem]:.0f}" if mem in ours else "-"
        diff = f"{row['max_abs_diff']:.1e} / {row['psnr_between_db']:.1f} dB" if "max_abs_diff" in row else "-"
        loads = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(ours.get("load_1min", []), ref.get("load_1min", [])))
        lines.append(f"| {row['title']} ({len(ours['times_s'])} runs) | {ours['median_s']:.2f} s "
                     f"{row['dtypes']['ours']} | {ref['median_s']:.2f} s {row['dtypes']['reference']} "
                     f"| **{row['ratio']:.2f}x** ({per_run}) | {memory} | {diff} | {row['date']}; {loads} |")
    lines += ["", f"Memory: {'CUDA max_memory_allocated' if report['device'] == 'cuda' else 'RSS high-water mark'}"
              " of the pipeline's own process, loading included. End-to-end rows: wall clock of a fresh process "
              "(imports, loading, each photo once). The FlowSR paper reports "
              f"{PAPER_GPU_SECONDS} s for 128->512 on its GPU."]
    loads = [(k, r["ours"]["load_s"], r["reference"]["load_s"]) for k, r in rows.items()
             if k.startswith("1step/") and "reference" in r]
    if loads:
        lines += ["", "Loading (base + checkpoint, in the timed process): " + "; ".join(
            f"ours {k.split('/')[1]} {o:.1f} s, reference {k.split('/')[2]} {r:.1f} s" for k, o, r in loads) + "."]
    if "bf16_vs_fp32" in report:
        diff, psnr = report["bf16_vs_fp32"]
        lines += ["", f"Ours in bf16 against ours in fp32, 128->512 one step (random SD 2.1-size weights): max abs "
                      f"difference {diff:.1e}, PSNR {psnr:.1f} dB."]
    one_step = [k for k in rows if k.startswith("1step/")]
    if one_step:
        lines += ["", "Share of time, 128->512, one step (median run):", "",
                  "| pipeline | VAE encode | UNet | VAE decode | rest |", "|---|---|---|---|---|"]
    for key in one_step:
        for pipeline in ("ours", "reference"):
            share = stage_shares(rows[key][pipeline])
            lines.append(f"| {pipeline} {rows[key]['dtypes'][pipeline]} | " + " | ".join(
                f"{100 * share[k]:.0f}%" for k in ("vae_encode", "unet", "vae_decode", "rest")) + " |")
    for dtype in ("fp32", "bf16"):
        keys = {case: row_key(case, same_dtype(case, dtype)) for case in ("256", "1step", "tiled", "2048")}
        sizes = [(CASES[case][1] * 4, rows[key]["ours"]) for case, key in keys.items() if key in rows]
        if sizes:
            lines += ["", f"Ours, one step, {dtype}, by output size:", "", "| output | seconds | runs | s per megapixel "
                      "| peak memory (MiB) |", "|---|---|---|---|---|"]
            lines += [f"| {side} px | {r['median_s']:.2f} | {len(r['times_s'])} | "
                      f"{r['median_s'] / (side ** 2 / 1e6):.2f} | {r[mem]:.0f} |" for side, r in sizes]
    return "\n".join(lines) + "\n"


def stage_shares(result):
    """Fractions of the median run spent in each stage (rest: up-sampling, padding, colour fix, copies)."""
    i = result["times_s"].index(result["median_s"]) if result["median_s"] in result["times_s"] else 0
    total, stages = result["times_s"][i], result["stages_s"][i]
    shares = {k: stages.get(k, 0.0) / total for k in ("vae_encode", "unet", "vae_decode")}
    return {**shares, "rest": 1 - sum(shares.values())}


def main(argv=None):
    cfg = parse(BenchConfig, argv)
    if cfg.worker:
        return worker(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    unknown = [c for c in cfg.cases if c not in CASES] + [d for d in cfg.dtypes if d not in ("fp32", "bf16")]
    if unknown:
        sys.exit(f"error: unknown case(s) or dtype(s) {', '.join(unknown)}; cases: {', '.join(CASES)}; "
                 f"dtypes: fp32, bf16")
    default_dtype = "bf16" if native_bf16(torch.device(cfg.device))[0] else "fp32"
    plan = [(case, same_dtype(case, dtype)) for dtype in cfg.dtypes for case in CASES if case in cfg.cases]
    if cfg.default_row and default_dtype != "fp32" and "1step" in cfg.cases:
        plan.append(("1step", {"ours": default_dtype, "reference": "fp32"}))
    prepare(cfg.work_dir)
    for stale in glob.glob(os.path.join(cfg.work_dir, "out-*.pt")):  # outputs of earlier runs compare nothing
        os.remove(stale)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stem = os.path.join(cfg.out_dir, f"speed_{cfg.device}")
    report = {"device": cfg.device, "default_dtype": default_dtype, "note": cfg.note, "machine": machine(),
              "rows": {}}
    if os.path.exists(stem + ".json") and not cfg.fresh:  # rows run earlier stay, unless run again
        try:
            with open(stem + ".json") as f:
                report["rows"] = json.load(f)["rows"]
        except (ValueError, KeyError) as e:
            sys.exit(f"error: {stem}.json: not a results file of this script ({e}); move it away or use --fresh")

    def save():  # after every row, so an interrupted run keeps what it measured
        write_results(stem, report, markdown(report))
    for case, dtypes in plan:
        runs = {"2048": 1, "tiled": cfg.runs_tiled or cfg.runs}.get(case, cfg.runs)
        report["rows"][row_key(case, dtypes)] = measure(cfg, case, runs, dtypes)
        outputs = [os.path.join(cfg.work_dir, f"out-ours-{d}-128-1.pt") for d in ("bf16", "fp32")]
        if all(os.path.exists(p) for p in outputs):
            report["bf16_vs_fp32"] = output_difference(*outputs)
        save()
    end_to_end_rows = [{"ours": d, "reference": d} for d in cfg.dtypes if d == "fp32"]
    if cfg.default_row and default_dtype != "fp32":
        end_to_end_rows.append({"ours": default_dtype, "reference": "fp32"})
    for dtypes in end_to_end_rows if cfg.photos else []:
        report["rows"][row_key("photos", dtypes)] = end_to_end(cfg, cfg.runs, dtypes)
        save()
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
