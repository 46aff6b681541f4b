"""Resumable training state: what train.py writes so that --resume repeats an uninterrupted run.

One file per stage (OUT_DIR/stage{1,2}_state.pt, torch.save of tensors and plain values, read back with
weights_only=True) holds the trainable weights, the optimizer, in stage 2 the EMA target and the
discriminator, the step and the open log window; the data and time draws of step n are a pure function of
(seed, n, rank) (stage 2's step n sees stage 1's batch n, with other time draws), so nothing else is needed.
A resumed optimizer keeps its moments and takes this run's learning rate and weight decay. For the sd21 preset
the weights are LoRA tensors only (the student's; the target is a LoRA adapter): the base comes from --base and
the teacher from the stage-1 file, whose digest stage 2's state keeps. It is written atomically
(weights.write_atomic) and after the model file, so it is what commits a checkpoint. A state of another model
(preset, sizes, LoRA ranks, upsampling) or, in stage 2, of another teacher is refused, naming the differences.
Every refusal is a one-line TrainingError. While a run goes on it holds --out-dir (claimed_out_dir).
"""
import contextlib
import dataclasses
import errno
import functools
import io
import json
import os

import torch

from plumbing.checkpoints import METADATA_KEY, recorded_upsample
from plumbing.paths import folder_problem, path_key
from plumbing.training import LogWindow, TrainingError
from plumbing.validation import grids_after
from plumbing.weights import first_line, json_object, read_metadata, tensors_digest, write_atomic

OPTIONAL_PARTS = ("target", "discriminator", "d_optimizer")  # stage 2's, the optimizer only while --gan-weight > 0
REQUIRED_PARTS = ("step", "signature", "config", "model", "optimizer")


def check_paths(cfg, stages, stage1_steps):
    """What --out-dir, --data and --val-data must be, checked by reading only, on every rank and before the photos
    are read: --out-dir a folder (or nothing yet) outside --data (the validation grids would become training
    photos) holding nothing this run would replace (check_nothing_replaced), --val-data a folder ('': none)."""
    out_key, data_key = path_key(cfg.out_dir or "."), path_key(cfg.data)
    if os.path.splitdrive(out_key)[0] == os.path.splitdrive(data_key)[0] and \
            os.path.commonpath([out_key, data_key]) == data_key:
        raise TrainingError(f"--out-dir {cfg.out_dir} is inside --data {cfg.data}: its grids would become training "
                            "photos")
    if os.path.exists(cfg.out_dir or ".") and not os.path.isdir(cfg.out_dir or "."):
        raise TrainingError(f"--out-dir {cfg.out_dir}: a file, not a folder")
    if cfg.val_data and folder_problem(cfg.val_data):
        raise TrainingError(f"--val-data {cfg.val_data}: {folder_problem(cfg.val_data)}")
    check_nothing_replaced(cfg, stages, stage1_steps)


@contextlib.contextmanager
def claimed_out_dir(cfg, stages, stage1_steps):
    """Make --out-dir and hold it for this run: a second train.py writing into it is refused (its log lines and
    checkpoints would interleave with this one's); what check_paths found is checked again under the lock."""
    try:
        os.makedirs(cfg.out_dir or ".", exist_ok=True)
        lock = open(os.path.join(cfg.out_dir or ".", ".lock"), "a", encoding="utf-8")
    except OSError as e:
        raise TrainingError(f"--out-dir {cfg.out_dir}: {first_line(e)}") from None
    with lock, exclusive_lock(lock) as held:
        if not held:
            raise TrainingError(f"--out-dir {cfg.out_dir}: another train.py is writing into it")
        check_nothing_replaced(cfg, stages, stage1_steps)
        yield


