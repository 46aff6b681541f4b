"""train.py under stress: exact resume, kills, signals, a full disk, NaN losses, two ranks.

Every check compares against one uninterrupted run of the same tiny config (both stages, 4 steps each, on
small crops of the shipped photos): a run that was cut short and resumed must end with the same weights,
training state and log, bit for bit.
"""
import contextlib
import errno
import io
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from plumbing import training, weights
from consistency import ConsistencyFlowDistillation
from flow import RectifiedSRFlow
from test_train import photos, run  # noqa: F401 (photos: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # per stage; checkpoints every 2 steps


def args(photos, out, *extra):
    return ["--data", str(photos), "--val-data", str(photos), "--out-dir", str(out), "--crop-size", "32",
            "--batch-size", "2", "--max-steps", str(STEPS), "--num-workers", "0", "--log-every", "1",
            "--val-every", "3", "--ckpt-every", "2", *extra]


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    model, _ = run(args(photos, out))
    assert isinstance(model, torch.nn.Module)
    return out


def log_of(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def same(a, b):
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_same_run(out, reference):
    """Same log, same model files, same training state (weights, AdamW moments, EMA target, discriminator)."""
    assert log_of(out) == log_of(reference)
    assert [(r["stage"], r["step"]) for r in log_of(out)] == [(s, n) for s in (1, 2) for n in range(1, STEPS + 1)]
    for stage in (1, 2):
        name = f"stage{stage}.safetensors"
        assert same(load_file(os.path.join(out, name)), load_file(os.path.join(reference, name))), name
        state, expected = (torch.load(os.path.join(d, f"stage{stage}_state.pt"), weights_only=True)
                           for d in (out, reference))
        assert state["step"] == expected["step"] == STEPS
        for key in ("model", "optimizer", "target", "discriminator", "d_optimizer", "window"):
            assert same(state.get(key), expected.get(key)), f"stage {stage} state: {key} differs"


def signal_at(monkeypatch, method, call, sig):
    """Send `sig` to this process from inside the `call`-th loss evaluation of `method`."""
    original, calls = method.loss, itertools.count(1)

    def loss(self, *a, **k):
        if next(calls) == call:
            os.kill(os.getpid(), sig)
        return original(self, *a, **k)
    monkeypatch.setattr(method, "loss", loss)


@pytest.mark.parametrize("method, sig", [(RectifiedSRFlow, signal.SIGINT),
                                         (ConsistencyFlowDistillation, signal.SIGTERM)])
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(photos, reference, tmp_path, monkeypatch,
                                                                   method, sig):
    handler = signal.getsignal(signal.SIGINT)
    signal_at(monkeypatch, method, 3, sig)
    stopped, stdout = run(args(photos, tmp_path))
    monkeypatch.undo()
    assert isinstance(stopped, SystemExit) and stopped.code == 0
    stage = 1 if method is RectifiedSRFlow else 2
    assert f"saved stage {stage} at step 3/{STEPS}" in stdout
    assert stdout.splitlines()[-1] == f"saved: {tmp_path / f'stage{stage}.safetensors'}"
    state = torch.load(tmp_path / f"stage{stage}_state.pt", weights_only=True)
    assert state["step"] == 3 and state["optimizer"]["state"][0]["step"] == 3  # AdamW's own count
    assert signal.getsignal(signal.SIGINT) is handler  # train.main gives the handlers back
    grid = tmp_path / "val" / f"stage{stage}_000003.png"  # of the step resumed from: not done again, so it stays
    written = grid.read_bytes()
    model, stdout = run(args(photos, tmp_path, "--resume"))
    assert isinstance(model, torch.nn.Module)
    assert f"resumed stage {stage} at step 3" in stdout
    assert grid.read_bytes() == written
    assert_same_run(tmp_path, reference)


def test_stages_run_one_at_a_time_equal_both_at_once(photos, reference, tmp_path):
    """Stage 2 in a fresh process (its teacher from the stage-1 file) starts exactly where `--stage both` does."""
    for stage in ("1", "2"):
        torch.randn(7)  # whatever this process drew before, fresh weights come from --seed
        model, _ = run(args(photos, tmp_path, "--stage", stage))
        assert isinstance(model, torch.nn.Module)
    assert_same_run(tmp_path, reference)


def test_resume_inside_a_log_window_logs_the_whole_window(photos, reference, tmp_path, monkeypatch):
    signal_at(monkeypatch, RectifiedSRFlow, 3, signal.SIGINT)
    stopped, _ = run(args(photos, tmp_path, "--stage", "1", "--log-every", "4"))
    monkeypatch.undo()
    assert isinstance(stopped, SystemExit) and stopped.code == 0 and not (tmp_path / "log.jsonl").exists()
    model, _ = run(args(photos, tmp_path, "--stage", "1", "--log-every", "4", "--resume"))
    assert isinstance(model, torch.nn.Module)
    (logged,), steps = log_of(tmp_path), log_of(reference)[:STEPS]
    assert logged["step"] == STEPS and logged["loss"] == sum((r["loss"] for r in steps), 0.0) / STEPS


def subprocess_env():
    # one thread, like this process (conftest): float sums in another order would not compare bit for bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(argv, stdout, stderr=subprocess.DEVNULL):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=subprocess_env(),
                            stdout=stdout, stderr=stderr, start_new_session=True)


