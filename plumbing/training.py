"""The machinery of train.py's loop: what keeps a long run safe, reproducible and readable, not what it learns.

    TrainingError   a run that cannot go on: one line for the user, which train.py prints before it exits
    Interrupted     SIGINT / SIGTERM (STOP_SIGNALS) ask the loop to save and stop after the current step
    Ranks           data parallelism under torchrun: the device, "any rank?", the gradient average
    synced_step     one optimizer step on gradients averaged over the ranks, skipped when not finite
    warnings_to     warnings (unreadable photos) as "warning: ..." lines
    open_dataset    the training photos, checked once at start
    batches         the data order: step s of rank r takes fixed items, so a resumed run sees the same batches;
                    with micro_batches (--grad-accum) and step_generator (the time draws of a step)
    StepReport      what the micro-batches of one optimizer step report
    LogWindow       the stats between two log lines, and the loss by time bucket
"""
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import HRFolderDataset, ImageError
from plumbing.flags import device_problem


class TrainingError(Exception):
    """A training run that cannot go on; the message is one line."""


# What asks a run to stop: Ctrl-C, a scheduler's SIGTERM and, on Windows, Ctrl-Break
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ())


class Interrupted:
    """While active, STOP_SIGNALS ask the loop to save and stop after the current step (a second SIGINT stops at
    once); on exit the previous handlers come back."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.request) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind, error, traceback):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if kind is KeyboardInterrupt and self.requested:
            raise TrainingError("stopped at once by a Ctrl-C after the stop request; checkpoints are written whole or "
                                "not at all, so --resume goes on from the last one saved") from None

    def request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def init_worker(worker_id):
    """DataLoader workers leave STOP_SIGNALS to the main process, which saves before it stops, and say their
    warnings (a photo skipped) in one line."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    warnings.showwarning = say_warning


def say_warning(message, *where, **more):
    tqdm.write(f"warning: {message}", file=sys.stderr)  # above the progress bar, not inside it