@contextlib.contextmanager
def exclusive_lock(handle):
    """Yields True while this process holds an exclusive lock on the open file, False if another process holds
    it (nothing waits). Where the file system has no locks (some network ones), True: the run goes on unguarded."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        busy = (errno.EACCES, errno.EDEADLK)

        def take():  # the first byte (a lock beyond the end of the empty file is allowed)
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

        def release():  # explicitly: Windows frees the locks of a closed file only after a while
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        busy = (errno.EWOULDBLOCK, errno.EAGAIN)
        take = functools.partial(fcntl.flock, handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release = functools.partial(fcntl.flock, handle, fcntl.LOCK_UN)
    try:
        take()
    except OSError as e:
        taken, held = False, e.errno not in busy
    else:
        taken, held = True, True
    try:
        yield held
    finally:
        if taken:
            with contextlib.suppress(OSError):  # never in place of the run's own error
                release()


def check_nothing_replaced(cfg, stages, stage1_steps):
    """A fresh run would replace the checkpoints of `stages` at its first save: refused, unless --overwrite. (A
    model file without its state file is a checkpoint whose commit was cut short: --resume starts that stage over.)
    So is a --resume whose stage 1 would train on (to `stage1_steps`) under a stage 2 that distils its model now:
    that stage 2 could not go on, and only after stage 1 had run would it say so."""
    if cfg.resume and cfg.overwrite:
        raise TrainingError("--resume goes on from the checkpoints that --overwrite would replace: give one of them")
    for stage in () if cfg.overwrite else stages:
        model, state = (os.path.join(cfg.out_dir, f"stage{stage}{ext}") for ext in (".safetensors", "_state.pt"))
        if not cfg.resume and (os.path.exists(model) or os.path.exists(state)):
            raise TrainingError(f"{model if os.path.exists(model) else state} is there from an earlier run: --resume "
                                "goes on from it, --overwrite starts over, or give another --out-dir")
    stage1_state, stage2_state = (os.path.join(cfg.out_dir, f"stage{n}_state.pt") for n in (1, 2))
    if cfg.resume and stages == (1, 2) and os.path.exists(stage2_state):
        step = load_state(stage1_state)["step"] if os.path.exists(stage1_state) else 0  # 0: stage 1 starts over
        if step < stage1_steps:
            raise TrainingError(f"stage 1 would train on from step {step} to {stage1_steps}, but {stage2_state} "
                                f"distils its step-{step} model: move the stage-2 files away to train stage 2 again "
                                "afterwards, or give --stage 1 or --stage 2")


def stage1_path(cfg):
    """The stage-1 model stage 2 starts from (and distils)."""
    return cfg.init or os.path.join(cfg.out_dir, "stage1.safetensors")


def flat(value, prefix):
    """{"unet": {"in_channels": 4}} -> {"PREFIX.unet.in_channels": 4}, so that differences can be named."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}


def model_signature(cfg, model):
    """What must agree between a checkpoint and the run resuming it, as a flat {name: value}."""
    signature = {"preset": cfg.preset, **flat(model.config_dict(), "model")}
    if cfg.preset == "sd21":
        signature.update(lora_rank=cfg.lora_rank, vae_lora_rank=cfg.vae_lora_rank)
    return json.loads(json.dumps(signature))  # tuples become lists, as they come back from the file