def wait_for_log_lines(process, out, n, timeout=60):
    """Until log.jsonl has n lines (or the run ended): a moment inside training."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            with open(os.path.join(out, "log.jsonl")) as f:
                if sum(1 for _ in f) >= n:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.02)


def test_killed_at_random_moments_resumes_to_the_same_weights(photos, reference, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"kill moments from seed {seed}")
    killed = 0
    for target in sorted(rng.sample(range(1, 2 * STEPS), 3)):  # log lines before the kill, then a random delay
        process = start(args(photos, tmp_path, "--resume"), subprocess.DEVNULL)
        wait_for_log_lines(process, tmp_path, target)
        time.sleep(rng.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        killed += process.wait(timeout=60) == -signal.SIGKILL
    assert killed >= 1
    model, stdout = run(args(photos, tmp_path, "--resume"))
    assert isinstance(model, torch.nn.Module) and "resumed stage" in stdout  # the last kill came after step 2
    assert_same_run(tmp_path, reference)


def test_sigterm_saves_and_exits_cleanly(photos, reference, tmp_path):
    """SIGTERM to the whole process group, as `kill -- -PGID` or a cluster scheduler sends it: the DataLoader
    worker gets it too, and must leave the stopping to the main process. The log (stdout and stderr in one file,
    as `> log 2>&1` makes it) ends with "saved:" on a line of its own, not after the progress bar."""
    with open(tmp_path / "stdout.txt", "w") as stdout:
        process = start(args(photos, tmp_path, "--num-workers", "1"), stdout, subprocess.STDOUT)
        wait_for_log_lines(process, tmp_path, 2)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    lines = (tmp_path / "stdout.txt").read_text().splitlines()
    assert any(line.startswith("interrupted: saved stage") for line in lines)
    assert lines[-1].startswith("saved: ") and os.path.isfile(lines[-1][len("saved: "):])
    model, _ = run(args(photos, tmp_path, "--resume"))
    assert isinstance(model, torch.nn.Module)
    assert_same_run(tmp_path, reference)


def disk_full_at(suffix):
    """The second write of OUT_DIR/<suffix> fails as on a full disk: half the temporary file written, then ENOSPC."""
    def inject(monkeypatch):
        original, calls = weights.rename_durably, itertools.count(1)

        def rename_durably(tmp, path):
            if path.endswith(suffix) and next(calls) == 2:
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(tmp, path)
        monkeypatch.setattr(weights, "rename_durably", rename_durably)
    return inject


disk_full_in_export = disk_full_at("stage1.safetensors")
disk_full_in_state = disk_full_at("stage1_state.pt")


@pytest.mark.parametrize("failure", [disk_full_in_export, disk_full_in_state])
def test_failed_checkpoint_write_stops_and_keeps_the_previous_one(photos, reference, tmp_path, monkeypatch, failure):
    failure(monkeypatch)
    stopped, _ = run(args(photos, tmp_path))
    monkeypatch.undo()
    state_path = tmp_path / "stage1_state.pt"
    assert isinstance(stopped, SystemExit) and isinstance(stopped.code, str)
    assert stopped.code.startswith("error: could not save the stage 1 checkpoint of step 4 (")
    assert "No space left on device" in stopped.code and "\n" not in stopped.code
    assert stopped.code.endswith(f"; {state_path} still holds step 2")
    assert torch.load(state_path, weights_only=True)["step"] == 2
    meta = json.loads(weights.read_metadata(tmp_path / "stage1.safetensors")["flowsr_model"])
    assert meta["step"] == (2 if failure is disk_full_in_export else 4)  # the model file is written first
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    assert not (tmp_path / "stage2.safetensors").exists()
    model, _ = run(args(photos, tmp_path, "--resume"))
    assert isinstance(model, torch.nn.Module)
    assert_same_run(tmp_path, reference)


def nan_from(monkeypatch, bad_calls):
    """Stage-1 losses of the given calls become NaN (as from a diverging model)."""
    original, calls = RectifiedSRFlow.loss, itertools.count(1)

    def loss(self, *a, **k):
        value, per_sample, stats, *rest = original(self, *a, **k)
        if next(calls) in bad_calls:
            value = value * float("nan")
        return (value, per_sample, stats, *rest)
    monkeypatch.setattr(RectifiedSRFlow, "loss", loss)


def test_nonfinite_loss_skips_the_step(photos, tmp_path, monkeypatch):
    nan_from(monkeypatch, {2})
    model, stdout = run(args(photos, tmp_path, "--stage", "1"))
    assert isinstance(model, torch.nn.Module)
    assert stdout.count("non-finite") == 1 and "stage 1 step 2: non-finite loss" in stdout
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in log_of(tmp_path)] == [1, 3, 4]  # the skipped step logs nothing
    assert torch.load(tmp_path / "stage1_state.pt", weights_only=True)["optimizer"]["state"][0]["step"] == 3


def test_nonfinite_losses_in_a_row_stop_with_the_last_good_state(photos, tmp_path, monkeypatch):
    good, _ = run(args(photos, tmp_path / "good", "--stage", "1", "--max-steps", "2"))
    nan_from(monkeypatch, set(range(3, 100)))
    stopped, stdout = run(args(photos, tmp_path / "bad", "--stage", "1", "--max-steps", "10", "--ckpt-every", "100",
                               "--max-bad-steps", "3"))
    state_path = tmp_path / "bad" / "stage1_state.pt"
    assert isinstance(stopped, SystemExit) and isinstance(stopped.code, str) and "\n" not in stopped.code
    assert stopped.code.startswith("error: stage 1 step 5: 3 non-finite losses in a row")
    assert str(state_path) in stopped.code and stdout.count("non-finite") == 3
    state = torch.load(state_path, weights_only=True)
    expected = torch.load(tmp_path / "good" / "stage1_state.pt", weights_only=True)
    assert state["step"] == 5  # the NaN batches are used up: a resume goes on after them
    assert same(state["model"], expected["model"]) and same(state["optimizer"], expected["optimizer"])


# ---- two ranks ------------------------------------------------------------------------------------------

def rank_worker(rank, port, argvs, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        model = train.main(argvs[rank])
    torch.save({"weights": model.state_dict(), "stdout": out.getvalue()}, os.path.join(result_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_end_with_the_same_weights_and_only_rank0_writes(photos, tmp_path):
    def both_ranks(*extra):  # each rank its own --out-dir, to see that rank 1 writes nothing
        argvs = [args(photos, tmp_path / f"rank{rank}", "--max-steps", "2", *extra) for rank in (0, 1)]
        torch.multiprocessing.start_processes(rank_worker, args=(free_port(), argvs, str(tmp_path)), nprocs=2,
                                              start_method="spawn")
        return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    results = both_ranks("--stage", "1")
    assert same(results[0]["weights"], results[1]["weights"])
    init = tmp_path / "rank0" / "stage1.safetensors"  # stage 2 of both ranks reads rank 0's stage-1 file
    results = both_ranks("--stage", "2", "--init", str(init))
    assert not (tmp_path / "rank1").exists()  # rank 1 wrote nothing
    assert results[1]["stdout"] == "" and results[0]["stdout"].splitlines()[-1].startswith("saved: ")
    assert same(results[0]["weights"], results[1]["weights"])
    saved = load_file(tmp_path / "rank0" / "stage2.safetensors")
    assert same({k: v for k, v in results[1]["weights"].items() if k.startswith("unet.")},
                {k: v for k, v in saved.items() if k.startswith("unet.")})


def test_out_dir_that_is_a_file_inside_the_data_or_in_use_is_one_line(photos, tmp_path):
    from test_train import one_line_error
    (tmp_path / "file").write_text("not a folder")
    result, _ = run(args(photos, tmp_path / "file"))
    one_line_error(result, f"--out-dir {tmp_path / 'file'}:")
    result, _ = run(args(photos, photos / "run"))  # its val/*.png grids would be listed as training photos
    one_line_error(result, f"--out-dir {photos / 'run'} is inside --data {photos}")
    assert not (photos / "run").exists()
    import fcntl
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "w") as lock:  # what a second train.py on the same folder would meet
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result, _ = run(args(photos, tmp_path / "busy"))
    one_line_error(result, f"--out-dir {tmp_path / 'busy'}: another train.py is writing into it")
    result, stdout = run(args(photos, tmp_path / "anywhere", "--data", "/"))  # every folder is inside /
    one_line_error(result, "is inside --data /")
    assert "skipping" not in stdout  # refused before a single photo of / was read


def test_a_new_run_does_not_replace_an_earlier_one_without_overwrite(photos, tmp_path):
    """Checkpoints of a stage to train are refused without --resume or --overwrite: a fresh run's first checkpoint
    would replace them. Only the stages this run trains count."""
    from test_train import one_line_error
    out = tmp_path / "out"
    model, _ = run(args(photos, out, "--stage", "1", "--max-steps", "1"))
    assert isinstance(model, train.FlowSR), model
    earlier = (out / "stage1.safetensors").read_bytes()
    result, _ = run(args(photos, out, "--seed", "1"))
    one_line_error(result, f"{out / 'stage1.safetensors'} is there from an earlier run", "--resume", "--overwrite")
    assert (out / "stage1.safetensors").read_bytes() == earlier and not (out / "stage2.safetensors").exists()
    model, _ = run(args(photos, out, "--stage", "2", "--max-steps", "1"))  # stage 2 from it: nothing replaced
    assert isinstance(model, train.FlowSR), model
    result, _ = run(args(photos, out, "--stage", "1", "--resume", "--overwrite"))
    one_line_error(result, "--resume goes on from the checkpoints that --overwrite would replace")
    assert (out / "val" / "stage2_000001.png").exists()
    model, _ = run(args(photos, out, "--stage", "1", "--max-steps", "1", "--seed", "1", "--overwrite"))
    assert isinstance(model, train.FlowSR), model
    assert (out / "stage1.safetensors").read_bytes() != earlier
    # the stage-2 grid showed the replaced teacher's student: it goes with the log lines after stage 1's start
    assert sorted(os.listdir(out / "val")) == ["stage1_000001.png"]
    (out / "stage2.safetensors").unlink()  # a state file alone is an earlier run too
    result, _ = run(args(photos, out, "--stage", "2", "--max-steps", "1"))
    one_line_error(result, f"{out / 'stage2_state.pt'} is there from an earlier run")
    (out / "stage1_state.pt").unlink()  # a checkpoint whose commit was cut short (killed between the two files)
    model, stdout = run(args(photos, out, "--stage", "1", "--max-steps", "1", "--resume"))
    assert isinstance(model, train.FlowSR) and f"no {out / 'stage1_state.pt'}; stage 1 starts at step 0 (" \
        f"{out / 'stage1.safetensors'}, written without it, is replaced)" in stdout


def test_unset_values_are_the_presets(tmp_path):
    """The blurred-smooth share of crops is the tiny preset's choice (SPEC 1); sd21 trains as SPEC 6 says."""
    for preset, argv in (("tiny", []), ("sd21", ["--base", str(tmp_path)])):
        cfg = train.parse(train.TrainConfig, ["--preset", preset, *argv])
        training.setup(cfg, train.PRESETS)
        assert cfg.flat_prob == train.PRESETS[preset]["flat_prob"] and cfg.batch_size == train.PRESETS[preset][
            "batch_size"] and cfg.degradation == train.PRESETS[preset]["degradation"]
    assert train.PRESETS["tiny"]["flat_prob"] == 0.3 and train.PRESETS["sd21"]["flat_prob"] == 0
    cfg = train.parse(train.TrainConfig, ["--flat-prob", "0"])
    training.setup(cfg, train.PRESETS)
    assert cfg.flat_prob == 0  # 0 is a value, not "unset"
    with pytest.raises(train.TrainingError, match=r"--flat-prob -0\.5: must be in \[0, 1\] \(-1: the preset's\)"):
        training.setup(train.parse(train.TrainConfig, ["--flat-prob", "-0.5"]), train.PRESETS)


