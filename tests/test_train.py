"""Training: resume equivalence, EMA, DDP (2 processes, gloo) vs 1 process, atomic checkpoints, NaN stop, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoder as enc
import hierarchy as H
import train

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
        "--model", "tiny", "--batch-size", "8", "--warmup", "2", "--lr", "1e-3", "--ema", "0.9", "--log-every", "1",
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
    straight = torch.load(train.train(argv(workspace, level, 3, "--steps", 6, "--cond", cond, run=f"s{level}")))
    train.train(argv(workspace, level, 3, "--steps", 3, "--cond", cond, run=f"r{level}"))
    resumed = torch.load(train.train(argv(workspace, level, 3, "--steps", 6, "--cond", cond, "--resume", run=f"r{level}")))
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
    train.update_ema(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    torch.testing.assert_close(ema.running_mean, torch.full((3,), 5.0))  # buffers copied


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
    one = torch.load(train.train(argv(workspace, 1, 3, "--steps", 3, run="ddp1")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "train.py",
           *sys_argv(argv(workspace, 1, 3, "--steps", 3, run="ddp2"))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    two = torch.load(next((workspace / "ddp2").glob("*/ckpt.pt")))
    for k in one["model"]:
        torch.testing.assert_close(one["model"][k], two["model"][k], rtol=1e-4, atol=1e-5)


def sys_argv(args):
    """Turn parsed args back into a command line (for the torchrun subprocess)."""
    out = []
    for flag in ("data", "image_size", "clip", "pretrained", "min_crop", "image_space", "cache_dir", "level", "depth", "model",
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


def test_ema_decay_warms_up_to_the_paper_value():
    assert train.ema_decay(0.9999, 0) == pytest.approx(0.1)
    assert train.ema_decay(0.9999, 90) == pytest.approx(91 / 100)
    assert train.ema_decay(0.9999, 10**6) == 0.9999
