"""The glyph VAE (autoencoder.py): latent shape, the scale to unit variance, training, the saved folder, and its
use as the image level of a latent cache (hierarchy.py --image-space sd-vae --vae FOLDER)."""
import json

import numpy as np
import pytest
import torch

import autoencoder
import data
import hierarchy as H
from test_hierarchy import _args, _folder


def _blobs(n=64, size=16, seed=0):
    """n greyscale images (n, 1, size, size) in [-1, 1]: a white rectangle of random place and size on black."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, size, size)
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(2, size // 2, (2,), generator=g).tolist()
        x[i, :, top:top + h, left:left + w] = 1
    return x


def test_latent_shape_and_unit_variance_scale():
    torch.manual_seed(0)
    vae, x = autoencoder.build("tiny", channels=1, image_size=16), _blobs(32)
    with torch.no_grad():
        means = vae.encode(x).latent_dist.mean
    assert list(means.shape[1:]) == H.latent_shape(vae, x[0]) == [4, 8, 8]   # tiny: one halving
    s = autoencoder.scaling_factor(vae, x, batch_size=10)                    # batched as in training
    assert (means * s).std().item() == pytest.approx(1.0, rel=1e-4)


def test_training_lowers_the_reconstruction_error_and_saves_a_loadable_folder(tmp_path, monkeypatch):
    train_x, test_x = _blobs(256, seed=0), _blobs(64, seed=1)
    monkeypatch.setattr(autoencoder, "split_images", lambda name, split, size, d: train_x if split == "train" else test_x)
    torch.manual_seed(0)
    untrained = ((autoencoder.reconstruct(autoencoder.build("tiny", 1, 16).eval(), test_x) - test_x) ** 2).mean().item()
    out = tmp_path / "vae"
    errors = autoencoder.main(["--size", "tiny", "--image-size", "16", "--steps", "150", "--batch-size", "32",
                               "--precision", "fp32", "--device", "cpu", "--out", str(out)])
    assert errors["mse"] < 0.3 * untrained
    vae = H.load_vae(str(out))                                                # diffusers reads it back
    y = autoencoder.reconstruct(vae, test_x)
    assert ((y - test_x) ** 2).mean().item() == pytest.approx(errors["mse"], rel=1e-5)
    assert vae.config.scaling_factor == pytest.approx(autoencoder.scaling_factor(vae, train_x), rel=1e-5)
    assert json.loads((out / "report.json").read_text())["steps"] == 150
    assert not (tmp_path / "vae.tmp").exists()
    recon = np.load(out / "reconstructions.npz")["arr_0"]                    # the held-out split, as samples are saved
    np.testing.assert_array_equal(recon, data.to_uint8(y))
    (out / "reconstructions.npz").unlink()
    again = autoencoder.main(["--reconstruct", "--image-size", "16", "--device", "cpu", "--out", str(out)])
    assert again == pytest.approx(errors, rel=1e-5) and (out / "reconstructions.npz").exists()


class _Killed(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed in step 6 (state saved every 2 steps, so at step 4), then --resume runs steps 5-8 only: the folder equals
    that of a run never interrupted, to the bit; a partial run is neither resumed nor overwritten without a flag."""
    train_x = _blobs(64, seed=0)
    monkeypatch.setattr(autoencoder, "split_images", lambda name, split, size, d: train_x if split == "train" else train_x[:8])
    argv = ["--size", "tiny", "--image-size", "16", "--steps", "8", "--batch-size", "8", "--ckpt-every", "2",
            "--precision", "fp32", "--device", "cpu"]
    autoencoder.main(argv + ["--out", str(tmp_path / "whole")])
    real, calls = autoencoder.loss_terms, []

    def dies_at_step_6(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise _Killed()
        return real(*a, **kw)
    monkeypatch.setattr(autoencoder, "loss_terms", dies_at_step_6)
    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        autoencoder.main(argv + ["--out", str(out)])
    assert not out.exists() and torch.load(autoencoder.partial_path(out), weights_only=False)["step"] == 4
    with pytest.raises(data.UsageError, match="pass --resume to continue it"):
        autoencoder.main(argv + ["--out", str(out)])
    with pytest.raises(data.UsageError, match="trained with --lr 0.001"):
        autoencoder.main(argv + ["--out", str(out), "--resume", "--lr", "0.01"])
    resumed = []
    monkeypatch.setattr(autoencoder, "loss_terms", lambda *a, **kw: resumed.append(1) or real(*a, **kw))
    autoencoder.main(argv + ["--out", str(out), "--resume"])
    assert len(resumed) == 4 and not autoencoder.partial_path(out).exists()  # steps 5-8 only, then tidied away
    a, b = (H.load_vae(str(tmp_path / d)).state_dict() for d in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"),
    (["--kl-weight", "-1"], "--kl-weight"),
    ([], "exists; pass --overwrite"),
    (["--reconstruct"], "--reconstruct reads a trained VAE folder"),
])
def test_bad_input_is_one_line_and_keeps_the_old_folder(tmp_path, argv, message):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(data.UsageError, match=message):
        autoencoder.main(argv + ["--out", str(out)])
    assert (out / "keep").read_text() == "old"


def test_cache_takes_the_vae_latent_shape_and_scale_and_a_retrained_vae_gets_a_new_cache(tmp_path):
    torch.manual_seed(0)
    vae = autoencoder.build("tiny", channels=3, image_size=32)
    vae.register_to_config(scaling_factor=2.5)
    vae.save_pretrained(tmp_path / "vae")
    name = _folder(tmp_path, n=17)
    args = _args(tmp_path, name, 2, image_space="sd-vae", vae=str(tmp_path / "vae"))
    hier = H.build_cache(args, encoder=H.make_encoder(args))
    assert hier.image_shape == (4, 16, 16) and hier.vae_scale == 2.5
    levels = hier.levels(2, image_patch=2)
    x = data.build_dataset(name, "train", 32)[0][0][None]
    with torch.no_grad():
        dist = H.load_vae(str(tmp_path / "vae")).encode(x).latent_dist
    draws = torch.stack([H.LevelData(hier, "train", levels)[0][0] for _ in range(200)])  # posterior samples, scaled
    assert ((draws.mean(0) - 2.5 * dist.mean[0]).abs() < 5 * 2.5 * dist.std[0] / 200 ** 0.5 + 2e-2).all()
    name_before = H.cache_name(args)
    torch.manual_seed(1)
    autoencoder.build("tiny", channels=3, image_size=32).save_pretrained(tmp_path / "vae")  # retrained in place
    assert H.cache_name(args) != name_before


def test_vae_input_repeats_grey_only_for_an_rgb_vae():
    grey = torch.rand(2, 1, 16, 16)
    rgb_vae, grey_vae = autoencoder.build("tiny", channels=3), autoencoder.build("tiny", channels=1)
    assert H.vae_input(rgb_vae, grey).shape == (2, 3, 16, 16) and (H.vae_input(rgb_vae, grey) == grey).all()
    assert torch.equal(H.vae_input(grey_vae, grey), grey)
    assert H.vae_scale("coco", grey_vae) == 0.23010                      # U-ViT's COCO scale wins
    grey_vae.register_to_config(scaling_factor=1.7)
    assert H.vae_scale("glyphs", grey_vae) == 1.7 and H.vae_scale("glyphs") == H.VAE_SCALE