def test_out_dir_inside_the_data_in_another_case_where_case_is_ignored(photos, tmp_path, monkeypatch):
    """macOS and Windows file systems ignore case: PHOTOS/run is inside photos/ there."""
    from test_train import one_line_error
    monkeypatch.setattr(sys, "platform", "darwin")
    out = os.path.join(os.path.dirname(photos), os.path.basename(photos).upper(), "run")
    result, _ = run(args(photos, out))
    one_line_error(result, f"--out-dir {out} is inside --data {photos}")


def test_out_dir_on_another_drive_than_the_data_trains(photos, tmp_path, monkeypatch):
    """On Windows two drives have no common path (os.path.commonpath raises ValueError): not "inside --data"."""
    out = tmp_path / "out"

    def drive(path):
        return ("D:" if os.fspath(path).startswith(os.fspath(out)) else "C:"), os.fspath(path)

    def no_common_path(paths):
        raise ValueError("Paths don't have the same drive")
    monkeypatch.setattr(os.path, "splitdrive", drive)
    monkeypatch.setattr(os.path, "commonpath", no_common_path)
    model, _ = run(args(photos, out, "--stage", "1", "--max-steps", "1"))
    assert isinstance(model, train.FlowSR), model


def test_a_file_system_without_locks_trains_unguarded(photos, tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    model, _ = run(args(photos, tmp_path / "out", "--stage", "1", "--max-steps", "1"))
    assert isinstance(model, train.FlowSR)


def test_windows_runs_lock_the_out_dir_with_msvcrt(photos, tmp_path, monkeypatch):
    """Without fcntl (Windows) the lock is msvcrt's, on the .lock file's first byte: taken without waiting, held
    for the run, released before the file closes; a lock another process holds refuses the run in one line."""
    import builtins
    import sys
    import types
    from test_train import one_line_error
    calls, held_elsewhere = [], set()

    def locking(fd, mode, nbytes):
        lock_file = os.fstat(fd).st_ino
        calls.append((mode, nbytes, os.lseek(fd, 0, os.SEEK_CUR)))
        if mode == msvcrt.LK_NBLCK and lock_file in held_elsewhere:
            raise OSError(errno.EACCES, "Permission denied")
    msvcrt = types.SimpleNamespace(LK_UNLCK=0, LK_NBLCK=2, locking=locking)
    real_import = builtins.__import__

    def windows_import(name, globals=None, *args, **kwargs):  # the lock's `import fcntl` fails, as on Windows
        if name == "fcntl" and (globals or {}).get("__name__") == "plumbing.trainstate":
            raise ImportError("No module named 'fcntl'")
        return real_import(name, globals, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", windows_import)  # (tqdm's own `import fcntl` keeps working)
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").write_text("not empty")  # the locked byte is still the first
    model, _ = run(args(photos, tmp_path / "out", "--stage", "1", "--max-steps", "1"))
    assert isinstance(model, train.FlowSR) and calls == [(msvcrt.LK_NBLCK, 1, 0), (msvcrt.LK_UNLCK, 1, 0)]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".lock").write_text("")
    held_elsewhere.add(os.stat(tmp_path / "busy" / ".lock").st_ino)
    result, _ = run(args(photos, tmp_path / "busy", "--stage", "1", "--max-steps", "1"))
    one_line_error(result, f"--out-dir {tmp_path / 'busy'}: another train.py is writing into it")
    assert not (tmp_path / "busy" / "stage1.safetensors").exists()


def test_photos_that_break_during_training_stop_in_one_line_and_stop_the_workers(tmp_path):
    import multiprocessing
    from PIL import Image
    from data import HRFolderDataset
    from test_train import one_line_error
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (48, 48), (90, 120, 30)).save(data / f"{name}.png")
    real_probe = HRFolderDataset.__init__

    def break_after_the_check(self, *a, **k):  # readable at start (the probe), truncated before the first batch
        real_probe(self, *a, **k)
        for path in data.iterdir():
            path.write_bytes(path.read_bytes()[:60])
    HRFolderDataset.__init__ = break_after_the_check
    try:
        result, _ = run(args(data, tmp_path / "out", "--num-workers", "1", "--val-data", ""))
    finally:
        HRFolderDataset.__init__ = real_probe
    one_line_error(result, f"{data}: no readable image left")
    assert "\n" not in result.code and not multiprocessing.active_children()  # an exit would wait on them


