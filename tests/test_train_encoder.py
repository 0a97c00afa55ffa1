"""Tests for train_encoder.py: the MoCo-v3 objective (InfoNCE against its formula, momentum update and schedule,
augmentations), its checkpoint read by the frozen encoder, exact resume; the CLIP step and lr schedule. Tiny configs."""
import argparse
import copy
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import data
import encoder
import hierarchy
import train_encoder as te

TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
TINY_MOCO = ["--vit", "tiny", "--mlp-dim", "32", "--dim", "16", "--batch-size", "8", "--image-size", "32",
             "--device", "cpu", "--lr", "1e-3"]


def images(B=2, C=1, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 images in two class folders: dark and light, with noise."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, level in (("dark", 60), ("light", 190)):
        (root / c).mkdir()
        for k in range(20):
            arr = np.clip(level + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{k}.png")
    return f"folder:{root}"


def moco_argv(folder, out, *extra):
    return ["--objective", "mocov3", "--train", "--data", folder, "--out", str(out), *TINY_MOCO,
            "--cache-dir", str(out.parent / "cache"), *map(str, extra)]  # the random KNN row is cached beside out


# ---------------------------------------------------------------------------------------------------------------
# MoCo-v3 objective
# ---------------------------------------------------------------------------------------------------------------

def test_contrastive_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    tau = 0.2
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    by_hand = sum(-torch.log(torch.exp(qn[i] @ kn[i] / tau) / sum(torch.exp(qn[i] @ kn[j] / tau) for j in range(5)))
                  for i in range(5)) / 5 * 2 * tau
    torch.testing.assert_close(te.contrastive_loss(q, k, tau), by_hand)
    q2, k2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(te.symmetric_loss(q, q2, k, k2, tau),
                               te.contrastive_loss(q, k2, tau) + te.contrastive_loss(q2, k, tau))


def test_contrastive_loss_alignment():
    """Orthonormal keys: aligned queries give 2τ log(1 + (B-1) e^(-1/τ)) (near 0), shifted ones a large loss."""
    B, tau = 4, 0.2
    k = torch.eye(B) * 3.0  # any scale: features are normalised
    aligned = te.contrastive_loss(k.clone(), k, tau).item()
    assert aligned == pytest.approx(2 * tau * np.log(1 + (B - 1) * np.exp(-1 / tau)), rel=1e-5)
    assert aligned < 0.01
    shifted = te.contrastive_loss(k.roll(1, 0), k, tau).item()
    assert shifted == pytest.approx(2 * tau * (1 / tau + np.log(1 + (B - 1) * np.exp(-1 / tau))), rel=1e-5)


def test_momentum_update_and_schedule():
    torch.manual_seed(0)
    model = te.MoCo(encoder.VITS["tiny"], mlp_dim=32, dim=16)
    base, mom = model.base_encoder, model.momentum_encoder
    for (name, pq), (_, pk) in zip(base.named_parameters(), mom.named_parameters()):
        assert torch.equal(pq, pk), name  # the momentum encoder starts as a copy
    assert not any(p.requires_grad for p in mom.parameters())
    assert not base.patch_embed.proj.weight.requires_grad and not base.pos_embed.requires_grad  # MoCo-v3's frozen parts
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mom.parameters()]
    buffers = [b.clone() for b in mom.buffers()]
    te.momentum_update(mom, base, 0.9)
    for pk, old, pq in zip(mom.parameters(), before, base.parameters()):
        torch.testing.assert_close(pk, 0.9 * old + 0.1 * pq)
    assert all(torch.equal(a, b) for a, b in zip(buffers, mom.buffers()))  # BN statistics untouched
    assert te.momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert te.momentum_at(0.5, 0.99) == pytest.approx(0.995)
    assert te.momentum_at(1.0, 0.99) == pytest.approx(1.0)


def test_gradients_reach_query_encoder_and_predictor_only():
    torch.manual_seed(0)
    model = te.MoCo(encoder.VITS["tiny"], mlp_dim=32, dim=16).train()
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    model(x1, x2, 0.99, 0.2).backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert model.predictor[0].weight.grad.abs().sum() > 0
    assert model.base_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.base_encoder.patch_embed.proj.weight.grad is None


def test_augment():
    x = images(4, 3, size=48)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    v = te.augment(x, g(), 32)
    assert v.shape == (4, 3, 32, 32) and v.min() >= -1 and v.max() <= 1
    assert torch.equal(v, te.augment(x, g(), 32))                               # the generator decides everything
    assert not torch.allclose(v, te.augment(x, torch.Generator().manual_seed(6), 32))
    flat = torch.full((3, 1, 48, 48), 0.25)                                     # resampling keeps a flat image flat
    torch.testing.assert_close(te.augment(flat, g(), 32, jitter=0.0), torch.full((3, 1, 32, 32), 0.25))
    grey = te.augment(x, g(), 32, grey=1.0)                                     # grey = channel mean
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_step_batches_are_epochs_and_resumable():
    full = list(te.StepBatches(10, 3, seed=0, start=0, steps=6))
    assert [len(b) for b in full] == [3] * 6
    assert len(set(sum(full[:3], []))) == 9 and len(set(sum(full[3:], []))) == 9  # 3 batches per epoch, no repeat
    assert list(te.StepBatches(10, 3, seed=0, start=4, steps=6)) == full[4:]
    with pytest.raises(data.UsageError, match="batch-size"):
        te.StepBatches(2, 3, 0, 0, 1)


def test_checkpoint_round_trip_into_frozen_encoder(folder, tmp_path, capsys):
    out = tmp_path / "moco.pt"
    rows = te.main(moco_argv(folder, out, "--steps", 2))
    assert [r[0] for r in rows] == ["random", "trained", "pixels"] and all(0 <= r[1] <= r[2] <= 1 for r in rows)
    assert "KNN accuracy, K=20" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["vit"] == encoder.VITS["tiny"]
    assert any(k.startswith("module.base_encoder.head.") for k in ckpt["state_dict"])  # the official layout
    model = te.MoCo(ckpt["vit"], mlp_dim=32, dim=16)
    model.load_state_dict({k[len("module."):]: v for k, v in ckpt["state_dict"].items()})
    frozen = encoder.MoCoV3Encoder(str(out))
    x = images(3, 3)
    with torch.no_grad():
        by_hand = model.base_encoder.eval().forward_features(encoder.preprocess(x, 32, frozen.mean, frozen.std))[:, 0]
    torch.testing.assert_close(frozen.embed(x), by_hand, rtol=0, atol=0)
    torch.manual_seed(0)
    init = te.MoCo(encoder.VITS["tiny"], mlp_dim=32, dim=16).base_encoder.eval()  # the KNN report's "random" row
    random_row = te.make_frozen(argparse.Namespace(objective="mocov3", seed=0, device="cpu"), None, encoder.VITS["tiny"])
    with torch.no_grad():
        torch.testing.assert_close(random_row.embed(x),
                                   init.forward_features(encoder.preprocess(x, 32, frozen.mean, frozen.std))[:, 0])


def test_resume_equals_uninterrupted(folder, tmp_path, monkeypatch):
    te.main(moco_argv(folder, tmp_path / "straight.pt", "--steps", 4, "--knn-train", 4))
    saves = []
    real_save = te.save_atomic

    def crash_after_first_save(obj, path):
        real_save(obj, path)
        saves.append(path)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(te, "save_atomic", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        te.main(moco_argv(folder, tmp_path / "resumed.pt", "--steps", 4, "--ckpt-every", 2))
    monkeypatch.setattr(te, "save_atomic", real_save)
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 2
    with pytest.raises(data.UsageError, match="--resume"):
        te.main(moco_argv(folder, tmp_path / "resumed.pt", "--steps", 4))
    with pytest.raises(data.UsageError, match="--mlp-dim"):
        te.main(moco_argv(folder, tmp_path / "resumed.pt", "--steps", 4, "--resume", "--mlp-dim", 64))
    te.main(moco_argv(folder, tmp_path / "resumed.pt", "--steps", 4, "--ckpt-every", 2, "--resume", "--knn-train", 4))
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    stamp = (tmp_path / "resumed.pt").stat().st_mtime_ns  # resuming a finished run changes nothing
    te.main(moco_argv(folder, tmp_path / "resumed.pt", "--steps", 4, "--resume", "--knn-train", 4))
    assert (tmp_path / "resumed.pt").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------------------------------
# KNN report: the random row's cache, the trained row from a latent cache
# ---------------------------------------------------------------------------------------------------------------

def knn_argv(folder, weights, cache_dir, *extra):
    return ["--objective", "mocov3", "--knn", "--pretrained", str(weights), "--data", folder, "--image-size", "32",
            "--device", "cpu", "--cache-dir", str(cache_dir), *map(str, extra)]


@pytest.fixture()
def count_embeddings(monkeypatch):
    """Records every encoder pass over the dataset of the KNN report (one per encoder row computed)."""
    calls, real = [], te.knn_of

    def counted(enc, *args):
        calls.extend([] if enc is None else [1])  # the pixel row (enc None) runs no encoder
        return real(enc, *args)
    monkeypatch.setattr(te, "knn_of", counted)
    return calls


def test_random_row_is_cached_by_what_it_depends_on(folder, tmp_path, count_embeddings):
    weights = tmp_path / "moco.pt"
    assert te.main(moco_argv(folder, weights, "--steps", 1, "--skip-knn")) == [] and not count_embeddings
    argv = knn_argv(folder, weights, tmp_path / "c")
    fresh = te.main(argv)                                   # miss: both rows embedded, the random row stored
    assert len(count_embeddings) == 2
    files = list((tmp_path / "c" / "knn").glob("random-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["top1_top5"] == list(fresh[0][1:])
    assert te.main(argv) == fresh and len(count_embeddings) == 3  # hit: the random row read, equal to the fresh one
    te.main(argv + ["--seed", "1"])                         # another initialisation: a miss
    te.main(argv + ["--knn-train", "20"])                   # another training subset: a miss
    assert len(count_embeddings) == 7 and len(list((tmp_path / "c" / "knn").glob("random-*.json"))) == 3


def test_no_random_row_embeds_once_and_reports_the_same_trained_row(folder, tmp_path, count_embeddings):
    weights = tmp_path / "moco.pt"
    te.main(moco_argv(folder, weights, "--steps", 1, "--skip-knn"))
    fresh = te.main(knn_argv(folder, weights, tmp_path / "c"))
    assert [row[0] for row in fresh] == ["random", "trained", "pixels"] and len(count_embeddings) == 2
    rows = te.main(knn_argv(folder, weights, tmp_path / "c2", "--no-random-row"))
    assert rows == fresh[1:] and len(count_embeddings) == 3            # one pass: the trained row's
    assert not (tmp_path / "c2" / "knn").exists()                      # nothing computed, nothing stored


def test_trained_row_reads_the_latent_cache(folder, tmp_path, count_embeddings):
    weights = tmp_path / "moco.pt"
    te.main(moco_argv(folder, weights, "--steps", 1, "--skip-knn"))
    args = hierarchy.get_parser().parse_args(["--data", folder, "--image-size", "32", "--encoder", "mocov3",
                                              "--pretrained", str(weights), "--image-space", "pixels", "--depth", "2",
                                              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    hier = hierarchy.build_cache(hierarchy.resolve_defaults(args))
    frozen = encoder.MoCoV3Encoder(str(weights))
    for split in ("train", "test"):  # the float32 embeddings are those the report computes
        feats, _ = te.dataset_features(frozen, data.build_dataset(folder, split, 32))
        assert torch.equal(torch.from_numpy(np.array(hier.embeddings(split))), feats)
    argv = knn_argv(folder, weights, tmp_path / "c")
    fresh = te.main(argv)
    assert len(count_embeddings) == 2
    assert te.main(argv + ["--latent-cache", str(hier.root)]) == fresh and len(count_embeddings) == 2  # no pass at all
    assert te.main(argv + ["--latent-cache", str(hier.root), "--knn-train", "20"])[1] == \
        te.main(argv + ["--knn-train", "20"])[1]
    other = tmp_path / "other.pt"
    other.write_bytes(weights.read_bytes())
    with pytest.raises(data.UsageError, match="drop --latent-cache"):  # the cache of other weights
        te.main(knn_argv(folder, other, tmp_path / "c", "--latent-cache", str(hier.root)))
    for split in ("train", "test"):  # a cache written before the embeddings were kept: the report embeds
        (hier.root / f"{split}-embed.npy").unlink()
    meta = json.loads((hier.root / "meta.json").read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if "embed" not in k}
    (hier.root / "meta.json").write_text(json.dumps(meta))
    calls = len(count_embeddings)
    assert te.main(argv + ["--latent-cache", str(hier.root)]) == fresh and len(count_embeddings) == calls + 1


def test_pixel_row_is_the_knn_of_the_flattened_images(folder, tmp_path):
    weights = tmp_path / "moco.pt"
    te.main(moco_argv(folder, weights, "--steps", 1, "--skip-knn"))
    rows = te.main(knn_argv(folder, weights, tmp_path / "c"))
    splits = [data.build_dataset(folder, split, 32) for split in ("train", "test")]
    items = [[ds[i] for i in range(len(ds))] for ds in splits]
    flat = [(torch.stack([x for x, _, _ in it]).flatten(1), torch.tensor([y for _, y, _ in it])) for it in items]
    assert [r[0] for r in rows] == ["random", "trained", "pixels"]
    assert rows[2][1:] == encoder.knn_accuracy(*flat[0], *flat[1], k=20) == (1.0, 1.0)  # dark and light: by brightness
    big = te.main(knn_argv(folder, weights, tmp_path / "c", "--image-size", te.PIXEL_ROW_MAX_SIZE + 8))
    assert [r[0] for r in big] == ["random", "trained"]  # too large to search in pixel space


# ---------------------------------------------------------------------------------------------------------------
# CLIP objective (the glyph CLIP)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_name():
    encoder.register_model_config("tiny-te-clip", TINY_CLIP)
    return "tiny-te-clip"


def clip_losses(name, precision, steps=4):
    """The losses of ``steps`` glyph-CLIP steps from seed 0 on one batch of 16."""
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    tokens = open_clip.get_tokenizer(name)([f"glyph number {i}" for i in range(16)])
    x = images(16, 1, seed=2)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    opt = te.make_optimizer(model, 1e-3, 0.1)
    loss_fn = open_clip.loss.ClipLoss()
    return [te.clip_step(model, opt, loss_fn, x, tokens, mean, std, precision) for _ in range(steps)]


def test_clip_steps_decrease_loss_in_fp32_and_bf16(tiny_name):
    fp32, bf16 = clip_losses(tiny_name, "fp32"), clip_losses(tiny_name, "bf16")
    assert fp32[-1] < fp32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1, (fp32, bf16)
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02) and bf16[0] != fp32[0]  # same weights, bf16 arithmetic


def test_cosine_lr():
    assert te.cosine_lr(0, 0.0, 1.0, warmup=10) == pytest.approx(0.1)  # warm-up
    assert te.cosine_lr(9, 0.0, 1.0, warmup=10) == pytest.approx(1.0)
    assert te.cosine_lr(50, 0.5, 1.0, warmup=10) == pytest.approx(0.5)  # cosine half-way
    assert te.cosine_lr(99, 1.0, 1.0, warmup=10) == pytest.approx(0.0)


def test_cli_errors(capsys, folder):
    with pytest.raises(SystemExit) as e:
        data.run_main(te.main, ["--knn"])
    assert e.value.code == 2 and "--pretrained" in capsys.readouterr().err
    with pytest.raises(data.UsageError, match="captions"):  # a folder of images has no captions: CLIP cannot train
        te.main(["--objective", "clip", "--train", "--data", folder, "--steps", "1"])


def test_bf16_autocast_gives_the_fp32_loss_and_gradient():
    """--precision bf16: the same symmetric loss and query-encoder gradient as fp32 to bf16 precision, with the
    ViT's attention off torch's CPU flash kernel."""
    torch.manual_seed(0)
    model = te.MoCo(encoder.VITS["tiny"], mlp_dim=32, dim=16).train()
    x1, x2 = images(8, 3, seed=1), images(8, 3, seed=2)

    def loss_and_grad(precision):
        m = te.plain_attention(copy.deepcopy(model), torch.device("cpu"), precision)
        with te.autocast(torch.device("cpu"), precision):
            loss = m(x1, x2, 0.99, 0.2)
        loss.backward()
        return m, loss.float(), torch.cat([p.grad.flatten() for p in m.base_encoder.blocks.parameters()])

    ref_model, ref, g_ref = loss_and_grad("fp32")
    bf_model, loss, g = loss_and_grad("bf16")
    assert all(blk.attn.fused_attn for blk in ref_model.base_encoder.blocks)
    assert not any(blk.attn.fused_attn for blk in bf_model.base_encoder.blocks)
    assert abs(loss - ref) < 0.05 * ref and loss != ref  # logits are scaled by 1/τ = 5
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) > 0.7  # 0.83 here; unrelated directions: ~0
