"""Cascaded sampling: determinism, the unguided path, hierarchical resampling of a reference, outputs, bad input."""

import json
import shutil
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
import sample
import train

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
enc.register_model_config("tiny-clip-sample", TINY)


def train_args(tmp, level, *extra):
    return train.get_parser().parse_args([
        "--data", f"folder:{tmp / 'imgs'}", "--image-size", "16", "--clip", "tiny-clip-sample", "--pretrained", "random",
        "--min-crop", "8", "--image-space", "pixels", "--cache-dir", str(tmp / "cache"), "--level", str(level),
        "--depth", "3", "--model", "tiny", "--batch-size", "16", "--warmup", "10", "--lr", "3e-3", "--ema", "0.5",
        "--steps", "40", "--device", "cpu", "--run-dir", str(tmp / "runs"), "--image-patch", "4", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Depth 3 briefly trained on dark and light images, conditions noise-free (σ = 0)."""
    tmp = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    for name, value in (("dark", 40), ("light", 215)):
        (tmp / "imgs" / name).mkdir(parents=True)
        for k in range(20):
            img = np.clip(value + rng.normal(0, 10, 3), 0, 255).astype(np.uint8) * np.ones((16, 16, 1), np.uint8)
            Image.fromarray(img).save(tmp / "imgs" / name / f"{k}.png")
    train.train(train_args(tmp, 3))
    train.train(train_args(tmp, 2, "--sigma", 0))
    train.train(train_args(tmp, 1, "--sigma", 0, 0))
    return tmp


def sample_args(tmp, *extra):
    return sample.get_parser().parse_args(["--depth", "3", "--run-dir", str(tmp / "runs"), "--n", "6", "--batch", "4",
                                           "--steps", "10", "--device", "cpu", "--out", str(tmp / "out"), "--overwrite", *extra])


def test_same_seed_same_samples_and_npz_format(run):
    a = np.load(sample.main(sample_args(run, "--seed", "3")))["arr_0"]
    b = np.load(sample.main(sample_args(run, "--seed", "3")))["arr_0"]
    c = np.load(sample.main(sample_args(run, "--seed", "4")))["arr_0"]
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert Image.open(run / "out" / "depth3-none.png").size == (3 * 18 + 2, 2 * 18 + 2)


def test_cfg_zero_is_the_unguided_cascade(run):
    out = np.load(sample.main(sample_args(run, "--cfg", "0", "--n", "4")))["arr_0"]
    metas = sample.find_levels(run / "runs", 3, "none")
    g = torch.Generator().manual_seed(0)
    zs = []
    for meta in metas:  # the cascade by hand: clean conditions, plain forward
        model, diffusion = sample.load_level(meta, "cpu")
        clip = 1.0 if meta["target_image"] else None
        zs.append(diffusion.sample(lambda x, t: model(x, t, list(zs)), (4, *meta["target"]), 10, "dpm++", 0.0, g, clip=clip))
    assert np.array_equal(out, data.to_uint8(zs[-1].clamp(-1, 1)))


def test_meta_levels_are_the_levels_each_was_trained_on(run):
    """hierarchy.meta_levels reads back from a level's meta.json the levels train.py built it from."""
    metas = sample.find_levels(run / "runs", 3, "none")
    hier = H.locate_cache(metas[0], metas[0]["dir"])
    for k, meta in enumerate(metas):
        assert H.meta_levels(meta) == hier.levels(3, image_patch=4)[:k + 1]


def test_top_channels_bind_every_latent_level_and_resampling_reads_them(run, tmp_path):
    """--top-channels 4: levels of 4 and 2 channels (not the 16 and 8 of the 32-d encoder), their own run folders
    beside the default ones, told apart by sample.py --top-channels; a reference is resampled through the latents
    of that width."""
    runs = tmp_path / "runs"
    shutil.copytree(run / "runs", runs)                                       # the default widths, 16 and 8
    for level, sigma in ((3, ()), (2, ("--sigma", "0")), (1, ("--sigma", "0", "0"))):
        train.train(train_args(run, level, *sigma, "--steps", "2", "--top-channels", "4", "--run-dir", str(runs)))
    with pytest.raises(data.UsageError, match="--top-channels"):
        sample.find_levels(runs, 3, "none")
    assert [m["key"] for m in sample.find_levels(runs, 3, "none", top_channels=16)] == \
        [m["key"] for m in sample.find_levels(run / "runs", 3, "none")]
    metas = sample.find_levels(runs, 3, "none", top_channels=4)
    assert [m["target"] for m in metas] == [[4, 1, 1], [2, 2, 2], [3, 16, 16]]
    assert metas[-1]["conds"] == [[4, 1, 1], [2, 2, 2]] and "z1x1c4s0+z2x2c2s0" in metas[-1]["key"]
    hier = H.locate_cache(metas[0], metas[0]["dir"])
    assert [lv.channels for lv in hier.levels(3, 4)[:2]] == [16, 8]                      # the paper's rule
    assert hier.reduction(H.meta_levels(metas[0])[0]).kept < hier.reduction(hier.levels(3, 4)[0]).kept
    Image.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(tmp_path / "ref.png")
    out = np.load(sample.main(sample_args(run, "--run-dir", str(runs), "--reference", str(tmp_path / "ref.png"),
                                          "--keep", "2", "--n", "2", "--out", str(tmp_path / "o"),
                                          "--top-channels", "4")))["arr_0"]
    assert out.shape == (2, 16, 16, 3)
    with pytest.raises(data.UsageError, match="--top-channels must be in 1..32"):
        train.train(train_args(run, 3, "--top-channels", "33", "--run-dir", str(runs)))


def test_sigma_picks_among_versions_of_a_level(run, tmp_path):
    """Two image levels differing only in σ_2: without --sigma the choice is an error; σ_3 σ_2 picks one."""
    shutil.copytree(run, tmp_path, dirs_exist_ok=True)
    train.train(train_args(tmp_path, 1, "--sigma", "0", "0.5", "--steps", "2"))
    with pytest.raises(data.UsageError, match="--sigma"):
        sample.find_levels(tmp_path / "runs", 3, "none")
    for sigma in ([0.0, 0.0], [0.0, 0.5]):
        metas = sample.find_levels(tmp_path / "runs", 3, "none", sigma=sigma)
        assert [m["sigmas"] for m in metas] == [[], [0.0], sigma]
    with pytest.raises(data.UsageError, match="2 values"):
        sample.find_levels(tmp_path / "runs", 3, "none", sigma=[0.0])
    with pytest.raises(data.UsageError, match="not trained"):
        sample.find_levels(tmp_path / "runs", 3, "none", sigma=[0.0, 1.0])


def test_guided_eps_uses_noisy_conditions_and_cfg(run):
    meta = sample.find_levels(run / "runs", 3, "none")[2]
    model, _ = sample.load_level(meta, "cpu")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 900])
    conds = [torch.randn(2, *s) for s in meta["conds"]]
    plain = sample.level_eps(model, conds, [0.5, 0.5], None, None, 0.0, float("inf"), 1000, None)(x, t)
    torch.testing.assert_close(plain, model(x, t, conds))
    clean_cfg = sample.level_eps(model, conds, [0.5, 0.5], None, None, 0.7, float("inf"), 1000, None)(x, t)
    torch.testing.assert_close(clean_cfg, model.forward_with_cfg(x, t, conds, w=0.7))
    noisy_cfg = sample.level_eps(model, conds, [0.5, 0.5], None, None, 0.7, 0.3, 1000, torch.Generator().manual_seed(0))(x, t)
    assert not torch.allclose(noisy_cfg, clean_cfg)
    # Table 3's γ row without guidance: the condition noise applies whenever γ is finite, exactly as H.noise_sample
    noisy = sample.level_eps(model, conds, [0.5, 0.5], None, None, 0.0, 0.3, 1000, torch.Generator().manual_seed(0))(x, t)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(noisy, model(x, t, [H.noise_sample(z, 0.5, t, 1000, 0.3, g) for z in conds]))
    assert sample.condition_gamma(None, 0.0) == float("inf") and sample.condition_gamma(None, 0.8) == 0.3
    assert sample.condition_gamma(0.5, 0.0) == 0.5
    # bf16 autocast: the same function to bf16's precision, returned in fp32
    half = sample.level_eps(model, conds, [0.5, 0.5], None, None, 0.7, float("inf"), 1000, None, "bf16")(x, t)
    assert half.dtype == torch.float32 and not torch.equal(half, clean_cfg)
    torch.testing.assert_close(half, clean_cfg, rtol=0, atol=0.05 * clean_cfg.abs().max().item())


