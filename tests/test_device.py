"""--device: every model and tensor of a stage follows it, and reproduce.py hands it to every stage.

A CPU-only machine cannot run a stage on a GPU, so the stages run on torch's "meta" device (shapes only,
no data): every module forward is recorded with the devices of its parameters and tensor inputs, and the
stage is expected to stop at its first read-back to the host (``.item()`` / ``.tolist()`` of a meta tensor)
having run every forward on "meta". A model or batch left on the CPU shows up as a "cpu" entry or as a
device-mismatch error before that point."""
import argparse
import contextlib

import numpy as np
import pytest
import torch

import encoder
import train_encoder
import reproduce
import sample
import train
from test_train import argv, workspace  # noqa: F401  (the fixture: a folder dataset and its latent cache)

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@contextlib.contextmanager
def forward_devices():
    """The set of devices seen by every module forward (parameters and tensor inputs) inside the block."""
    seen = []

    def hook(module, inputs):
        seen.extend(p.device.type for p in module.parameters(recurse=False))
        seen.extend(a.device.type for a in inputs if torch.is_tensor(a))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def stops_at_meta_read_back(fn):
    """Run ``fn``; it must stop at reading a meta tensor back to the host. Returns the devices its forwards saw."""
    with forward_devices() as seen, pytest.raises((RuntimeError, NotImplementedError), match="meta") as e:
        fn()
    assert seen, f"no module ran before {e.value!r}"
    return set(seen)


class Captioned(torch.utils.data.Dataset):
    has_captions, num_classes = True, 2

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((1, 32, 32), i / 8 - 0.5), i % 2, f"caption {i}"


def test_encoder_training_follows_device(tmp_path, monkeypatch):
    encoder.register_model_config("tiny-device-clip", TINY)
    monkeypatch.setattr(train_encoder.data, "build_dataset", lambda *a, **kw: Captioned())
    args = argparse.Namespace(clip="tiny-device-clip", data="glyphs", data_dir=str(tmp_path), image_size=32, steps=2,
                              minutes=0, batch_size=4, lr=1e-3, weight_decay=0.1, seed=0, out=str(tmp_path / "w.pt"),
                              device="meta", precision="fp32")
    assert stops_at_meta_read_back(lambda: train_encoder.train_clip(args)) == {"meta"}   # loss.item() after the first step
    assert not (tmp_path / "w.pt").exists()


def test_knn_follows_device():
    encoder.register_model_config("tiny-device-clip", TINY)
    enc = encoder.Encoder("tiny-device-clip", None, "meta")
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    with forward_devices() as seen:
        feats = enc.embed(x)                                                   # (6, D)
    assert feats.device.type == "meta" and set(seen) == {"meta"}
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):  # the vote counts are read back
        encoder.knn_accuracy(feats, torch.tensor([0, 1] * 3), feats, torch.tensor([0, 1] * 3), k=2, device="meta")


