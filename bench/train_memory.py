"""Peak memory, time per step and state-file size of train.py --preset sd21, both stages, at the SD 2.1-base size.

    python bench/train_memory.py                                                  # CPU: 64 and 128 px, batch 1
    python bench/train_memory.py --device cuda --crop-sizes 512 --batch-size 4 --steps 20 --num-workers 4

Random weights at the real size (UNet 865.9 M, VAE 83.7 M parameters; bench/speed.py writes them once to
--work-dir, a tiny random text encoder is added for the prompt embedding): memory and time do not depend on
the values. Each stage of each crop size runs train.py in its own process (stage 2 from that run's stage-1
file), so each high-water mark is its own: peak RSS (ru_maxrss, loading included) and, on CUDA,
torch.cuda.max_memory_allocated during the steps.

Measured parts, for the estimate of a configuration that cannot run here (`estimate`):
- weights: bytes of every parameter (base, LoRA adapters, discriminator); the optimizers' state and the
  gradients: bytes of the AdamW moments and of the trainable weights;
- activations: bytes of the distinct storages autograd saves for the backward pass of the generator's loss
  (saved_tensors_hooks; parameters excluded, the block inputs that gradient checkpointing keeps included), at
  two crop sizes: a per-image part that grows with the pixel count, and a fixed part.
Results: bench/results/train_memory_DEVICE.{json,md}.
"""
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
import unet  # noqa: E402
from plumbing.flags import flag, parse  # noqa: E402
from report import machine, write_results  # noqa: E402
from speed import current_rss_mib, prepare, synchronize, tiny_text_encoder  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 2 ** 30


@dataclass
class BenchConfig:
    """Memory and time of both training stages of the sd21 preset at the real SD 2.1-base size."""
    device: str = flag("cpu", "cpu or cuda")
    crop_sizes: list = flag(["64", "128"], "HR crop sizes; two or more fit the activation model of the estimate")
    batch_size: int = flag(1, "images per step")
    steps: int = flag(2, "optimizer steps per stage")
    num_workers: int = flag(0, "DataLoader workers of train.py")
    est_crop: int = flag(512, "estimate: crop size")
    est_batch: int = flag(4, "estimate: batch size")
    work_dir: str = flag(os.path.join(tempfile.gettempdir(), "flowsr-bench"), "where the random SD 2.1 weights go (~4 GB)")
    out_dir: str = flag(os.path.join(HERE, "results"), "where the JSON and markdown results go")
    note: str = flag("", "free text saved with the results")
    worker: int = flag(0, "internal: run this stage in this process and print its measurements")
    crop: int = flag(0, "internal: the worker's crop size")


def sd_folder(work_dir):
    """bench/speed.py's random SD 2.1-base folder, plus the tiny random text encoder train.py's prompt needs."""
    sd_dir = prepare(work_dir)[0]
    if not os.path.isdir(os.path.join(sd_dir, "text_encoder")):
        tiny_text_encoder().save_pretrained(os.path.join(sd_dir, "text_encoder"))
    return sd_dir


# ---- one stage in one process --------------------------------------------------------------------------