def test_a_grid_that_cannot_be_written_is_a_warning(photos, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val").write_text("a file where the grids' folder goes")
    model, stdout = run(args(photos, tmp_path / "out", "--stage", "1", "--max-steps", "3"))
    assert isinstance(model, train.FlowSR) and (tmp_path / "out" / "stage1_state.pt").exists()
    assert "warning: no validation grid:" in stdout


def test_stage2_resumes_only_with_its_own_teacher_and_a_lost_model_file_is_written_again(photos, tmp_path):
    from test_train import one_line_error
    out = tmp_path / "out"
    assert isinstance(run(args(photos, out, "--max-steps", "1"))[0], train.FlowSR)
    os.remove(out / "stage1.safetensors")
    model, stdout = run(args(photos, out, "--max-steps", "1", "--stage", "1", "--resume"))
    assert isinstance(model, train.FlowSR) and (out / "stage1.safetensors").exists()
    assert f"note: {out / 'stage1.safetensors'} was missing; written again from {out / 'stage1_state.pt'}" in stdout
    model, _ = run(args(photos, out, "--max-steps", "1", "--resume"))  # the same weights: the same teacher
    assert isinstance(model, train.FlowSR)
    model, _ = run(args(photos, out, "--max-steps", "2", "--stage", "1", "--resume"))  # another teacher now
    assert isinstance(model, train.FlowSR)
    result, _ = run(args(photos, out, "--max-steps", "2", "--resume"))
    one_line_error(result, f"{out / 'stage2_state.pt'} was distilled from another stage-1 model than "
                           f"{out / 'stage1.safetensors'}")
    result, _ = run(args(photos, tmp_path / "again", "--stage", "2", "--init", str(out / "stage2.safetensors")))
    one_line_error(result, f"{out / 'stage2.safetensors'} is a stage-2 model")


class WarningDataset(torch.utils.data.Dataset):
    """Items that warn as a photo that cannot be read does."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import warnings
        warnings.warn(f"skipping photo{i}.png: not a readable image")
        return {"hr": torch.zeros(3, 4, 4), "lr": torch.zeros(3, 1, 1)}


@pytest.mark.parametrize("workers", [0, 1])
def test_warnings_while_training_are_one_line_each(capfd, workers):
    from plumbing.training import batches
    assert len(list(batches(WarningDataset(), 2, 0, 2, 0, 1, workers))) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert sorted(lines) == [f"warning: skipping photo{i}.png: not a readable image" for i in range(4)]


@pytest.mark.parametrize("nccl", [True, False])
def test_process_group_backend_is_one_the_platform_has(monkeypatch, nccl):
    """NCCL exists on Linux only: CUDA ranks elsewhere (Windows) use gloo; MPS has no backend and is refused."""
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(training.dist, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(training.dist, "init_process_group", backends.append)
    training.Ranks.start("cuda")
    assert backends == ["nccl" if nccl else "gloo"]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for device in ("mps", "mps:0"):
        with pytest.raises(training.TrainingError, match=r"--device mps trains in one process"):
            training.Ranks.start(device)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_workers_are_created_with_the_stop_signals_blocked_and_none_is_lost(photos, monkeypatch):
    """A spawned worker (macOS) imports torch for seconds before init_worker runs, and a Ctrl-C then killed it and
    the run. Workers are created with SIGINT / SIGTERM blocked (they keep that mask); a signal that comes
    meanwhile reaches the run's handler once they are unblocked: the run still saves and stops."""
    from data import HRFolderDataset
    blocked, real_iter = [], torch.utils.data.DataLoader.__iter__

    def iter_under_a_sigterm(loader):
        blocked.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # the mask now
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's SIGTERM while the workers start
        return real_iter(loader)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iter_under_a_sigterm)
    dataset = HRFolderDataset(str(photos), 32, 4, "bicubic", seed=0, length=4)
    with training.Interrupted() as interrupted:
        generator = training.batches(dataset, 2, 0, 2, 0, 1, num_workers=1)
        assert next(generator)["hr"].shape == (2, 3, 32, 32)
        generator.close()
        assert interrupted.requested  # delivered after the unblock, not lost
    assert set(training.STOP_SIGNALS) <= blocked[0]
    assert not set(training.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # unblocked again


def test_a_second_ctrl_c_stops_at_once_in_one_line():
    """The first Ctrl-C asks for a save at the end of the step; a second one (while that checkpoint is written,
    say) stops at once: one TrainingError line, which train.py prints, not a traceback."""
    with pytest.raises(training.TrainingError, match="stopped at once by a Ctrl-C after the stop request; .*resume"):
        with training.Interrupted() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupted.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises at the next bytecode; never reached
    with pytest.raises(KeyboardInterrupt):  # a KeyboardInterrupt of another cause is left alone
        with training.Interrupted():
            raise KeyboardInterrupt


def test_time_buckets_without_examples_are_shown_as_such(tmp_path):
    """A window whose times never fell in a bucket (--p-fast 1 never draws t < 0.25): '-' and null, not a
    loss of 0."""
    from plumbing.training import LogWindow, StepReport
    window, lines = LogWindow(), []
    report = StepReport(1)
    report.add(torch.tensor(1.0), torch.tensor([0.5, 0.25]), {"loss": 1.0}, torch.tensor([0.3, 0.9]))
    window.add(report)
    window.log(2, 10, 20, 1.0, lines.append, tmp_path / "log.jsonl")
    assert "loss by t: - 0.5000 - 0.2500 |" in lines[0]
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss_by_t"] == [None, 0.5, None, 0.25]


def test_resume_that_would_retrain_stage1_under_a_distilled_stage2_is_refused_at_start(photos, tmp_path):
    """A finished run resumed with more steps: stage 1 would train on, and only then would stage 2 find that it
    distils another model. Refused before anything changes; each stage alone may go on."""
    from test_train import one_line_error
    out = tmp_path / "out"
    model, _ = run(args(photos, out, "--max-steps", "1"))
    assert isinstance(model, train.FlowSR)
    before = {name: (out / name).read_bytes() for name in ("stage1.safetensors", "stage2_state.pt")}
    result, _ = run(args(photos, out, "--max-steps", "2", "--resume"))
    one_line_error(result, "stage 1 would train on from step 1 to 2", "stage2_state.pt", "--stage 1 or --stage 2")
    assert all((out / name).read_bytes() == data for name, data in before.items())
    os.rename(out / "stage1_state.pt", tmp_path / "stage1_state.pt")  # without it stage 1 starts over
    result, _ = run(args(photos, out, "--max-steps", "1", "--resume"))
    one_line_error(result, "stage 1 would train on from step 0 to 1")
    assert all((out / name).read_bytes() == data for name, data in before.items())
    os.rename(tmp_path / "stage1_state.pt", out / "stage1_state.pt")
    model, _ = run(args(photos, out, "--max-steps", "2", "--resume", "--stage", "2"))
    assert isinstance(model, train.FlowSR)


def test_a_folder_named_another_way_is_no_changed_setting(photos, tmp_path, monkeypatch):
    """Resuming with --data given relative where the run had it absolute (or the old relative defaults against
    today's absolute ones) names the same folder: no "changed settings" note; another folder is noted."""
    out = tmp_path / "out"
    assert isinstance(run(args(photos, out, "--stage", "1", "--max-steps", "1"))[0], train.FlowSR)
    monkeypatch.chdir(photos.parent)
    _, stdout = run(args(os.path.basename(photos), out, "--stage", "1", "--max-steps", "2", "--resume"))
    note = next(line for line in stdout.splitlines() if "changed settings" in line)
    assert "resumed stage 1 at step 1" in stdout and note.endswith("changed settings: max_steps 1 -> 2")
    other = tmp_path / "other"
    shutil.copytree(photos, other)
    _, stdout = run(args(other, out, "--stage", "1", "--max-steps", "3", "--resume"))
    assert f"data {os.path.basename(photos)!r} -> {str(other)!r}" in stdout


def test_stage2_from_a_stage1_stopped_early_says_so(photos, tmp_path):
    """The stage-1 file records its step and its run's last step; stage 2 from one saved before the end (a run
    stopped with Ctrl-C) notes it, from a finished one it does not."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = tmp_path / "out"
    assert isinstance(run(args(photos, out, "--stage", "1", "--max-steps", "1"))[0], train.FlowSR)
    path = out / "stage1.safetensors"
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    recorded = json.loads(metadata["flowsr_model"])
    assert (recorded["step"], recorded["steps"]) == (1, 1)
    _, stdout = run(args(photos, tmp_path / "finished", "--stage", "2", "--max-steps", "1", "--init", str(path)))
    assert "stopped early" not in stdout
    save_file(tensors, path, {**metadata, "flowsr_model": json.dumps({**recorded, "steps": 5})})
    _, stdout = run(args(photos, tmp_path / "early", "--stage", "2", "--max-steps", "1", "--init", str(path)))
    assert f"note: {path} is stage 1 at step 1 of 5 (stopped early); stage 2 distils it as it is" in stdout


def test_trim_history_keeps_what_is_not_redone(tmp_path):
    """Log lines and validation grids after (stage, step) go, since those steps are about to be done again;
    earlier ones and files train.py does not name stay."""
    from plumbing.trainstate import trim_history
    (tmp_path / "val").mkdir()
    names = ["stage1_000250.png", "stage1_000500.png", "stage1_000750.png", "stage2_000001.png", "notes.png",
             "stage1_final.png"]
    for name in names:
        (tmp_path / "val" / name).write_bytes(b"")
    lines = [{"stage": 1, "step": 500}, {"stage": 1, "step": 750}, {"stage": 2, "step": 1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    trim_history(str(tmp_path), 1, 500)
    assert sorted(os.listdir(tmp_path / "val")) == ["notes.png", "stage1_000250.png", "stage1_000500.png",
                                                    "stage1_final.png"]
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == lines[:1]
    trim_history(str(tmp_path / "nothing_here"), 1, 0)  # a fresh --out-dir: nothing to trim