class NearestImage(torch.nn.Module):
    """An exact image level for a finite data set: the ε of the training image whose clean latents are nearest
    to the conditions (a tiny trained denoiser is too weak at high noise to test resampling with)."""

    has_conditions = True

    def __init__(self, images, latents, diffusion):
        super().__init__()
        self.images, self.latents, self.diffusion = images, latents, diffusion  # (N, C, H, W), [(N, C_l, M, M)]

    def forward(self, x, t, conds=(), y=None, text=None, force_drop=None):
        d = sum(torch.cdist(c.flatten(1), z.flatten(1)) ** 2 for c, z in zip(conds, self.latents))  # (B, N)
        x0 = self.images[d.argmin(1)]                                                              # (B, C, H, W)
        abar = self.diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    def forward_with_cfg(self, x, t, conds=(), y=None, text=None, w=0.0):
        return self.forward(x, t, conds)


def use_oracle_image_level(run, monkeypatch):
    """Replace the trained image level by NearestImage over the training images; returns those images."""
    ds = data.build_dataset(f"folder:{run / 'imgs'}", "train", 16)
    metas = sample.find_levels(run / "runs", 3, "none")
    hier = H.locate_cache(metas[0], metas[0]["dir"])
    levels = hier.levels(3, 4)
    pairs = [H.LevelData(hier, "train", levels[:2])[i][:2] for i in range(len(ds))]  # (z_2x2, [z_1x1])
    latents = [torch.stack([conds[0] for _, conds in pairs]), torch.stack([z for z, _ in pairs])]
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    load = sample.load_level

    def load_with_oracle(meta, device, use_ema=True):
        model, diffusion = load(meta, device, use_ema)
        return (NearestImage(images, latents, diffusion), diffusion) if meta["target_image"] else (model, diffusion)
    monkeypatch.setattr(sample, "load_level", load_with_oracle)
    return images