@dataclass
class Ranks:
    """This process's rank of `world` under torchrun (rank 0 of 1 without it), and its device."""
    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device="auto"):
        """Join torchrun's process group (gloo on CPU, nccl on GPU where torch has it: not on Windows) when there is
        one; pick the device."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        problem = device_problem(device)
        if problem:
            raise TrainingError(problem)
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        if world > 1 and torch.device(device).type == "mps":
            raise TrainingError("--device mps trains in one process (torch.distributed has no backend for it)")
        if world > 1:
            dist.init_process_group("nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo")
        return cls(rank, world, torch.device(device))

    def autocast(self):
        """bfloat16 mixed precision on CUDA; full precision elsewhere."""
        return torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def any(self, flag):
        """Whether `flag` is true on any rank; the same answer on every rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value)
        return value.item() > 0

    def average_gradients(self, params):
        """Each rank has the gradients of its own batch; one all_reduce averages them."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world > 1 and grads:
            buffer = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(buffer)
            buffer /= self.world
            for g, chunk in zip(grads, buffer.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))


def setup(cfg, presets):
    """train.py's start: fill the preset's defaults into cfg (presets: {preset: {field: value}}) and check
    the config; start the process group under torchrun; pick the device. Returns the Ranks."""
    defaults = presets[cfg.preset]
    unset = dict(batch_size=0, crop_size=0, lr=0, stage2_lr=0, degradation="preset", flat_prob=-1)
    for key, marker in unset.items():
        if getattr(cfg, key) == marker:
            setattr(cfg, key, defaults[key])
    if cfg.flat_prob < 0:
        raise TrainingError(f"--flat-prob {cfg.flat_prob}: must be in [0, 1] (-1: the preset's)")
    if cfg.grad_checkpointing == "auto":
        cfg.grad_checkpointing = "on" if defaults["grad_checkpointing"] else "off"
    if cfg.init and cfg.stage != "2":
        raise TrainingError("--init is the stage-1 model for --stage 2; here stage 2 starts from the stage 1 trained")
    if cfg.preset == "sd21" and not cfg.base:
        raise TrainingError("--preset sd21 needs --base (an SD 2.1-base diffusers folder or single file)")
    if cfg.batch_size % cfg.grad_accum:
        raise TrainingError(f"--batch-size {cfg.batch_size} does not split into --grad-accum {cfg.grad_accum}")
    return Ranks.start(cfg.device)


def synced_step(optimizer, ranks, max_norm=0.0, finite=True):
    """Average the gradients over the ranks, clip their norm to max_norm (0: no clipping) and step, unless a
    loss (`finite` false on any rank) or the gradient is not finite: then nothing is updated. Each parameter group
    is clipped on its own, so that a second model in the optimizer (stage 1's texture predictor) does not scale
    the first one's steps. Returns the first group's gradient norm, or None for a skipped step."""
    ranks.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    norms = [torch.nn.utils.clip_grad_norm_(group["params"], max_norm or float("inf"))
             for group in optimizer.param_groups]
    if ranks.any(not finite) or not all(torch.isfinite(norm) for norm in norms):  # the same on all ranks
        return None
    optimizer.step()
    return norms[0].item()


@contextlib.contextmanager
def warnings_to(say):
    """Each warning raised inside becomes one line said as "warning: ...", also when an exception ends it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                say(f"warning: {warning.message}")


def open_dataset(cfg, length, say):
    """`length` HR crops (with their LR) of the photos in --data, checked once at start: unreadable files are
    skipped with one warning each."""
    with warnings_to(say):
        try:
            return HRFolderDataset(cfg.data, cfg.crop_size, 4, cfg.degradation, seed=cfg.seed, length=length,
                                   zoom_out=cfg.zoom_out, flat_prob=cfg.flat_prob)
        except ValueError as e:
            raise TrainingError(str(e)) from None


def batches(dataset, batch_size, start_step, total_steps, rank, world, num_workers):
    """Item n of the dataset is fully determined by (seed, n), and step s of rank r takes the items
    s * B * world + r * B + [0, B): resuming at any step gives the same batches. The photos failing in a worker
    is an ImageError of one line here, as without workers."""
    order = [step * batch_size * world + rank * batch_size + j
             for step in range(start_step, total_steps) for j in range(batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=True,
                                         num_workers=num_workers, worker_init_fn=init_worker)
    # A spawned worker (macOS) imports torch for seconds before init_worker ignores the stop signals; a Ctrl-C
    # then killed it and the run. Workers are created with them blocked, which they keep (POSIX); one that comes
    # meanwhile waits and reaches the main process's handler when they are unblocked here.
    blocking = num_workers > 0 and hasattr(signal, "pthread_sigmask")
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        iterator = iter(loader)
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        with warnings.catch_warnings():  # without workers, the photos are read here
            warnings.showwarning = say_warning
            yield from iterator
    except ImageError as e:  # from a worker, the message holds the worker's traceback; its last line is the error
        raise ImageError(re.sub(r"^\S*ImageError: ", "", str(e).strip().splitlines()[-1])) from None
    finally:  # the workers ignore SIGTERM, so an exit that waits for them would hang: stop them here
        if num_workers:
            iterator._shutdown_workers()


def micro_batches(batch, n, device):
    """The step's batch in n equal slices (--grad-accum): (x_hr, x_lr) pairs on the device."""
    size = len(batch["hr"]) // n
    for k in range(n):
        part = slice(k * size, (k + 1) * size)
        yield batch["hr"][part].to(device), batch["lr"][part].to(device)


def step_generator(seed, stage, step, rank):
    """The generator of a step's time draws (and perturbation): a pure function of (seed, stage, step, rank)."""
    key = hashlib.blake2b(f"{seed}/{stage}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


@dataclass
class StepReport:
    """One optimizer step of `grad_accum` micro-batches: the mean of their stats, their times t and
    per-example losses (for the loss by t), and whether every loss was finite."""
    grad_accum: int
    stats: dict = field(default_factory=dict)
    finite: bool = True
    times: list = field(default_factory=list)
    per_example: list = field(default_factory=list)

    def add(self, loss, per_example, stats, t):
        self.finite = self.finite and bool(torch.isfinite(loss))
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value / self.grad_accum
        self.times.append(t.detach().cpu())
        self.per_example.append(per_example.detach().float().cpu())


class LogWindow:
    """Sums of the stats since the last log line, and of the per-example loss by t in [0,.25) .. [.75,1].
    Its state goes into the training state, so that a run resumed inside a window logs the whole window. Under
    torchrun each rank keeps its own; the log shows rank 0's, the stats of its share of each batch."""

    def __init__(self, state=None):
        if state is None:
            self.reset()
        else:
            self.sums, self.count, self.by_t = state["sums"], state["count"], state["by_t"]

    def reset(self):
        self.sums, self.count, self.by_t = {}, 0, torch.zeros(2, 4)  # by_t: loss sums, example counts

    def state_dict(self):
        return {"sums": self.sums, "count": self.count, "by_t": self.by_t}

    def add(self, report):
        t, per_example = torch.cat(report.times), torch.cat(report.per_example)
        bucket = (t * 4).clamp(max=3.999).long()
        self.by_t[0].index_add_(0, bucket, per_example)
        self.by_t[1].index_add_(0, bucket, torch.ones(len(bucket)))
        for key, value in report.stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def log(self, stage, step, total, seconds, say, path=None):
        """Say the window's means (and append them to the JSON-lines file `path`), then start a new window."""
        means = {k: v / self.count for k, v in self.sums.items()}
        by_t = [total_loss / n if n else None for total_loss, n in zip(*self.by_t.tolist())]  # None: no t there
        say(f"stage {stage} step {step}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
            + " | loss by t: " + " ".join("-" if b is None else f"{b:.4f}" for b in by_t) + f" | {seconds:.0f}s")
        if path is not None:
            try:
                with open(path, "a", encoding="utf-8", newline="\n") as f:  # as trim_log rewrites it
                    f.write(json.dumps({"stage": stage, "step": step, **means, "loss_by_t": by_t}) + "\n")
            except OSError as e:  # the line above said it; training goes on to its next checkpoint
                say(f"warning: {path}: {e}")
        self.reset()
