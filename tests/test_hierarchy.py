"""Latent hierarchy: level shapes, SVD reduction vs numpy, unit RMS, σ-noise statistics, cache round trip, SD-VAE level,
the MoCo-v3 encoder, the offline path to a trained encoder, text towers."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import encoder as enc
import hierarchy as H

TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
enc.register_model_config("tiny-clip", TINY)


def test_level_specs_paper_layout():
    for dim in (512, 768):  # CLIP ViT-B/16 and MoCo-v3 ViT-B/16 both give the paper's 256/128/64/32
        levels = H.level_specs(5, dim, (4, 32, 32), image_patch=2)
        assert [lv.shape for lv in levels] == [(256, 1, 1), (128, 2, 2), (64, 4, 4), (32, 8, 8), (4, 32, 32)]
        assert [(lv.grid // lv.patch) ** 2 for lv in levels[:-1]] == [1, 4, 4, 16]
    assert [lv.channels for lv in H.level_specs(5, 128, (1, 32, 32), 4)] == [64, 32, 16, 8, 1]
    assert H.level_specs(1, 512, (4, 32, 32), 2) == [H.Level(32, 4, 2, image=True)]
    assert [lv.channels for lv in H.level_specs(5, 128, (1, 32, 32), 4, top_channels=8)] == [8, 4, 2, 1, 1]
    assert H.level_specs(4, 768, (4, 32, 32), 2, top_channels=256) == H.level_specs(4, 768, (4, 32, 32), 2)


def test_sigma_defaults():
    assert [H.sigma_for(m, "none") for m in (1, 2, 4, 8, 16)] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert [H.sigma_for(m, "class") for m in (1, 2, 4, 8)] == [0.5, 0.5, 1.0, 1.0]
    assert H.sigma_for(4, "text") == 0.5


def test_reduction_matches_numpy_svd_and_is_unit_rms():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 12)) @ rng.normal(size=(12, 12)) + 3.0    # correlated, off-centre
    pca = H.fit_pca(f)
    basis = pca["basis"]
    np.testing.assert_allclose(basis.T @ basis, np.eye(12), atol=1e-10)  # orthonormal
    k = 5
    red = H.Reduction(pca, k)
    feats = torch.tensor(f, dtype=torch.float32).view(2000, 12, 1, 1)     # (N, D, 1, 1): a 1×1 level
    z = red(feats)
    assert z.shape == (2000, k, 1, 1)
    assert abs(z.pow(2).mean().item() - 1) < 1e-3                          # unit RMS on the fit data
    u, s, vt = np.linalg.svd(f - f.mean(0), full_matrices=False)           # rank-k reconstruction
    recon = (u[:, :k] * s[:k]) @ vt[:k] + f.mean(0)
    np.testing.assert_allclose(red.inverse(z).view(2000, 12).numpy(), recon, atol=1e-3)
    assert red.kept == pytest.approx((s[:k] ** 2).sum() / (s ** 2).sum())


def test_reduction_on_grid_is_per_cell():
    rng = np.random.default_rng(1)
    pca = H.fit_pca(rng.normal(size=(500, 6)))
    red = H.Reduction(pca, 3)
    feats = torch.randn(2, 6, 4, 4)
    z = red(feats)                                                          # (2, 3, 4, 4)
    cell = red(feats[:, :, 1, 2].reshape(2, 6, 1, 1))[:, :, 0, 0]
    torch.testing.assert_close(z[:, :, 1, 2], cell)


def test_training_noise_statistics():
    z = torch.full((200_000,), 2.0)
    g = torch.Generator().manual_seed(0)
    zh = H.noise_train(z, 0.5, g)
    assert abs(zh.mean().item() - 2.0) < 0.01 and abs(zh.std().item() - 0.5) < 0.01
    assert torch.equal(H.noise_train(z, 0.0), z)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0])
def test_sampling_noise_variance_form(gamma):
    T, sigma = 1000, 1.0
    t = torch.tensor([250] * 100_000 + [1000] * 100_000)
    z = torch.zeros(200_000, 1)
    zh = H.noise_sample(z, sigma, t, T, gamma, torch.Generator().manual_seed(0))
    var = zh[:100_000].var().item()
    assert var == pytest.approx((250 / T) ** gamma * sigma ** 2, rel=0.03)  # variance (t/T)^γ σ²
    assert zh[100_000:].var().item() == pytest.approx(sigma ** 2, rel=0.03)
    assert torch.equal(H.noise_sample(z, sigma, t, T, math.inf), z)      # γ = ∞: clean


def _folder(tmp_path, n=25, size=32):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{k}.png")
    return f"folder:{tmp_path / 'imgs'}"


def _args(tmp_path, name, depth, **kw):
    args = H.get_parser().parse_args(["--data", name, "--image-size", "32", "--clip", "tiny-clip",
                                      "--min-crop", "16", "--cache-dir", str(tmp_path / "cache"),
                                      "--encode-batch", "16", "--depth", str(depth), "--device", "cpu"])
    args.pretrained, args.image_space = "random", "pixels"
    vars(args).update(kw)
    return args


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return H.make_encoder(_args(tmp_path_factory.mktemp("x"), "glyphs", 2))


def test_cache_round_trip_and_reuse(tmp_path, tiny_encoder):
    name = _folder(tmp_path)
    hier = H.build_cache(_args(tmp_path, name, 2), encoder=tiny_encoder)
    assert hier.meta["grids"] == [1]
    pca_file = hier.root / "pca-1.npz"
    stamp = pca_file.stat().st_mtime_ns
    hier = H.build_cache(_args(tmp_path, name, 4), encoder=tiny_encoder)   # adds grids 2 (crops) and 4 (token map)
    assert hier.meta["grids"] == [1, 2, 4] and pca_file.stat().st_mtime_ns == stamp
    import data
    ds = data.build_dataset(name, "train", 32)
    x = torch.stack([ds[i][0] for i in range(4)])
    last = torch.stack([ds[i][0] for i in range(len(ds) - 3, len(ds))])  # rows of the last, partial batch
    for m in (1, 2, 4):
        assert hier.features("train", m).shape[0] == len(ds)
        cached = torch.from_numpy(hier.features("train", m)[:4].astype(np.float32))
        torch.testing.assert_close(cached, tiny_encoder.level_features(x, m, 16), atol=2e-2, rtol=2e-3)
        cached = torch.from_numpy(hier.features("train", m)[-3:].astype(np.float32))
        torch.testing.assert_close(cached, tiny_encoder.level_features(last, m, 16), atol=2e-2, rtol=2e-3)
    embeddings = hier.embeddings("train")  # the 1x1 level before its float16 rounding, for the KNN report
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(ds), hier.enc_dim)
    assert np.array_equal(embeddings.astype(np.float16), hier.features("train", 1)[:, :, 0, 0])
    torch.testing.assert_close(torch.from_numpy(embeddings[:4].copy()), tiny_encoder.embed(x))
    levels = hier.levels(4, image_patch=4)
    assert [lv.shape for lv in levels] == [(32, 1, 1), (16, 2, 2), (8, 4, 4), (3, 32, 32)]
    item = H.LevelData(hier, "train", levels, base=ds)[3]
    target, conds, y, caption = item
    torch.testing.assert_close(target, ds[3][0])
    assert [c.shape for c in conds] == [(32, 1, 1), (16, 2, 2), (8, 4, 4)]
    assert y == ds.labels[3] and caption == ""
    train_all = torch.stack([H.LevelData(hier, "train", levels[1:2])[i][0] for i in range(len(ds))])
    assert abs(train_all.pow(2).mean().item() - 1) < 0.05                 # unit RMS on the training split
    latents = H.encode_image(hier, tiny_encoder, x, levels, 16)
    torch.testing.assert_close(latents[1][3], conds[1], atol=3e-2, rtol=1e-2)


def test_interrupted_encoding_leaves_nothing_half_written(tmp_path, tiny_encoder, monkeypatch):
    """A build killed in its second batch leaves no feature file, no temporary file and no meta.json;
    the next build starts clean and completes."""
    name, calls = _folder(tmp_path), []
    features = tiny_encoder.features

    def dies_in_second_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return features(*a, **kw)
    monkeypatch.setattr(tiny_encoder, "features", dies_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        H.build_cache(_args(tmp_path, name, 3), encoder=tiny_encoder)
    root = next((tmp_path / "cache").iterdir())
    assert {p.name for p in root.glob("*.npy*")} == {"train-labels.npy"}  # written before encoding starts
    assert not (root / "meta.json").exists()
    monkeypatch.setattr(tiny_encoder, "features", features)
    hier = H.build_cache(_args(tmp_path, name, 3), encoder=tiny_encoder)
    assert hier.meta["grids"] == [1, 2] and hier.features("test", 2).shape[1:] == (64, 2, 2)


def test_sd_vae_bottom_level(tmp_path, tiny_encoder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    name = _folder(tmp_path, n=17)  # 32 training vectors at least: the top level's channels
    hier = H.build_cache(_args(tmp_path, name, 2, image_space="sd-vae", vae=str(tmp_path / "vae")), encoder=tiny_encoder)
    levels = hier.levels(2, image_patch=2)
    assert levels[-1].shape == (4, 4, 4)
    import data
    x = data.build_dataset(name, "train", 32)[0][0][None]
    dist = H.load_vae(str(tmp_path / "vae")).encode(x).latent_dist
    moments = torch.from_numpy(np.load(hier.root / "train-vae.npy")[0].astype(np.float32))
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.std], 1)[0], atol=2e-3, rtol=2e-3)
    draws = torch.stack([H.LevelData(hier, "train", levels)[0][0] for _ in range(400)])  # posterior samples
    stderr = dist.std[0] * H.VAE_SCALE / 20
    assert ((draws.mean(0) - dist.mean[0] * H.VAE_SCALE).abs() < 5 * stderr + 1e-3).all()
    torch.testing.assert_close(draws.std(0), dist.std[0] * H.VAE_SCALE, rtol=0.15, atol=1e-3)


def test_cache_of_weights_retrained_into_the_same_file_is_refused(tmp_path, tiny_encoder):
    """The cache is named after the weights file; meta.json keeps its SHA-1, so new weights under the old name stop
    with one line instead of reading the old latents (and leave the cache as it was)."""
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"first training")
    args = _args(tmp_path, _folder(tmp_path), 2, pretrained=str(weights))
    root = H.build_cache(args, encoder=tiny_encoder).root
    meta = json.loads((root / "meta.json").read_text())
    assert meta["weights_sha1"] == hashlib.sha1(b"first training").hexdigest() and "clip" in root.name
    files = {p.name: p.read_bytes() for p in root.iterdir()}
    weights.write_bytes(b"second training")
    with pytest.raises(H.data.UsageError, match=f"latent cache {root} was encoded with other weights than {weights}"):
        H.build_cache(args, encoder=tiny_encoder)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files
    weights.write_bytes(b"first training")
    assert H.build_cache(args, encoder=tiny_encoder).root == root  # the same weights: reused


def test_missing_glyph_clip_is_usage_error(tmp_path):
    args = H.get_parser().parse_args(["--pretrained", str(tmp_path / "nope.pt")])
    with pytest.raises(H.data.UsageError, match="train_encoder.py --objective clip --train"):
        H.resolve_defaults(args)


@pytest.mark.parametrize("flags, message", [
    (["--depth", "0"], "--depth must be >= 1"),
    (["--encode-batch", "0"], "--encode-batch must be >= 1"),
    (["--top-channels", "0"], "--top-channels must be >= 1"),
    (["--data", "nope"], "unknown dataset 'nope'"),
])
def test_flags_are_checked_before_the_cache(tmp_path, flags, message):
    args = H.get_parser().parse_args(["--pretrained", "random", "--cache-dir", str(tmp_path / "c"), *flags])
    with pytest.raises(H.data.UsageError, match=message):
        H.main(args)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name, message", [("imagenet", "ImageNet folder .*nope/train not found"),
                                           ("coco", "captions_train2014.json not found")])
def test_missing_dataset_stops_before_any_model_is_loaded(tmp_path, monkeypatch, name, message):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the dataset was found")
    monkeypatch.setattr(H, "make_encoder", no_model)
    monkeypatch.setattr(H, "load_vae", no_model)
    args = _args(tmp_path, name, 2, data_path=str(tmp_path / "nope"), image_space="sd-vae")
    with pytest.raises(H.data.UsageError, match=message):
        H.build_cache(args)


def test_too_few_training_vectors_for_a_level(tmp_path, tiny_encoder):
    """19 training images give a 1x1 basis of rank 19 < the 32 channels of the top level: named, not a shape error."""
    hier = H.build_cache(_args(tmp_path, _folder(tmp_path, n=10), 2), encoder=tiny_encoder)
    with pytest.raises(H.data.UsageError, match="19 training vectors at grid 1, fewer than the 32 channels"):
        hier.reduction(hier.levels(2, 4)[0])


@pytest.mark.parametrize("damage, message", [
    ("truncate-npy", r"train-1.npy is damaged \(\d+ bytes, expected \d+\); delete the folder"),
    ("truncate-pca", r"pca-1.npz is damaged"),
    ("old-cache-garbage-pca", r"pca-1.npz cannot be read"),
    ("old-cache-truncated-npy", r"train-1.npy cannot be read"),
    ("meta", r"meta.json is damaged"),
])
def test_damaged_cache_file_is_named(tmp_path, tiny_encoder, damage, message):
    hier = H.build_cache(_args(tmp_path, _folder(tmp_path), 2), encoder=tiny_encoder)
    root, meta = hier.root, json.loads((hier.root / "meta.json").read_text())
    assert meta["files"]["train-1.npy"] == (root / "train-1.npy").stat().st_size
    if damage.startswith("old-cache"):  # a cache written before sizes were recorded
        del meta["files"]
        (root / "meta.json").write_text(json.dumps(meta))
    name = {"meta": "meta.json"}.get(damage, "pca-1.npz" if "pca" in damage else "train-1.npy")
    content = (root / name).read_bytes()
    (root / name).write_bytes(b"garbage" if "garbage" in damage else content[:len(content) // 2])
    with pytest.raises(H.data.UsageError, match=message):
        H.Hierarchy(root).features("train", 1)


def test_mocov3_cache_at_256px_with_crops(tmp_path):
    """--encoder mocov3 --pretrained FILE: a tiny ViT in MoCo-v3's checkpoint format; 128 px crops at 256 px are each
    encoded on their own (grid 2), the 4x4 grid pools the token map (64 px crops < --min-crop 65)."""
    vit = enc.build_vit(enc.VITS["tiny"])
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()},
                "vit": enc.VITS["tiny"]}, tmp_path / "moco.pth.tar")
    name = _folder(tmp_path, n=10, size=256)
    args = _args(tmp_path, name, 4, image_size=256, encoder="mocov3", pretrained=str(tmp_path / "moco.pth.tar"),
                 min_crop=65)
    hier = H.build_cache(args)
    assert "mocov3" in hier.root.name and hier.meta["enc_dim"] == 32 and hier.meta["args"]["encoder"] == "mocov3"
    frozen = H.make_encoder(args)
    import data
    x = torch.stack([data.build_dataset(name, "train", 256)[i][0] for i in range(2)])
    crops = frozen.level_features(x, 2, 65)
    torch.testing.assert_close(crops[:, :, 1, 0], frozen.embed(x[:, :, 128:, :128]))
    for m, want in ((1, frozen.embed(x)[:, :, None, None]), (2, crops), (4, frozen.level_features(x, 4, 65))):
        torch.testing.assert_close(torch.from_numpy(hier.features("train", m)[:2].astype(np.float32)), want,
                                   atol=2e-2, rtol=2e-3)
    assert [lv.shape for lv in hier.levels(4, 8)[:-1]] == [(16, 1, 1), (8, 2, 2), (4, 4, 4)]


def test_offline_hub_default_names_the_training_command(tmp_path, monkeypatch, capsys):
    """The default CLIP weights are a hub tag; offline the download fails, and the error is one line naming
    the command that trains an encoder on that dataset, and the flags that use it."""
    def offline(*a, pretrained=None, **kw):
        if pretrained:
            raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b88k'\nmore detail")
        return real(*a, **kw)
    real = enc.open_clip.create_model
    monkeypatch.setattr(enc.open_clip, "create_model", offline)
    name = _folder(tmp_path)
    args = H.get_parser().parse_args(["--data", name, "--depth", "3", "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as e:
        H.data.run_main(H.main, args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"python train_encoder.py --objective mocov3 --train --data {name} --out checkpoints/mocov3-folder-" in err
    assert "--encoder mocov3 --pretrained checkpoints/mocov3-folder-" in err


def test_mocov3_needs_weights_and_a_text_tower(tmp_path):
    args = H.get_parser().parse_args(["--data", f"folder:{tmp_path}", "--encoder", "mocov3"])
    with pytest.raises(H.data.UsageError, match=f"train_encoder.py --objective mocov3 --train --data folder:{tmp_path}"):
        H.resolve_defaults(args)
    args = _args(tmp_path, "glyphs", 2, encoder="mocov3")
    with pytest.raises(H.data.UsageError, match="--text-encoder"):
        H.make_text_encoder(args)
    args.text_encoder = "tiny-clip"  # NAME[:WEIGHTS]: another open_clip model's text tower (random weights here)
    text = H.make_text_encoder(args)
    assert text.text_shape == (16, 64) and text.encode_text(["water"]).shape == (1, 16, 64)


def test_vae_scale_per_dataset():
    assert H.vae_scale("coco") == 0.23010 and H.vae_scale("imagenet") == H.vae_scale("folder:x") == 0.18215
    hier = H.Hierarchy.__new__(H.Hierarchy)
    hier.meta = {"args": {"data": "coco"}}
    assert hier.vae_scale == 0.23010


def test_reduced_cache_gives_the_same_batches(tmp_path, tiny_encoder):
    """write_reduced stores each level reduced, in fp16: LevelData reads the same batches from it (to fp16
    precision) at a fraction of the size; a depth whose reduced latents were not written is refused."""
    hier = H.build_cache(_args(tmp_path, _folder(tmp_path), 3), encoder=tiny_encoder)
    per_image = H.write_reduced(hier, 3, chunk=7)                          # chunks that do not divide N
    levels = hier.levels(3, image_patch=4)[:-1]                            # (32, 1, 1), (16, 2, 2)
    assert per_image == 2 * (32 + 16 * 4)
    idx = [0, 5, 3, 41, 47]
    raw, reduced = (H.LevelData(hier, "train", levels, reduced=r).batch(idx) for r in (False, True))
    for a, b in zip([*raw[1], raw[0]], [*reduced[1], reduced[0]]):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(b, a, atol=4e-3, rtol=1e-3)
        assert not torch.equal(a, b)                                       # really read from the fp16 file
    assert torch.equal(raw[2], reduced[2])
    assert H.np.load(hier.reduced_path("test", levels[1]), mmap_mode="r").dtype == np.float16
    with pytest.raises(H.data.UsageError, match="--reduced-cache"):
        H.LevelData(hier, "train", hier.levels(4, image_patch=4)[:-1], reduced=True)  # z4x4c8 not written