class SavedActivations:
    """Bytes autograd holds for each backward pass: distinct storages saved by the graph's ops (parameters are
    weights, counted apart) plus the block inputs that gradient checkpointing keeps instead of the block's
    activations. Records one number per backward call, what was saved since the previous one."""

    def __init__(self):
        self.current, self.passes, self.in_backward = {}, [], False

    def record(self, tensor):
        if isinstance(tensor, torch.Tensor) and not isinstance(tensor, torch.nn.Parameter) and not self.in_backward:
            storage = tensor.untyped_storage()
            self.current[storage.data_ptr()] = storage.nbytes()

    def pack(self, tensor):
        self.record(tensor)
        return tensor

    def install(self):
        """Count saved tensors everywhere from now on (train.py's backward calls and unet.call's checkpoints)."""
        torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t).__enter__()
        backward, call = torch.Tensor.backward, unet.call

        def counted_backward(tensor, *args, **kwargs):
            self.passes.append(sum(self.current.values()))
            self.current, self.in_backward = {}, True
            try:
                return backward(tensor, *args, **kwargs)
            finally:
                self.in_backward = False

        def counted_call(module, *args, checkpointed):
            if checkpointed:
                for arg in args:
                    self.record(arg)
            return call(module, *args, checkpointed=checkpointed)
        torch.Tensor.backward, unet.call = counted_backward, counted_call


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(cfg):
    """Run one stage of train.py; print RESULT {json}."""
    device = torch.device(cfg.device)
    out = os.path.join(cfg.work_dir, f"train-{cfg.device}-{cfg.crop}-b{cfg.batch_size}")
    argv = ["--preset", "sd21", "--base", sd_folder(cfg.work_dir), "--stage", str(cfg.worker), "--out-dir", out,
            "--data", os.path.join(ROOT, "photos", "train"), "--val-data", os.path.join(ROOT, "photos", "heldout"),
            "--crop-size", str(cfg.crop), "--batch-size", str(cfg.batch_size), "--max-steps", str(cfg.steps),
            "--num-workers", str(cfg.num_workers), "--log-every", "1", "--val-every", "1000000",
            "--ckpt-every", "1000000", "--device", cfg.device, "--overwrite"]  # a run of an earlier call is redone
    built, times = {}, []
    build, step = (train.build_stage1, train.stage1_step) if cfg.worker == 1 else (train.build_stage2, train.stage2_step)

    def build_and_keep(*args):
        built["stage"] = build(*args)
        built["rss_built_mib"] = current_rss_mib()
        if device.type == "cuda":
            built["cuda_built_mib"] = torch.cuda.memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
        return built["stage"]

    def timed_step(*args):
        synchronize(device)
        start = time.perf_counter()
        report = step(*args)
        synchronize(device)
        times.append(time.perf_counter() - start)
        return report
    if cfg.worker == 1:
        train.build_stage1, train.stage1_step = build_and_keep, timed_step
    else:
        train.build_stage2, train.stage2_step = build_and_keep, timed_step
    activations = SavedActivations()
    activations.install()
    train.main(argv)
    s = built["stage"]
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    # stage 2 alternates the generator's backward and the discriminator's
    g_passes = activations.passes[0::2] if s.d_optimizer is not None else activations.passes
    result = {
        "stage": cfg.worker, "crop": cfg.crop, "batch": cfg.batch_size, "step_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_built_mib": built["rss_built_mib"],
        "weights_bytes": nbytes(s.model.parameters()),
        "trainable_bytes": nbytes(trainable),
        "optimizer_bytes": nbytes(t for state in s.optimizer.state.values() for t in state.values()),
        "discriminator_bytes": nbytes(s.discriminator.parameters()) if s.discriminator is not None else 0,
        "d_optimizer_bytes": (nbytes(t for state in s.d_optimizer.state.values() for t in state.values())
                              if s.d_optimizer is not None else 0),
        "saved_bytes_g": max(g_passes),
        "saved_bytes_per_pass": activations.passes,
        "state_file_bytes": os.path.getsize(os.path.join(out, f"stage{cfg.worker}_state.pt")),
        "model_file_bytes": os.path.getsize(os.path.join(out, f"stage{cfg.worker}.safetensors")),
    }
    if device.type == "cuda":
        result.update(cuda_built_mib=built["cuda_built_mib"],
                      peak_cuda_steps_mib=torch.cuda.max_memory_allocated() / 2 ** 20)
    print("RESULT " + json.dumps(result), flush=True)


# ---- the whole benchmark ---------------------------------------------------------------------------------

def run_worker(cfg, stage, crop):
    args = [sys.executable, os.path.abspath(__file__), "--worker", str(stage), "--crop", str(crop), "--device",
            cfg.device, "--batch-size", str(cfg.batch_size), "--steps", str(cfg.steps), "--num-workers",
            str(cfg.num_workers), "--work-dir", cfg.work_dir]
    print(f"stage {stage}, {crop} px, batch {cfg.batch_size}: running", file=sys.stderr, flush=True)
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"error: stage {stage} at {crop} px failed (exit status {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def activation_model(rows):
    """(bytes per image and pixel, fixed bytes) of the generator pass's saved activations, fitted to the runs
    (batch b, crop p): saved = b * a * p^2 + c; with one crop size, c = 0."""
    points = sorted({(r["crop"] ** 2 * r["batch"], r["saved_bytes_g"]) for r in rows})
    if len(points) == 1:
        return points[0][1] / points[0][0], 0.0
    (x0, y0), (x1, y1) = points[0], points[-1]
    a = (y1 - y0) / (x1 - x0)
    return a, y0 - a * x0