def test_keeping_levels_of_a_reference_stays_close_to_it(run, monkeypatch):
    images = use_oracle_image_level(run, monkeypatch)
    path = run / "ref.png"
    Image.fromarray(data.to_uint8(images[30:31])[0]).save(path)  # a training image, as a file
    target = data.to_uint8(images[30:31]).astype(np.float64)
    dist = {}
    for keep in (0, 1, 2):
        out = np.load(sample.main(sample_args(run, "--reference", str(path), "--keep", str(keep), "--cfg", "0",
                                              "--n", "8", "--steps", "20")))["arr_0"]
        dist[keep] = np.abs(out.astype(np.float64) - target).mean()
    assert dist[2] < 1.0                                   # every latent level kept, σ = 0: the reference itself
    assert dist[2] <= dist[1] and dist[2] < dist[0] / 10


def test_dataset_reference_resamples_each_image_once(run, monkeypatch):
    """--reference data:NAME:SPLIT: sample i keeps the latents of image i (evenly spread over the split)."""
    images = use_oracle_image_level(run, monkeypatch)
    spec = f"data:folder:{run / 'imgs'}:train"
    out = np.load(sample.main(sample_args(run, "--reference", spec, "--keep", "2", "--cfg", "0", "--n", "6",
                                          "--steps", "20")))["arr_0"].astype(np.float64)   # 2 batches of 4 + 2
    refs = data.to_uint8(images[data.evenly_spaced(len(images), 6)]).astype(np.float64)
    assert np.abs(out - refs).mean(axis=(1, 2, 3)).max() < 1.0
    assert Image.open(run / "out" / "depth3-none-keep2.png").size == (4 * 18 + 2, 3 * 18 + 2)  # 6 pairs
    with pytest.raises(data.UsageError, match="more than the"):
        sample.main(sample_args(run, "--reference", spec, "--keep", "2", "--n", str(len(images) + 1)))


