"""Training: resume equivalence, EMA, DDP (2 processes, gloo) vs 1 process, atomic checkpoints, NaN stop, bad input."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoder as enc
import evaluate
import hierarchy as H
import sample
import train
from denoiser import Denoiser
from diffusion import Diffusion, cfg_weights

ROOT = Path(__file__).resolve().parent.parent
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
enc.register_model_config("tiny-clip-train", TINY)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 40-image two-class folder and its latent cache (tiny random encoder)."""
    tmp = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp / "imgs" / c).mkdir(parents=True)
        for k in range(20):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp / "imgs" / c / f"{k}.png")
    args = argv(tmp, level=1, depth=3)
    H.build_cache(H.resolve_defaults(args))
    return tmp


def argv(tmp, level, depth, *extra, run="runs"):
    return train.get_parser().parse_args([
        "--data", f"folder:{tmp / 'imgs'}", "--image-size", "16", "--clip", "tiny-clip-train", "--pretrained", "random",
        "--min-crop", "8", "--image-space", "pixels", "--cache-dir", str(tmp / "cache"), "--level", str(level), "--depth", str(depth),
        "--model", "tiny", "--batch-size", "8", "--warmup", "2", "--lr", "1e-3", "--ema", "0.9", "--ema-every", "1", "--log-every", "1",
        "--ckpt-every", "1000", "--device", "cpu", "--run-dir", str(tmp / run), *[str(e) for e in extra]])


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            states_equal(a[k], b[k])
        elif torch.is_tensor(a[k]):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        else:
            assert a[k] == b[k]


@pytest.mark.parametrize("level, cond", [(1, "none"), (2, "class")])
def test_resume_is_exact(workspace, level, cond):
    """6 steps straight equal 3 steps continued to 6, bit for bit; the EMA, folded in every 2nd step, is caught
    between two folds at step 3 (ema_step 2)."""
    straight = torch.load(train.train(argv(workspace, level, 3, "--steps", 6, "--cond", cond, "--ema-every", 2, run=f"s{level}")))
    half = torch.load(train.train(argv(workspace, level, 3, "--steps", 3, "--cond", cond, "--ema-every", 2, run=f"r{level}")))
    assert half["ema_step"] == 2
    resumed = torch.load(train.train(argv(workspace, level, 3, "--steps", 6, "--cond", cond, "--ema-every", 2, "--resume",
                                          run=f"r{level}")))
    assert straight["step"] == resumed["step"] == 6
    for part in ("model", "ema"):
        states_equal(straight[part], resumed[part])
    states_equal(straight["opt"]["state"], resumed["opt"]["state"])