def estimate(rows, crop, batch):
    """GPU memory of one stage at (crop, batch) under bf16 autocast with gradient checkpointing, from the parts:
    fp32 weights (autocast keeps them fp32), gradients and AdamW moments of the trainable weights (and of the
    discriminator), and the saved activations of the generator's pass, which bf16 autocast shrinks by at most
    half (convolution and linear inputs are saved in bf16, norms and activation functions run in fp32)."""
    a, c = activation_model(rows)
    r = rows[-1]
    d_trains = r["d_optimizer_bytes"] > 0  # then the discriminator has gradients too
    fixed = (r["weights_bytes"] + r["trainable_bytes"] + r["optimizer_bytes"]
             + r["discriminator_bytes"] * (2 if d_trains else 1) + r["d_optimizer_bytes"])
    fp32 = batch * a * crop ** 2 + c
    return {"weights_optimizer_gib": fixed / GIB, "activations_fp32_gib": fp32 / GIB,
            "per_image_fp32_gib": a * crop ** 2 / GIB, "low_gib": (fixed + fp32 / 2) / GIB, "high_gib": (fixed + fp32) / GIB}


def markdown(report):
    cfg, rows = report["config"], report["rows"]
    m = report["machine"]
    cuda = report["device"] == "cuda"
    lines = [f"# Training memory at the SD 2.1 size: {report['device']}", "",
             f"{m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"{report['date']}. {cfg['note']}", "",
             "| stage | crop, batch | peak RSS (MiB) | RSS when built (MiB; weights mapped, not yet read) |"
             + (" peak CUDA in steps and the last step's validation grid (MiB) |" if cuda else "")
             + " s per step | state file (MB) | trainable (M) | saved activations, G pass (MiB) |",
             "|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['crop']} px, {r['batch']} | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_built_mib']:.0f} |" + (f" {r['peak_cuda_steps_mib']:.0f} |" if cuda else "")
                     + f" {', '.join(f'{t:.1f}' for t in r['step_s'])} | {r['state_file_bytes'] / 1e6:.0f} | "
                     f"{r['trainable_bytes'] / 4e6:.2f} | {r['saved_bytes_g'] / 2 ** 20:.0f} |")
    if "estimates" in report:
        e_cfg = report["estimate_at"]
        lines += ["", f"Estimate at {e_cfg['crop']} px, batch {e_cfg['batch']}, bf16 autocast, gradient "
                  "checkpointing (see `estimate` in bench/train_memory.py):", "",
                  "| stage | weights + grads + AdamW (GiB) | activations per image, fp32 (GiB) | all activations, fp32 "
                  "(GiB) | total (GiB), bf16 halving all .. none |", "|---|---|---|---|---|"]
        for stage, e in report["estimates"].items():
            lines.append(f"| {stage} | {e['weights_optimizer_gib']:.2f} | {e['per_image_fp32_gib']:.2f} | "
                         f"{e['activations_fp32_gib']:.1f} | {e['low_gib']:.1f} .. {e['high_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = parse(BenchConfig, argv)
    if cfg.worker:
        return worker(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    sd_folder(cfg.work_dir)
    rows = [run_worker(cfg, stage, int(crop)) for crop in cfg.crop_sizes for stage in (1, 2)]
    report = {"device": cfg.device, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "config": vars(cfg), "rows": rows}
    if cfg.device == "cpu":
        report["estimate_at"] = {"crop": cfg.est_crop, "batch": cfg.est_batch}
        report["estimates"] = {stage: estimate([r for r in rows if r["stage"] == stage], cfg.est_crop, cfg.est_batch)
                               for stage in (1, 2)}
    os.makedirs(cfg.out_dir, exist_ok=True)
    stem = os.path.join(cfg.out_dir, f"train_memory_{cfg.device}")
    write_results(stem, report, markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