def test_reference_refuses_a_cache_of_other_encoder_weights(run, monkeypatch, tmp_path):
    """Resampling a reference re-encodes it with the encoder file the cache names; weights retrained into that file
    since (another SHA-1 than the cache's meta.json keeps) would give latents the levels never saw: one line."""
    monkeypatch.setattr(sample.H, "weights_digest", lambda args: "f" * 40)
    with pytest.raises(data.UsageError, match="was encoded with other weights than random"):
        sample.main(sample_args(run, "--reference", str(run / "ref.png"), "--keep", "1", "--out", str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_missing_level_names_the_train_command(run, tmp_path):
    for p in (run / "runs").iterdir():
        if p.name.startswith("image"):
            (tmp_path / "runs" / p.name).mkdir(parents=True)
            (tmp_path / "runs" / p.name / "meta.json").write_text((p / "meta.json").read_text())
    with pytest.raises(data.UsageError, match="python train.py --level 3 --depth 3"):
        sample.main(sample_args(run, "--run-dir", str(tmp_path / "runs")))


@pytest.mark.parametrize("extra, message", [
    (("--prompt", "a cat"), "--cond text"),
    (("--class", "3"), "--cond class"),
    (("--reference", "/nonexistent.png", "--keep", "1"), "cannot read reference"),
    (("--keep", "3", "--reference", "x.png"), "--keep takes 0..2"),
    (("--cfg", "0.1", "0.2"), "2 weights for 3 levels"),
    (("--depth", "0"), "--depth must be >= 1"),
    (("--n", "0"), "--n must be >= 1"),
    (("--batch", "0"), "--batch must be >= 1"),
    (("--steps", "0"), "--steps must be >= 1"),
    (("--steps", "1001"), "more than the 1000 diffusion steps"),
    (("--sampler", "ddim", "--eta", "1.5"), "--eta must be >= 0 and <= 1"),
])
def test_bad_input(run, extra, message):
    with pytest.raises(data.UsageError, match=message):
        sample.main(sample_args(run, *extra))


def test_cfg_count_is_checked_before_any_level_is_read(run, tmp_path):
    with pytest.raises(data.UsageError, match="2 weights for 3 levels"):
        sample.main(sample_args(run, "--run-dir", str(tmp_path / "empty"), "--cfg", "0.1", "0.2"))


def test_sampling_and_evaluation_do_not_import_training():
    """Checkpoint reading and model building live with the model (denoiser.py), not in train.py."""
    code = "import sys, sample, evaluate; assert 'train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)


def relabelled(runs, out, **changes):
    """A copy of the run folder ``runs`` in ``out`` whose levels' meta.json carry ``changes`` (same checkpoints)."""
    for p in runs.iterdir():
        meta = json.loads((p / "meta.json").read_text())
        (out / p.name).mkdir(parents=True)
        (out / p.name / "meta.json").write_text(json.dumps({**meta, **changes}))
        shutil.copy(p / "ckpt.pt", out / p.name)
    return out


def test_class_out_of_range_is_refused(run, tmp_path):
    """The class ids of a class-conditional model are 0..K-1; K (the null index) and above are refused."""
    relabelled(run / "runs", tmp_path / "runs", cond="class", num_classes=2)  # class-conditional, 2 classes
    for bad in ("2", "-1"):
        with pytest.raises(data.UsageError, match=f"--class {bad} is outside 0..1"):
            sample.main(sample_args(run, "--run-dir", str(tmp_path / "runs"), "--cond", "class", "--class", bad))


def test_text_path_picks_among_text_levels_only(run, tmp_path):
    """--text-path chooses between versions of a text model; a class model has no text path, so the flag does not
    hide its levels (it once did, with an error that the levels were not trained)."""
    classes = relabelled(run / "runs", tmp_path / "runs", cond="class", num_classes=2)
    found = [sample.find_levels(classes, 3, "class", text_path=path) for path in (None, "adaln", "tokens")]
    assert [m["dir"] for m in found[0]] == [m["dir"] for m in found[1]] == [m["dir"] for m in found[2]]
    assert len(found[0]) == 3
    text = relabelled(classes, tmp_path / "text", cond="text", text_path="tokens")  # a token-path text model
    assert len(sample.find_levels(text, 3, "text", text_path="tokens")) == 3
    with pytest.raises(data.UsageError, match="not trained"):
        sample.find_levels(text, 3, "text", text_path="adaln")


def test_glyph_class_is_named_by_radical_or_kangxi_number():
    """For glyph models --class takes 金 or 167 (both the internal class 166); other datasets keep the index."""
    glyphs, folder = {"data": "glyphs", "num_classes": 214}, {"data": "folder:x", "num_classes": 2}
    assert sample.class_index("金", glyphs) == sample.class_index("167", glyphs) == 166
    assert sample.class_label(166, glyphs) == "radical 金 (167)" and sample.class_label(1, folder) == "class 1"
    assert sample.class_index("1", folder) == 1
    with pytest.raises(data.UsageError, match="--class '香港' is not a Kangxi radical"):
        sample.class_index("香港", glyphs)


def test_earlier_samples_are_not_overwritten(run, tmp_path):
    args = sample_args(run, "--out", str(tmp_path), "--n", "2")
    first = sample.main(args).read_bytes()
    args.overwrite = False
    with pytest.raises(data.UsageError, match="depth3-none.npz exists; pass --overwrite"):
        sample.main(args)
    assert (tmp_path / "depth3-none.npz").read_bytes() == first


def test_moved_run_folder_with_its_cache_samples_from_any_directory(run, tmp_path, monkeypatch):
    """meta.json holds the cache's path relative to the run folder: moving both together keeps them paired."""
    shutil.copytree(run / "runs", tmp_path / "moved" / "runs")
    shutil.copytree(run / "cache", tmp_path / "moved" / "cache")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = sample.main(sample_args(run, "--run-dir", str(tmp_path / "moved" / "runs"), "--out", "o", "--n", "2"))
    here = sample.main(sample_args(run, "--out", str(tmp_path / "here"), "--n", "2"))
    assert np.array_equal(np.load(moved)["arr_0"], np.load(here)["arr_0"])
    shutil.rmtree(tmp_path / "moved" / "cache")  # the cache elsewhere: found through --cache-dir, or named
    with pytest.raises(data.UsageError, match="latent cache .* not found .* pass --cache-dir"):
        sample.main(sample_args(run, "--run-dir", str(tmp_path / "moved" / "runs"), "--out", "o2", "--n", "2"))
    again = sample.main(sample_args(run, "--run-dir", str(tmp_path / "moved" / "runs"), "--out", "o3", "--n", "2",
                                    "--cache-dir", str(run / "cache")))
    assert np.array_equal(np.load(again)["arr_0"], np.load(here)["arr_0"])


def test_levels_in_a_sibling_run_folder_are_named(run, tmp_path):
    """Typed after make demo (which trains into runs/reproduce-quick), the default folder names where they are."""
    shutil.copytree(run / "runs", tmp_path / "runs" / "reproduce-quick")
    with pytest.raises(data.UsageError, match="is in .*reproduce-quick: pass --run-dir"):
        sample.main(sample_args(run, "--run-dir", str(tmp_path / "runs" / "glyphs")))


@pytest.mark.parametrize("damage, message", [
    ("meta", "meta.json is damaged .* delete its folder and retrain the level"),
    ("other-level", "does not hold the model its meta.json describes"),
    ("empty", "cannot read checkpoint .* damaged or empty"),
])
def test_damaged_level_is_named(run, tmp_path, damage, message):
    shutil.copytree(run / "runs", tmp_path / "runs")
    levels = sorted((tmp_path / "runs").iterdir())
    top = next(p for p in levels if p.name.startswith("z1x1"))
    image = next(p for p in levels if p.name.startswith("image"))
    if damage == "meta":
        (top / "meta.json").write_text((top / "meta.json").read_text()[:40])
    elif damage == "other-level":
        shutil.copy(top / "ckpt.pt", image / "ckpt.pt")
    else:
        (image / "ckpt.pt").write_bytes(b"")
    with pytest.raises(data.UsageError, match=message):
        sample.main(sample_args(run, "--run-dir", str(tmp_path / "runs"), "--cache-dir", str(run / "cache")))


def test_class_conditional_samples_draw_classes_evenly(run, monkeypatch):
    """Without --class, n samples take every class n/num_classes times (ADM/DiT's FID protocol: 50 per class for
    50,000 ImageNet samples), across batches."""
    counts = torch.bincount(sample.even_classes(50_000, 1000), minlength=1000)
    assert counts.min() == counts.max() == 50
    assert torch.bincount(sample.even_classes(7, 3)).tolist() == [3, 2, 2]
    metas = sample.find_levels(run / "runs", 3, "none")
    monkeypatch.setattr(sample, "find_levels", lambda *a, **kw: [m | {"cond": "class", "num_classes": 3} for m in metas])
    load = sample.load_level  # the trained levels are unconditional: load them as such, the sampler is recorded below
    monkeypatch.setattr(sample, "load_level", lambda meta, *a: load(meta | {"num_classes": 0}, *a))
    drawn = []

    def record(levels, weights, n, args, device, generator, y=None, text=None, kept=(), finisher=None):
        drawn.append(y)
        return [torch.zeros(n, *levels[-1][2]["target"])], [0.0] * len(levels)
    monkeypatch.setattr(sample, "sample_batch", record)
    sample.main(sample_args(run, "--cond", "class", "--n", "7"))  # batches of 4 and 3
    assert [len(y) for y in drawn] == [4, 3]
    assert torch.cat(drawn).tolist() == [0, 1, 2, 0, 1, 2, 0]
    drawn.clear()
    sample.main(sample_args(run, "--cond", "class", "--n", "5", "--class", "2"))
    assert torch.cat(drawn).tolist() == [2] * 5


@pytest.mark.parametrize("text_path, text_shape", [("tokens", [6, 24]), ("adaln", [32])])
def test_text_tower_other_than_the_image_encoder(tmp_path, text_path, text_shape):
    """--text-encoder NAME:WEIGHTS: training records the text tower, sampling uses the same one (U-ViT's setup:
    CLIP ViT-L/14 text tokens with another image encoder). A tiny COCO-format dataset, tiny random towers. With
    --text-path adaln the level trains on, records and samples from the pooled embedding (the tower's 32-d)."""
    enc.register_model_config("tiny-text-sample", {**TINY, "text_cfg": {**TINY["text_cfg"], "context_length": 6,
                                                                         "width": 24}})
    root = tmp_path / "coco"
    rng = np.random.default_rng(0)
    for split, n in (("train2014", 8), ("val2014", 4)):
        (root / split).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / f"{k}.png")
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({
            "images": [{"id": k, "file_name": f"{k}.png"} for k in range(n)],
            "annotations": [{"image_id": k, "caption": f"picture {k}"} for k in range(n)]}))
    args = train.get_parser().parse_args([
        "--data", "coco", "--data-path", str(root), "--image-size", "16", "--clip", "tiny-clip-sample",
        "--pretrained", "random", "--text-encoder", "tiny-text-sample:random", "--min-crop", "8",
        "--image-space", "pixels", "--cache-dir", str(tmp_path / "cache"), "--level", "1", "--depth", "1",
        "--model", "tiny", "--batch-size", "4", "--steps", "2", "--cond", "text", "--device", "cpu",
        "--run-dir", str(tmp_path / "runs"), "--image-patch", "4", "--text-path", text_path])
    meta = json.loads((train.train(args).parent / "meta.json").read_text())
    assert meta["text_shape"] == text_shape and meta["text_encoder"] == "tiny-text-sample:random"
    assert meta["text_path"] == text_path and meta["key"].endswith("-text-adaln-tiny" if text_path == "adaln" else "-text-tiny")
    out = sample.main(sample.get_parser().parse_args([
        "--depth", "1", "--run-dir", str(tmp_path / "runs"), "--cond", "text", "--prompt", "water", "--n", "2",
        "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")]))
    assert np.load(out)["arr_0"].shape == (2, 16, 16, 3)