def test_ema_update_closed_form():
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        ema.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    train.EMAUpdate(ema, model, background=False).update(0.9)
    torch.testing.assert_close(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    torch.testing.assert_close(ema.running_mean, torch.full((3,), 5.0))  # buffers copied


def test_ema_inline_and_in_background_pieces_agree_to_the_bit():
    """EMAUpdate: inline on whole tensors (CPU) and in a background thread over 16384-element pieces (GPU)."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 7))  # 60,000-element weight: 4 pieces
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    emas = [torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 7)) for _ in range(2)]
    emas[1].load_state_dict(emas[0].state_dict())
    updates = [train.EMAUpdate(emas[0], model, background=False), train.EMAUpdate(emas[1], model, background=True)]
    for decay in (0.2, 0.9, 0.999):
        for u in updates:
            u.update(decay)
    updates[1].wait()
    for a, b in zip(emas[0].parameters(), emas[1].parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(emas[0][0].weight, model[0].weight)


def test_level_keys_reuse_upper_levels(workspace):
    hier = H.Hierarchy(next((workspace / "cache").iterdir()))
    key = {(d, l): train.level_key(*train.level_plan(argv(workspace, l, d), hier), "none", "tiny")
           for d in (3, 4) for l in range(1, d + 1)}
    assert key[3, 3] == key[4, 4] and key[3, 2] == key[4, 3]   # same model: depth 4 reuses depth 3's upper levels
    assert key[3, 1] != key[4, 1]                               # the image level sees one more condition
    assert len({key[4, l] for l in range(1, 5)}) == 4


def test_trained_level_is_reused_not_retrained(workspace, capsys):
    path = train.train(argv(workspace, 3, 3, "--steps", 2, run="reuse"))
    stamp = path.stat().st_mtime_ns
    assert train.train(argv(workspace, 4, 4, "--steps", 2, run="reuse")) == path   # depth-4 top = depth-3 top
    assert path.stat().st_mtime_ns == stamp and "reused" in capsys.readouterr().out


def test_crash_while_saving_keeps_previous_checkpoint(workspace, monkeypatch):
    path = train.train(argv(workspace, 3, 3, "--steps", 2, run="crash"))
    good = torch.load(path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train.train(argv(workspace, 3, 3, "--steps", 4, "--resume", run="crash"))
    monkeypatch.undo()
    assert torch.load(path)["step"] == good["step"] == 2
    assert not list(path.parent.glob("*.tmp"))


def test_nan_loss_stops_cleanly(workspace, monkeypatch):
    path = train.train(argv(workspace, 3, 3, "--steps", 2, "--ckpt-every", 1, run="nan"))
    original = train.Diffusion.loss
    calls = []

    def loss(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw) * (float("nan") if len(calls) > 1 else 1.0)
    monkeypatch.setattr(train.Diffusion, "loss", loss)
    with pytest.raises(SystemExit, match="loss is nan on rank 0 at step 3"):
        train.train(argv(workspace, 3, 3, "--steps", 6, "--ckpt-every", 1, "--resume", run="nan"))
    assert torch.load(path)["step"] == 3  # the step before the NaN was saved, nothing after it


def test_nan_checked_late_names_its_step_and_saves_nothing_after_it(workspace, monkeypatch):
    """The NaN check runs when the loop logs or saves (here every 5 steps), not every step: it still reports
    the first bad step, and the checkpoint due after it is not written."""
    path = train.train(argv(workspace, 3, 3, "--steps", 2, run="nan-late"))
    original = train.Diffusion.loss
    calls = []

    def loss(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw) * (float("nan") if len(calls) == 2 else 1.0)  # step 3 only
    monkeypatch.setattr(train.Diffusion, "loss", loss)
    with pytest.raises(SystemExit, match="loss is nan on rank 0 at step 3;"):
        train.train(argv(workspace, 3, 3, "--steps", 12, "--log-every", 5, "--ckpt-every", 5, "--resume", run="nan-late"))
    assert len(calls) == 3 and torch.load(path)["step"] == 2  # stopped at the check after step 4; step 5 not saved


def _any_rank_worker(rank, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out[rank] = (train.any_rank(rank == 1, "cpu"), train.any_rank(False, "cpu"))
    torch.distributed.destroy_process_group()


def test_nan_on_one_rank_stops_every_rank():
    """any_rank: a flag raised on rank 1 only is seen by rank 0 too (so neither waits for the other)."""
    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_any_rank_worker, args=(29541, out), nprocs=2)
    assert dict(out) == {0: (True, False), 1: (True, False)}


@pytest.mark.parametrize("extra, message", [
    (("--level", 4), "outside 1..3"),
    (("--cond", "text"), "needs captions"),
    (("--sigma", 0.5), "takes 2 values"),
    (("--batch-size", 64), "fewer than one global batch"),
])
def test_bad_input(workspace, extra, message):
    with pytest.raises(data.UsageError, match=message):
        train.train(argv(workspace, 1, 3, "--steps", 1, *extra))  # the later flag wins


def test_existing_checkpoint_needs_resume(workspace):
    path = train.train(argv(workspace, 2, 3, "--steps", 2, run="exists"))
    stamp = path.stat().st_mtime_ns
    with pytest.raises(data.UsageError, match="--resume"):
        train.train(argv(workspace, 2, 3, "--steps", 4, run="exists"))
    assert path.stat().st_mtime_ns == stamp


def test_torchrun_two_processes_match_one(workspace):
    """With --seed 1: the model's initial weights do not depend on the number of processes."""
    one = torch.load(train.train(argv(workspace, 1, 3, "--steps", 3, "--seed", 1, run="ddp1")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "train.py",
           *sys_argv(argv(workspace, 1, 3, "--steps", 3, "--seed", 1, run="ddp2"))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    two = torch.load(next((workspace / "ddp2").glob("*/ckpt.pt")))
    for k in one["model"]:
        torch.testing.assert_close(one["model"][k], two["model"][k], rtol=1e-4, atol=1e-5)


def sys_argv(args):
    """Turn parsed args back into a command line (for the torchrun subprocess)."""
    out = []
    for flag in ("data", "image_size", "clip", "pretrained", "min_crop", "image_space", "cache_dir", "level", "depth", "model", "seed",
                 "batch_size", "warmup", "lr", "ema", "log_every", "ckpt_every", "device", "run", "steps"):
        out += [f"--{flag.replace('_', '-')}" if flag != "run" else "--run-dir", str(getattr(args, flag))]
    return out


def test_checkpoint_of_another_level_is_refused(workspace):
    top = train.train(argv(workspace, 3, 3, "--steps", 2, run="other"))
    hier = H.Hierarchy(next((workspace / "cache").iterdir()))
    key = train.level_key(*train.level_plan(argv(workspace, 2, 3), hier), "none", "tiny")
    (workspace / "other" / key).mkdir()
    (workspace / "other" / key / "ckpt.pt").write_bytes(top.read_bytes())   # level 3's weights where level 2's go
    with pytest.raises(data.UsageError, match="holds another model"):
        train.train(argv(workspace, 2, 3, "--steps", 4, "--resume", run="other"))
    assert (workspace / "other" / key / "ckpt.pt").read_bytes() == top.read_bytes()


def test_ema_every_n_steps_closed_form():
    """ema_decay_since is the product of the per-step decays (ema_decay itself for one step, to the bit); folded in
    every 3 steps it equals the every-step EMA when the weights do not change within the window."""
    assert train.ema_decay_since(0.9999, 7, 7) == train.ema_decay(0.9999, 7)
    assert train.ema_decay_since(0.999, 5, 8) == pytest.approx(6 / 15 * 7 / 16 * 8 / 17 * 9 / 18)
    model, every, once = (torch.nn.Linear(4, 3) for _ in range(3))
    once.load_state_dict(every.state_dict())
    each, third = train.EMAUpdate(every, model, background=False), train.EMAUpdate(once, model, background=False)
    for window in range(4):
        with torch.no_grad():
            model.weight.normal_()  # new weights at the first step of each window, kept for its 3 steps
        for step in range(3 * window, 3 * window + 3):
            each.update(train.ema_decay(0.999, step))
        third.update(train.ema_decay_since(0.999, 3 * window, 3 * window + 2))
    torch.testing.assert_close(once.weight, every.weight, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(once.weight, model.weight)


def test_ema_decay_warms_up_to_the_paper_value():
    assert train.ema_decay(0.9999, 0) == pytest.approx(0.1)
    assert train.ema_decay(0.9999, 90) == pytest.approx(91 / 100)
    assert train.ema_decay(0.9999, 10**6) == 0.9999
    assert all(train.ema_decay(0.999, k) == (1 + k) / (10 + k) for k in range(1000))  # power 8: the old rule, to the bit


def ema_weights(power, steps):
    """The weight each step's weights (and, first, the initial ones) have in the EMA after ``steps`` steps."""
    weights = np.zeros(steps + 1)
    weights[0] = 1.0
    for k in range(steps):
        d = train.ema_decay(0.9999, k, power)
        weights *= d
        weights[k + 1] += 1 - d
    return weights


@pytest.mark.parametrize("power", [0, 1, 2, 3])
def test_ema_power_weighs_step_k_as_a_power_of_k(power):
    """--ema-power p: before --ema binds, the weights after step k (0-based; k = -1: the initial weights) count
    ∝ (k+2)(k+3)…(k+p+1), the rising factorial that is k^p to leading order (EDM2's power-function EMA); p = 0 is
    the plain mean of the initial weights and every step's."""
    w = ema_weights(power, 200)
    k = np.arange(-1, 200)
    expected = np.prod([k + 2 + i for i in range(power)], axis=0) if power else np.ones(201)
    np.testing.assert_allclose(w, expected / expected.sum(), rtol=1e-9)
    if power == 0:
        np.testing.assert_allclose(w, np.full(201, 1 / 201), rtol=1e-12)


@pytest.mark.parametrize("extra, message", [
    (("--level", 7, "--depth", 5), "outside 1..5"),
    (("--depth", 0), "--depth must be >= 1"),
    (("--steps", 0), "--steps must be >= 1"),
    (("--steps", -3), "--steps must be >= 1"),
    (("--batch-size", 0), "--batch-size must be >= 1"),
    (("--log-every", 0), "--log-every must be >= 1"),
    (("--ckpt-every", 0), "--ckpt-every must be >= 1"),
    (("--T", 0), "--T must be >= 2"),
    (("--encode-batch", 0), "--encode-batch must be >= 1"),
    (("--lr", 0), "--lr must be > 0"),
    (("--p-uncond", 1.5), "--p-uncond must be >= 0 and <= 1"),
    (("--betas", 0.9, 1.0), "--betas must each be in"),
    (("--sigma", -1, 0), "--sigma must be >= 0"),
    (("--top-channels", 0), "--top-channels must be >= 1"),
    (("--model-guidance", 1), "--model-guidance must be >= 0 and < 1"),
    (("--t-skew", -1), "--t-skew must be > -1"),
    (("--ema-power", -1), "--ema-power must be > -1"),
    (("--model-guidance", 0.3, "--p-uncond", 0), "--model-guidance needs --p-uncond above 0"),
    (("--data", "imagenett"), "unknown dataset 'imagenett'"),
])
def test_flags_are_checked_before_any_cache_is_built(tmp_path, extra, message):
    (tmp_path / "imgs").mkdir()  # the (empty) image folder exists: only the flag is wrong
    args = argv(tmp_path, 1, 3, "--steps", 1, *extra)
    args.cache_dir = str(tmp_path / "new-cache")
    with pytest.raises(data.UsageError, match=message):
        train.train(args)
    assert not (tmp_path / "new-cache").exists() and not (tmp_path / "runs").exists()


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--level", "7", "--depth", "5", "--cache-dir", str(tmp_path / "c")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --level 7 is outside 1..5 (level 1 = image, 5 = top)"]
    assert not (tmp_path / "c").exists()


def test_resume_refuses_changes_to_the_model_or_its_optimisation(workspace):
    path = train.train(argv(workspace, 3, 3, "--steps", 2, run="change"))
    before = path.read_bytes()
    for extra, named in [(("--lr", 2e-3), "--lr 0.001 -> 0.002"), (("--schedule", "cosine"), "schedule scaled_linear -> cosine"),
                         (("--T", 500), "T 1000 -> 500"), (("--batch-size", 16), "--batch-size 8 -> 16"),
                         (("--p-uncond", 0.2), "p_uncond 0.1 -> 0.2"), (("--seed", 1), "--seed 0 -> 1"),
                         (("--betas", 0.9, 0.9), "--betas 0.99 0.99 -> 0.9 0.9"), (("--ema-power", 2), "--ema-power 8.0 -> 2.0")]:
        with pytest.raises(data.UsageError, match=re.escape(named)):
            train.train(argv(workspace, 3, 3, "--steps", 4, "--resume", *extra, run="change"))
    with pytest.raises(data.UsageError, match=re.escape("--lr 0.001 -> 0.002; --warmup 2 -> 3")):
        train.train(argv(workspace, 3, 3, "--steps", 4, "--resume", "--lr", 2e-3, "--warmup", 3, run="change"))
    assert path.read_bytes() == before
    train.train(argv(workspace, 3, 3, "--steps", 4, "--resume", "--log-every", 2, "--ckpt-every", 3, run="change"))
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["resumes"] == [{"step": 2, "changed": {"steps": [2, 4], "log_every": [1, 2], "ckpt_every": [1000, 3]}}]
    assert torch.load(path)["meta"]["resumes"] == meta["resumes"]


def test_a_finished_level_of_another_latent_cache_is_never_reused(workspace):
    """A level with conditions trained on another cache (another encoder's latents) is refused even when it is
    finished; an unconditional one (pixels only) is reused."""
    for level, reused in ((2, False), (1, True)):
        depth = 3 if level == 2 else 1
        ckpt = train.train(argv(workspace, level, depth, "--steps", 2, run=f"other-cache-{level}"))
        state = torch.load(ckpt, weights_only=False)
        state["meta"]["cache"] = "glyphs-32px-mocov3-elsewhere"
        torch.save(state, ckpt)
        if reused:
            assert train.train(argv(workspace, level, depth, "--steps", 2, run=f"other-cache-{level}")) == ckpt
        else:
            with pytest.raises(data.UsageError, match=r"trained on another latent cache \(glyphs-32px-mocov3-elsewhere -> "):
                train.train(argv(workspace, level, depth, "--steps", 2, run=f"other-cache-{level}"))


def test_resume_with_the_cache_given_by_another_path(workspace, monkeypatch):
    """The cache is named in meta.json by its folder, so an absolute or relative --cache-dir resumes alike."""
    train.train(argv(workspace, 3, 3, "--steps", 2, run="paths"))
    monkeypatch.chdir(workspace)
    args = argv(workspace, 3, 3, "--steps", 3, "--resume", run="paths")
    args.cache_dir, args.run = "cache", "paths"
    assert torch.load(train.train(args))["step"] == 3


@pytest.mark.parametrize("contents, message", [
    (b"", "cannot read checkpoint .* damaged or empty"),
    (b"PK\x03\x04 truncated", "cannot read checkpoint .* damaged or empty"),
    ("list", "is not a checkpoint of train.py"),
    ("pickle", "holds objects other than weights .* refused, since reading it could run code"),
])
def test_damaged_checkpoint_is_named(workspace, tmp_path, contents, message):
    path = train.train(argv(workspace, 3, 3, "--steps", 1, run=f"damaged-{tmp_path.name}")).parent / "ckpt.pt"
    if contents == "list":
        torch.save([1, 2], path)
    elif contents == "pickle":
        torch.save({"model": data.UsageError("x")}, path)  # an arbitrary class: refused by weights_only
    else:
        path.write_bytes(contents)
    before = path.read_bytes()
    with pytest.raises(data.UsageError, match=message) as e:
        train.train(argv(workspace, 3, 3, "--steps", 2, "--resume", run=f"damaged-{tmp_path.name}"))
    assert "weights_only=False" not in str(e.value) and path.read_bytes() == before


def test_signal_writes_a_checkpoint_and_resume_is_exact(workspace, monkeypatch, capsys):
    """SIGINT in step 4 (of 8): the step finishes, ckpt.pt holds 4 steps, exit code 130 with one line; resuming
    to 8 steps equals 8 steps straight, bit for bit, and log.txt has steps 1..8 once each, in order."""
    straight = torch.load(train.train(argv(workspace, 2, 3, "--steps", 8, "--ema-every", 3, run="sig-straight")))
    original, calls = train.Diffusion.loss, []

    def loss(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **kw)
    monkeypatch.setattr(train.Diffusion, "loss", loss)
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    with pytest.raises(SystemExit) as e:
        train.train(argv(workspace, 2, 3, "--steps", 8, "--ema-every", 3, run="sig"))
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is handler  # restored
    assert "error: stopped by SIGINT after step 4; checkpoint" in capsys.readouterr().err
    path = next((workspace / "sig").glob("*/ckpt.pt"))
    assert torch.load(path)["step"] == 4 and torch.load(path)["ema_step"] == 3  # the EMA holds steps 1..3
    with open(path.parent / "log.txt", "a") as log:  # a line written after the checkpoint, and one cut short
        log.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    monkeypatch.undo()
    resumed = torch.load(train.train(argv(workspace, 2, 3, "--steps", 8, "--ema-every", 3, "--resume", run="sig")))
    for part in ("model", "ema"):
        states_equal(straight[part], resumed[part])
    steps = [json.loads(line)["step"] for line in (path.parent / "log.txt").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_sigterm_from_outside_is_one_line(workspace):
    args = sys_argv(argv(workspace, 3, 3, "--steps", 100000, run="term"))
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(600):  # wait for the first logged step
        log = next((workspace / "term").glob("*/log.txt"), None)
        if log and log.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    step = torch.load(log.parent / "ckpt.pt")["step"]
    assert proc.returncode == 128 + signal.SIGTERM and step >= 1
    assert err.rstrip().splitlines()[-1] == (f"error: stopped by SIGTERM after step {step}; checkpoint {log.parent / 'ckpt.pt'}; "
                                              "continue with the same command and --resume")
    assert "Traceback" not in err


def test_second_writer_of_a_run_folder_or_cache_exits_with_one_line(workspace, tmp_path):
    """A lock file per run folder and per cache being built: the second process is refused, naming the first."""
    path = train.train(argv(workspace, 3, 3, "--steps", 1, run="locked"))
    before = path.read_bytes()
    with data.folder_lock(path.parent, "the run folder"):  # as another process training this level would
        with pytest.raises(data.UsageError, match=f"run folder .* is in use by another process \\(pid {os.getpid()}\\)"):
            train.train(argv(workspace, 3, 3, "--steps", 2, "--resume", run="locked"))
    assert path.read_bytes() == before
    args = H.resolve_defaults(argv(workspace, 1, 3))
    args.cache_dir = str(tmp_path)  # a new cache
    root = tmp_path / H.cache_name(args)
    with data.folder_lock(root, "the latent cache"):
        with pytest.raises(data.UsageError, match="latent cache .* is in use by another process"):
            H.build_cache(args)
    assert not root.exists()  # created by the lock holder, removed when it let go of it empty


def test_temporary_files_are_per_process(tmp_path):
    (tmp_path / "f.json.tmp").write_text("another writer's")
    data.atomic_write(tmp_path / "f.json", lambda p: p.write_text("{}"))
    assert (tmp_path / "f.json").read_text() == "{}" and (tmp_path / "f.json.tmp").read_text() == "another writer's"


def test_data_draws_come_from_the_step_generator_whatever_the_world():
    """Each item's caption (and SD-VAE posterior sample) is drawn from the step's data generator for the
    global batch: 2 ranks see the rows 1 process sees; Python's global random is not touched."""
    ld = H.LevelData.__new__(H.LevelData)
    ld.levels, ld.labels, ld.vae = [H.Level(1, 1, 1)], np.arange(8), None
    ld.feats, ld.reduce = {1: np.zeros((8, 1, 1, 1))}, {1: torch.as_tensor}
    ld.captions = [[f"{i}-{k}" for k in range(5)] for i in range(8)]
    idx, state = list(range(8)), random.getstate()
    one = ld.batch(idx, train.GlobalDraw(train.data_generator(3, 7), 0, 1))[3]
    two = [ld.batch(idx[r::2], train.GlobalDraw(train.data_generator(3, 7), r, 2))[3] for r in (0, 1)]
    assert two[0] == one[0::2] and two[1] == one[1::2] and random.getstate() == state
    assert one == ld.batch(idx, train.GlobalDraw(train.data_generator(3, 7), 0, 1))[3]
    assert one != ld.batch(idx, train.GlobalDraw(train.data_generator(3, 8), 0, 1))[3]


def test_full_disk_while_saving_names_the_file_and_keeps_the_checkpoint(workspace, monkeypatch, capsys):
    path = train.train(argv(workspace, 3, 3, "--steps", 1, run="full"))
    before = path.read_bytes()

    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nbasic_ios::clear: iostream error")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as e:
        data.run_main(train.train, argv(workspace, 3, 3, "--steps", 2, "--resume", run="full"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: cannot write the checkpoint (") and str(path) in err[-1]
    assert "the previous checkpoint is kept" in err[-1] and path.read_bytes() == before


def test_v_prediction_run_is_its_own_version_and_samples_with_v(workspace):
    """--prediction v trains to the v target (diffusion.Diffusion.loss), is recorded in meta.json and the run key,
    and sample.py finds it beside the eps version only when asked which (no silent pick), then rebuilds its
    Diffusion with v."""
    paths = {p: train.train(argv(workspace, 1, 1, "--steps", 2, "--prediction", p, run="pred")) for p in ("eps", "v")}
    assert paths["v"].parent.name == paths["eps"].parent.name + "-v"
    assert json.loads((paths["v"].parent / "meta.json").read_text())["prediction"] == "v"
    with pytest.raises(data.UsageError, match="--prediction"):
        sample.find_levels(workspace / "pred", 1, "none")
    for p in ("eps", "v"):
        (meta,) = sample.find_levels(workspace / "pred", 1, "none", prediction=p)
        assert Path(meta["dir"]) == paths[p].parent and sample.load_level(meta, "cpu")[1].prediction == p


def test_condition_use_reads_a_trained_level_on_held_out_items(workspace):
    """evaluate.py conditions: x0 errors per t for true, shuffled and null conditions; they differ for a level
    with conditions and, at t = 0 where x_t is x0 up to 1e-2 noise, all are near zero (clamped pixels)."""
    path = train.train(argv(workspace, 1, 2, "--steps", 3, "--lr", "1e-2", run="use"))
    table = evaluate.condition_use(path.parent, n=8, ts=(0, 300))
    assert set(table) == {0, 300} and all(set(row) == {"true", "shuffled", "null"} for row in table.values())
    assert table[300]["true"] != table[300]["shuffled"] and table[300]["true"] != table[300]["null"]
    assert all(v < 1e-3 for v in table[0].values())
    seen = evaluate.condition_use(path.parent, n=8, ts=(0, 300), split="train")      # training items: --split train
    assert seen[300]["true"] != table[300]["true"] and all(v < 1e-3 for v in seen[0].values())
    assert evaluate.condition_use(path.parent, n=8, ts=(0, 300), split="train") == seen  # seeded: the same numbers
    mean, ridge = evaluate.linear_readout(path.parent, n=8)
    assert 0 < ridge and 0 < mean
    assert evaluate.linear_readout(path.parent, n=8, ridge=1e12) == pytest.approx((mean, mean), rel=1e-6)  # w -> 0


def test_conditions_command_on_a_level_without_latent_conditions(workspace, capsys):
    """Depth 1 (and a top level) has no latents to regress from: the table still prints, the scale line says so."""
    path = train.train(argv(workspace, 1, 1, "--steps", 2, run="flat"))
    mean, ridge = evaluate.linear_readout(path.parent, n=8)
    assert ridge is None and mean > 0
    evaluate.main(evaluate.get_parser().parse_args(["conditions", str(path.parent), "--n", "8", "--device", "cpu"]))
    out = capsys.readouterr().out
    assert f"the mean training target {mean:.4f}; no latent conditions to regress from" in out and "| 999 |" in out


def test_model_guidance_target_closed_form():
    """train.level_loss with model guidance w is the MSE to target + w·(D(x_t, c) − D(x_t, ∅)) on the rows that keep
    their conditions (dropped rows keep the plain target), the guide term carrying no gradient; w = 0 is the plain
    loss to the bit."""
    torch.manual_seed(0)
    net = Denoiser((1, 8, 8), 4, cond_shapes=[(4, 1, 1), (2, 2, 2)], size="tiny")
    for p in net.parameters():  # off the zero-initialised start, where every prediction is 0
        p.data.normal_(0, 0.2)
    d = Diffusion("linear", 1000, "v")
    x, noise = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    t, conds = torch.tensor([999, 700, 500, 300, 100, 0]), [torch.randn(6, 4, 1, 1), torch.randn(6, 2, 2, 2)]
    drop = torch.tensor([True, False, False, True, False, False])
    x_t = d.q_sample(x, t, noise)
    out, null = net(x_t, t, conds, force_drop=drop), net(x_t, t, conds, force_drop=torch.ones(6, dtype=torch.bool))
    target = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * noise - d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * x
    shift = 0.4 * (out - null).detach() * (~drop).view(-1, 1, 1, 1)
    assert shift[~drop].abs().min() > 0 and torch.equal(out[drop], null[drop])
    expected = torch.nn.functional.mse_loss(out, target + shift)
    grads = torch.autograd.grad(expected, list(net.parameters()))
    loss = train.level_loss(net, d, x, t, noise, conds, None, None, drop, "fp32", guidance=0.4)
    torch.testing.assert_close(loss, expected)
    for g, h in zip(torch.autograd.grad(loss, list(net.parameters())), grads):
        torch.testing.assert_close(g, h)
    plain = train.level_loss(net, d, x, t, noise, conds, None, None, drop, "fp32")
    assert torch.equal(train.level_loss(net, d, x, t, noise, conds, None, None, drop, "fp32", guidance=0.0), plain)
    assert torch.equal(plain, torch.nn.functional.mse_loss(out, target)) and loss != plain


def test_t_skew_draws_its_timesteps_and_is_fixed_for_the_run(workspace):
    """--t-skew k: the step's t come from the same uniform draw through (t/T)^k; t_skew is recorded in meta where
    it is not 0 and a resume may not change it (a checkpoint from before the flag counts as uniform, 0)."""
    x, zs = torch.zeros(64, 1, 4, 4), []
    args = argv(workspace, 1, 1, "--t-skew", 2)

    def step_generator():  # step 5's generator, as step_draws seeds it
        return torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, 5]).generate_state(1)[0]))
    t, *_ = train.step_draws(args, 5, 0, 1, x, zs, [])
    assert torch.equal(t, (1000 * torch.rand(64, generator=step_generator()) ** (1 / 3)).long())
    args.t_skew = 0  # the paper's uniform draw, as before the flag
    assert torch.equal(train.step_draws(args, 5, 0, 1, x, zs, [])[0], torch.randint(0, 1000, (64,), generator=step_generator()))
    path = train.train(argv(workspace, 1, 1, "--steps", 2, "--t-skew", 1, run="skew"))
    assert json.loads((path.parent / "meta.json").read_text())["t_skew"] == 1
    with pytest.raises(data.UsageError, match=re.escape("--t-skew 1.0 -> 0.0")):
        train.train(argv(workspace, 1, 1, "--steps", 4, "--resume", run="skew"))
    with pytest.raises(data.UsageError, match=re.escape("trained: --t-skew 1.0 -> 2.0; pass")):  # named once
        train.train(argv(workspace, 1, 1, "--steps", 4, "--resume", "--t-skew", 2, run="skew"))
    plain = train.train(argv(workspace, 1, 1, "--steps", 2, run="plain"))
    assert "t_skew" not in json.loads((plain.parent / "meta.json").read_text())
    state = torch.load(plain)
    del state["args"]["t_skew"]  # a checkpoint written before the flag existed
    torch.save(state, plain)
    with pytest.raises(data.UsageError, match=re.escape("--t-skew 0.0 -> 1.0")):
        train.train(argv(workspace, 1, 1, "--steps", 4, "--resume", "--t-skew", 1, run="plain"))
    train.train(argv(workspace, 1, 1, "--steps", 4, "--resume", run="plain"))


def test_model_guidance_levels_are_their_own_version(workspace):
    """--model-guidance w: a level with conditions gets its own key (-mg<w>) and records w; a level with nothing
    to guide (the top level) is the paper's, shared; sample.py picks the version with --model-guidance (no silent
    pick) and samples the guided levels with no guidance unless --cfg says otherwise."""
    top = train.train(argv(workspace, 2, 2, "--steps", 2, "--model-guidance", 0.3, run="mg"))
    plain = train.train(argv(workspace, 1, 2, "--steps", 4, run="mg"))
    guided = train.train(argv(workspace, 1, 2, "--steps", 4, "--model-guidance", 0.3, run="mg"))
    assert "-mg" not in top.parent.name and guided.parent.name == plain.parent.name + "-mg0.3"
    assert json.loads((guided.parent / "meta.json").read_text())["model_guidance"] == 0.3
    assert "model_guidance" not in json.loads((plain.parent / "meta.json").read_text())
    weights = [torch.load(p)["model"] for p in (guided, plain)]
    # the zero-initialised DiT's output reads its conditions from step 3 on; from then the two targets differ
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    with pytest.raises(data.UsageError, match="--model-guidance"):
        sample.find_levels(workspace / "mg", 2, "none")
    metas = sample.find_levels(workspace / "mg", 2, "none", model_guidance=0.3)
    assert [Path(m["dir"]) for m in metas] == [top.parent, guided.parent]
    assert [Path(m["dir"]) for m in sample.find_levels(workspace / "mg", 2, "none", model_guidance=0)] == \
        [top.parent, plain.parent]
    assert cfg_weights(None, "none", 2, metas) == [0.8, 0.0]  # the top level has no conditions to guide
    assert cfg_weights([0.5], "none", 2, metas) == [0.5, 0.5]