def save_state(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)  # to memory first: a full disk then fails in write() with a plain OSError
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def load_state(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [key for key in REQUIRED_PARTS if key not in state]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        json.loads(state["signature"])
        json.loads(state["config"])
        return state
    except Exception as e:  # torch.load raises many types on a damaged file
        raise TrainingError(f"{path}: not a readable training state ({first_line(e)}); "
                            "move it away to start this stage over") from None


def check_resumable(path, saved, current):
    """Refuse a checkpoint of another model, naming the differences."""
    saved = {k: v for key, item in saved.items() for k, v in flat(item, key).items()}  # older files nest them
    diffs = [f"{k} {saved.get(k)!r} in the checkpoint, {v!r} here" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise TrainingError(f"{path} does not fit this run: " + "; ".join(diffs[:3]) + more)


def check_stage1_flags(path, cfg, model):
    """Stage 2 goes on from the stage-1 model in `path`; flags that describe another model (its up-sampling, and
    the tiny preset's flat gate, pixel head and texture predictor) are refused rather than ignored."""
    recorded = json_object(read_metadata(path).get(METADATA_KEY, "{}"), path, f"'{METADATA_KEY}' metadata")
    if recorded.get("stage") == 2:
        raise TrainingError(f"{path} is a stage-2 model; stage 2 distils a stage-1 model (its teacher)")
    if cfg.preset == "tiny":  # `model` was rebuilt from the file
        saved = {"upsample": model.upsample, "flat_gate": model.flat_gate,
                 "pixel_head": model.config_dict()["pixel_head"], "texture": model.config_dict()["texture"]}
    else:  # `model` was built from the flags; the file's up-sampling is what loading it would use
        saved = {"upsample": recorded_upsample(path)}
    check_resumable(path, saved, {name: getattr(cfg, name) for name in saved})


def load_optimizer(optimizer, saved):
    """The saved moments and step counts, with this run's hyperparameters: a changed --lr takes effect."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def trim_history(out_dir, stage, step):
    """Keep what OUT_DIR says about the steps up to (stage, step), the steps after it being about to be (re)done
    (a resumed or --overwrite run): the log's lines and the validation grids of later steps go."""
    trim_log(os.path.join(out_dir, "log.jsonl"), stage, step)
    for path in grids_after(out_dir, stage, step):
        os.remove(path)


def trim_log(path, stage, step):
    """Keep the log lines up to (stage, step): the steps after it are about to be (re)done."""
    def keep(line):
        try:
            record = json.loads(line)
            return (record["stage"], record["step"]) <= (stage, step)
        except (ValueError, KeyError, TypeError):
            return False  # a line torn by a kill
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = "".join(filter(keep, f)).encode()
        write_atomic(path, lambda out: out.write(kept))


def load_into(stage, path, signature, teacher, cfg, say):
    """Load the state file into train.Stage `stage`, refusing another model's or one distilled from another
    teacher (`teacher`: the stage-1 file's digest in stage 2); returns (step, the open log window's state or None)."""
    state = load_state(path)
    check_resumable(path, json.loads(state["signature"]), signature)
    if state.get("teacher_digest", teacher) != teacher:
        raise TrainingError(f"{path} was distilled from another stage-1 model than {stage1_path(cfg)}; "
                            "move it away to start stage 2 over")
    old = json.loads(state["config"])
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in old and old[k] != v and k not in ("resume", "overwrite")
               and not (k in ("data", "val_data") and old[k] and v and path_key(old[k]) == path_key(v))]
    if set(state["model"]) != {n for n, p in stage.model.named_parameters() if p.requires_grad}:
        raise TrainingError(f"{path}: its trainable weights do not match this run's model"
                            + (f" (changed settings: {', '.join(changed)})" if changed else ""))
    if changed:
        say("note: resuming with changed settings: " + ", ".join(changed))
    loaders = {"model": lambda s: stage.model.load_state_dict(s, strict=False),  # the frozen rest is rebuilt as it was
               "optimizer": lambda s: load_optimizer(stage.optimizer, s),
               "d_optimizer": lambda s: load_optimizer(stage.d_optimizer, s)}
    for name in ("model", "optimizer", *OPTIONAL_PARTS):
        if name in state and getattr(stage, name) is not None:  # either side may be without a d_optimizer
            try:
                loaders.get(name, getattr(stage, name).load_state_dict)(state[name])
            except (ValueError, RuntimeError, KeyError) as e:  # what modules, optimizers and views raise
                raise TrainingError(f"{path}: its {name} does not fit this run ({first_line(e)})") from None
    say(f"resumed stage {stage.number} at step {state['step']} from {path}")
    return state["step"], state.get("window")


class Checkpoints:
    """The checkpoints of train.Stage `stage` in --out-dir: the model file stage{N}.safetensors, then the training
    state stage{N}_state.pt, which commits the checkpoint, so that a failed or killed write leaves the last one
    intact. Rank 0 writes; every rank learns whether that worked."""

    def __init__(self, cfg, stage, ranks, total=None):
        self.cfg, self.stage, self.ranks, self.total = cfg, stage, ranks, total  # total: the stage's last step
        self.model_path = os.path.join(cfg.out_dir, f"stage{stage.number}.safetensors")
        self.state_path = os.path.join(cfg.out_dir, f"stage{stage.number}_state.pt")
        self.signature = model_signature(cfg, stage.model)
        # the teacher's weights, not the file's bytes: a lost stage-1 file written again on --resume is the same
        self.teacher = tensors_digest(stage1_path(cfg)) if stage.number == 2 else None
        self.saved_step = None

    def resume(self, say):
        """(step, log window) to go on from: the state file's with --resume (when there is one), else (0, empty)."""
        if not (self.cfg.resume and os.path.exists(self.state_path)):
            if self.stage.number == 2:
                init = stage1_path(self.cfg)
                recorded = json_object(read_metadata(init).get(METADATA_KEY, "{}"), init, f"'{METADATA_KEY}' metadata")
                if (recorded.get("step") or 0) < (recorded.get("steps") or 0):  # older files have no "steps"
                    say(f"note: {init} is stage 1 at step {recorded['step']} of {recorded['steps']} (stopped early); "
                        "stage 2 distils it as it is")
            if self.cfg.resume:
                replaced = f" ({self.model_path}, written without it, is replaced)" if os.path.exists(
                    self.model_path) else ""
                say(f"note: --resume: no {self.state_path}; stage {self.stage.number} starts at step 0{replaced}")
            return 0, LogWindow()
        self.saved_step, window = load_into(self.stage, self.state_path, self.signature, self.teacher, self.cfg, say)
        if self.ranks.rank == 0 and not os.path.exists(self.model_path):  # the state holds its weights
            self.write_model(self.saved_step)
            say(f"note: {self.model_path} was missing; written again from {self.state_path}")
        if self.ranks.world > 1:
            torch.distributed.barrier()  # the other ranks' stage 2 may read it next
        return self.saved_step, LogWindow(window)

    def save(self, step, window):
        """Write the checkpoint of `step`; a failed write raises TrainingError, naming the step still saved."""
        error = None
        if self.ranks.rank == 0:
            try:
                self.write_model(step)
                save_state(self.state_path, self.state(step, window))
            except OSError as e:
                error = first_line(e)
        if self.ranks.any(error is not None):
            kept = (f"{self.state_path} still holds step {self.saved_step}" if self.saved_step is not None
                    else "no earlier checkpoint of this stage")
            what = f"could not save the stage {self.stage.number} checkpoint of step {step}"
            raise TrainingError(f"{what} ({error}); {kept}" if self.ranks.rank == 0 else f"rank 0 {what}; {kept}")
        self.saved_step = step

    def write_model(self, step):
        """The tiny preset's whole model, or the sd21 preset's LoRA; the metadata holds the run's config."""
        extra = {"stage": self.stage.number, "step": step, "steps": self.total,
                 "train_config": dataclasses.asdict(self.cfg)}
        if self.cfg.preset == "tiny":
            self.stage.model.save(self.model_path, extra)
        else:
            self.stage.model.save_lora(self.model_path, self.cfg.lora_rank, self.cfg.vae_lora_rank, extra)

    def state(self, step, window):
        """What the state file holds (see the top of this file)."""
        stage = self.stage
        state = {"step": step, "signature": json.dumps(self.signature), "teacher_digest": self.teacher,
                 "config": json.dumps(dataclasses.asdict(self.cfg)),
                 "model": {n: p.detach().cpu() for n, p in stage.model.named_parameters() if p.requires_grad},
                 "optimizer": stage.optimizer.state_dict(), "window": window.state_dict()}
        for name in OPTIONAL_PARTS:
            if getattr(stage, name) is not None:
                state[name] = getattr(stage, name).state_dict()
        return state