def test_each_level_gets_the_text_input_of_its_text_path():
    """level_texts: token states for the levels trained with the paper's text tokens (and metas older than
    --text-path), the pooled embedding for --text-path adaln; each form encoded once per batch."""
    class Tower:
        calls = []

        def encode_text(self, prompts):
            self.calls.append("tokens")
            return torch.zeros(len(prompts), 6, 24)

        def embed_text(self, prompts):
            self.calls.append("pooled")
            return torch.ones(len(prompts), 32)
    metas = [{"text_path": "adaln"}, {}, {"text_path": "tokens"}, {"text_path": "adaln"}]
    texts = sample.level_texts(Tower(), ["gold", "water"], metas)
    assert [tuple(t.shape) for t in texts] == [(2, 32), (2, 6, 24), (2, 6, 24), (2, 32)]
    assert sorted(Tower.calls) == ["pooled", "tokens"]


def test_finish_below_hands_the_last_image_steps_to_the_depth1_level(run, tmp_path):
    """--finish-below T: the image level's steps at t < T are the depth-1 level's (no latents); T = 0 is the plain
    cascade, T above every sampled timestep the cascade by hand with the depth-1 network drawing the image."""
    shutil.copytree(run / "runs", tmp_path / "runs")
    train.train(train_args(run, 1, "--depth", "1", "--run-dir", str(tmp_path / "runs")))
    args = lambda *extra: sample_args(run, "--run-dir", str(tmp_path / "runs"), "--cache-dir", str(run / "cache"),  # noqa: E731
                                      "--n", "4", "--cfg", "0", *extra)
    plain = np.load(sample.main(args()))["arr_0"]
    assert np.array_equal(np.load(sample.main(args("--finish-below", "0")))["arr_0"], plain)
    finished = np.load(sample.main(args("--finish-below", "1000")))["arr_0"]
    metas = sample.find_levels(tmp_path / "runs", 3, "none")
    (flat,) = sample.find_levels(tmp_path / "runs", 1, "none")
    g = torch.Generator().manual_seed(0)
    zs = []
    for meta in metas:
        model, diffusion = sample.load_level(meta, "cpu")
        net = (lambda x, t: model(x, t, list(zs))) if not meta["target_image"] else \
            (lambda x, t, m=sample.load_level(flat, "cpu")[0]: m(x, t, []))
        clip = 1.0 if meta["target_image"] else None
        zs.append(diffusion.sample(net, (4, *meta["target"]), 10, "dpm++", 0.0, g, clip=clip))
    assert np.array_equal(finished, data.to_uint8(zs[-1].clamp(-1, 1))) and not np.array_equal(finished, plain)
    some = np.load(sample.main(args("--finish-below", "300")))["arr_0"]
    assert not np.array_equal(some, plain) and not np.array_equal(some, finished)
    with pytest.raises(data.UsageError, match="--finish-below needs a depth > 1"):
        sample.main(args("--finish-below", "300", "--depth", "1"))