def test_training_follows_device(workspace, monkeypatch):  # noqa: F811
    """Model, batches (prefetched), draws, loss, EMA: all on the device until the NaN check reads the losses."""
    draws = train.step_draws

    def cpu_generator_draws(args, step, rank, world, x, zs, sigmas):  # "meta" has no generator: draw on the CPU, move
        out = draws(args, step, rank, world, torch.zeros(x.shape), [torch.zeros(z.shape) for z in zs], sigmas)
        return out[0].to(x.device), out[1].to(x.device), [z.to(x.device) for z in out[2]], out[3].to(x.device)
    monkeypatch.setattr(train, "step_draws", cpu_generator_draws)
    devices = stops_at_meta_read_back(
        lambda: train.train(argv(workspace, 1, 3, "--steps", 3, "--device", "meta", run="meta")))
    assert devices == {"meta"}
    assert not list((workspace / "meta").glob("*/ckpt.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (README, Devices: run where one is at hand)")
def test_every_stage_stays_on_cuda(workspace, tmp_path, monkeypatch):  # noqa: F811
    """On a GPU, the real stages with --device cuda: encoder training, KNN, a fresh latent cache, the three levels
    of depth 3 and cascaded sampling; every module forward saw CUDA parameters and inputs, none the CPU."""
    encoder.register_model_config("tiny-device-clip", TINY)
    monkeypatch.setattr(train_encoder.data, "build_dataset", lambda *a, **kw: Captioned())
    clip = argparse.Namespace(clip="tiny-device-clip", data="glyphs", data_dir=str(tmp_path), image_size=32, steps=2,
                              minutes=0, batch_size=4, lr=1e-3, weight_decay=0.1, seed=0, out=str(tmp_path / "w.pt"),
                              device="cuda", precision="bf16")
    cuda = ["--device", "cuda", "--cache-dir", str(tmp_path / "cache"), "--steps", 2]
    with forward_devices() as seen:
        train_encoder.train_clip(clip)
        monkeypatch.undo()  # the folder dataset's cache from here on
        feats = encoder.Encoder("tiny-device-clip", None, "cuda").embed(torch.rand(6, 1, 32, 32, device="cuda"))
        encoder.knn_accuracy(feats, torch.tensor([0, 1] * 3), feats, torch.tensor([0, 1] * 3), k=2, device="cuda")
        for level in (3, 2, 1):
            train.train(argv(workspace, level, 3, *cuda, run="cuda"))
        npz = sample.main(sample.get_parser().parse_args(
            ["--depth", "3", "--run-dir", str(workspace / "cuda"), "--n", "4", "--batch", "4", "--steps", "2",
             "--device", "cuda", "--out", str(tmp_path / "out"), "--overwrite"]))
        sample.main(sample.get_parser().parse_args(  # the oracle: a real image's top latents, its SVD on the GPU too
            ["--depth", "3", "--run-dir", str(workspace / "cuda"), "--n", "2", "--batch", "2", "--steps", "2",
             "--device", "cuda", "--out", str(tmp_path / "ref"), "--overwrite", "--keep", "2",
             "--reference", str(next((workspace / "imgs" / "a").glob("*.png")))]))
    assert set(seen) == {"cuda"}
    assert np.load(npz)["arr_0"].shape == (4, 16, 16, 3) and (tmp_path / "w.pt").exists()


def test_svd_reduction_follows_its_input_device():
    """The oracle's latents of real images are reduced where they were encoded (a GPU), both ways."""
    import hierarchy
    red = hierarchy.Reduction(hierarchy.fit_pca(np.random.default_rng(0).normal(size=(40, 8))), 4)
    z = red(torch.zeros(2, 8, 1, 1, device="meta"))
    assert z.device.type == "meta" and z.shape == (2, 4, 1, 1) and red.inverse(z).device.type == "meta"


def test_reproduce_hands_the_device_to_every_stage(tmp_path, monkeypatch):
    seen = {}

    def record(stage, device):
        seen.setdefault(stage, set()).add(str(device))

    class Hier:
        root = tmp_path / "c"

        def levels(self, depth, patch, top_channels=None):
            return []

    def fake_sample(args):
        record("sample", args.device)
        np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
        return tmp_path / "s.npz"
    monkeypatch.setattr(reproduce.data, "build_dataset", lambda *a, **kw: [0, 1])
    monkeypatch.setattr(reproduce.train_encoder, "main", lambda a: record("encoder", a[a.index("--device") + 1]) or [])
    monkeypatch.setattr(reproduce.H, "build_cache", lambda a: record("cache", a.device) or Hier())
    monkeypatch.setattr(reproduce.train, "train", lambda a: record("train", a.device))
    monkeypatch.setattr(reproduce.evaluate, "dataset_stats", lambda *a, device, **kw: record("fid reference", device) or (0, 0))
    monkeypatch.setattr(reproduce.sample, "main", fake_sample)
    monkeypatch.setattr(reproduce.evaluate, "inception_features",
                        lambda images, device, **kw: record("fid samples", device) or np.zeros((len(images), 4)))
    monkeypatch.setattr(reproduce.evaluate, "frechet_distance", lambda *a: 1.0)
    monkeypatch.setattr(reproduce, "write_results", lambda *a, **kw: None)
    monkeypatch.setattr(reproduce, "reference_images", lambda test_set, n: np.zeros((2, 32, 32, 3), np.uint8))
    (tmp_path / "clip.pt").touch()  # glyph CLIP weights present: train_encoder.py --knn
    reproduce.main(reproduce.get_parser().parse_args(
        ["--preset", "quick", "--device", "cuda:7", "--clip", str(tmp_path / "clip.pt"), "--runs", str(tmp_path / "r"),
         "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--data-dir", str(tmp_path / "d")]))
    assert seen == {s: {"cuda:7"} for s in ("encoder", "cache", "train", "fid reference", "sample", "fid samples")}
