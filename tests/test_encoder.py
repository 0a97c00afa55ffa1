"""Tests for encoder.py: crop operator C(x, M) (paper §3.3), frozen encoder features per level (§2.2), weights
round trip, usage errors; the MoCo-v3 ViT against timm with a synthetic checkpoint in the official key format.
Tiny random open_clip and timm configs, offline."""
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import data
import encoder

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_name():
    encoder.register_model_config("tiny-test-clip", TINY)
    return "tiny-test-clip"


def make_encoder(name, pretrained=None, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encoder.Encoder(name, pretrained)


@pytest.fixture(scope="module")
def enc(tiny_name):
    return make_encoder(tiny_name)


def images(B=2, C=1, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, size, size, generator=g) * 2 - 1


def test_crop_grid_round_trip_and_order():
    x = torch.randn(2, 3, 12, 18)
    M = 3
    c = encoder.crop_grid(x, M)
    assert c.shape == (2 * M * M, 3, 4, 6)
    for b in range(2):
        for i in range(M):
            for j in range(M):
                assert torch.equal(c[b * M * M + i * M + j], x[b, :, 4 * i:4 * i + 4, 6 * j:6 * j + 6])
    with pytest.raises(data.UsageError):
        encoder.crop_grid(torch.randn(1, 3, 10, 10), 3)


def test_glyph_clip_registered():
    assert open_clip.get_model_config("glyph-clip") == encoder.GLYPH_CLIP
    e = make_encoder("glyph-clip")
    assert (e.dim, e.image_size, e.grid, e.text_shape) == (128, 32, 8, (32, 192))


def test_embed_normalisation_and_grey(enc):
    x = images(3, 1)
    f = enc.embed(x)
    assert f.shape == (3, enc.dim) == (3, 64)
    assert torch.equal(f, enc.embed(x.repeat(1, 3, 1, 1)))  # grey == the same image in 3 channels
    mean = torch.tensor(enc.model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(enc.model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    by_hand = enc.model.encode_image(((x.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std)
    torch.testing.assert_close(f, by_hand)
    big = F.interpolate(x, scale_factor=2, mode="nearest")  # 64 px input is resized to 32 px
    assert enc.embed(big).shape == (3, 64)
    torch.testing.assert_close(enc.embed(x[:1]), f[:1], rtol=1e-5, atol=1e-5)  # batching changes only float rounding


    torch.testing.assert_close(enc.embed(x[:1]), f[:1])  # batching does not change results (up to float order)
    with pytest.raises(data.UsageError):
        enc.embed(torch.zeros(1, 2, 32, 32))


def test_token_map_is_projected_final_tokens(enc):
    x = images(2, 3)
    t = enc.token_map(x)
    assert t.shape == (2, enc.dim, enc.grid, enc.grid) == (2, 64, 4, 4)
    v = enc.model.visual
    mean, std = enc.mean, enc.std
    with torch.no_grad():  # the ViT run by hand: tokens after the last block and ln_post, CLS dropped, projected
        h = v.ln_post(v.transformer(v._embeds(((x + 1) / 2 - mean) / std)))[:, 1:] @ v.proj  # (B, 16, D)
    torch.testing.assert_close(t, h.transpose(1, 2).reshape(2, 64, 4, 4))


def test_level_features_crops_and_pooled(enc):
    x = images(2, 1, size=64)
    crops = enc.level_features(x, 2, min_crop=16)  # 32 px crops >= 16: each crop encoded separately
    assert crops.shape == (2, enc.dim, 2, 2)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(crops[:, :, i, j], enc.embed(x[:, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32]))
    pooled = enc.level_features(x, 2, min_crop=64)  # 32 px crops < 64: pooled token map
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(enc.token_map(x), 2))
    assert not torch.allclose(pooled, crops)
    torch.testing.assert_close(enc.level_features(x, 1), enc.embed(x)[:, :, None, None])


def test_encoder_frozen(enc):
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training and not any(m.training for m in enc.modules())
    x = images(1).requires_grad_(True)
    assert not enc.embed(x).requires_grad


def test_weights_round_trip(tmp_path, tiny_name, enc):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": enc.model.state_dict()}, path)
    other = make_encoder(tiny_name, seed=1)
    x = images(2)
    assert not torch.allclose(other.embed(x), enc.embed(x))  # a different init really differs...
    loaded = make_encoder(tiny_name, str(path), seed=1)
    assert torch.equal(loaded.embed(x), enc.embed(x))  # ...and loading the file restores the features exactly
    assert torch.equal(loaded.token_map(x), enc.token_map(x))
    torch.save(enc.model.state_dict(), str(tmp_path / "plain.pt"))  # plain state dicts load too
    assert torch.equal(make_encoder(tiny_name, str(tmp_path / "plain.pt")).embed(x), enc.embed(x))


def test_usage_errors(tmp_path, tiny_name):
    with pytest.raises(data.UsageError, match="train_encoder.py --objective clip --train"):
        encoder.Encoder(tiny_name, str(tmp_path / "missing.pt"))
    with pytest.raises(data.UsageError, match="list_models"):
        encoder.Encoder("no-such-model")


def test_text(enc):
    caps = ["water, liquid", "fire", ""]
    h = enc.encode_text(caps)
    assert h.shape == (3, *enc.text_shape) == (3, 16, 64)
    tokens = enc.tokenizer(caps)
    pooled = h[torch.arange(3), tokens.argmax(-1)] @ enc.model.text_projection  # CLIP pools at the EOT token
    torch.testing.assert_close(enc.embed_text(caps), pooled)


# ---------------------------------------------------------------------------------------------------------------
# MoCo-v3 ViT (timm) from a checkpoint in the official format
# ---------------------------------------------------------------------------------------------------------------

def mocov3_file(path, cfg, seed=3, **extra):
    """A synthetic MoCo-v3 checkpoint: a timm ViT's weights under module.base_encoder.*, plus the projection head,
    momentum encoder and predictor keys of the official file, which the encoder must ignore. Returns the timm model."""
    torch.manual_seed(seed)
    vit = VisionTransformer(num_classes=0, **cfg).eval()  # plain timm ViT: learned (random) position embedding
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state["module.base_encoder.head.0.weight"] = torch.randn(64, cfg["embed_dim"])
    state |= {f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in vit.state_dict().items()}
    state["module.predictor.0.weight"] = torch.randn(64, 16)
    torch.save({"state_dict": state, "epoch": 300, **extra}, path)
    return vit


@pytest.fixture(scope="module")
def moco(tmp_path_factory):
    path = tmp_path_factory.mktemp("moco") / "vit-tiny.pth.tar"
    vit = mocov3_file(path, encoder.VITS["tiny"], vit=encoder.VITS["tiny"])
    return vit, encoder.MoCoV3Encoder(str(path))


def test_mocov3_features_equal_timm(moco):
    vit, enc = moco
    assert (enc.dim, enc.image_size, enc.grid) == (32, 32, 4) and enc.text_shape is None
    x = images(3, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet mean/std
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = vit.forward_features(((x.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std)  # (B, 1 + 16, 32), final norm
    torch.testing.assert_close(enc.embed(x), tokens[:, 0], rtol=0, atol=0)          # [CLS] after the final norm
    torch.testing.assert_close(enc.token_map(x), tokens[:, 1:].transpose(1, 2).reshape(3, 32, 4, 4), rtol=0, atol=0)
    assert not any(p.requires_grad for p in enc.parameters())


def test_mocov3_levels_crops_and_pooled(moco):
    _, enc = moco
    x = images(2, 3, size=64)
    crops = enc.level_features(x, 2, min_crop=16)  # 32 px crops: each encoded on its own
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(crops[:, :, i, j], enc.embed(x[:, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32]))
    torch.testing.assert_close(enc.level_features(x, 4, min_crop=64), F.adaptive_avg_pool2d(enc.token_map(x), 4))
    torch.testing.assert_close(enc.level_features(x, 1), enc.embed(x)[:, :, None, None])


def test_mocov3_official_arch_and_errors(tmp_path):
    mocov3_file(tmp_path / "small.pth.tar", encoder.VITS["tiny"], arch="vit_small")  # official files name their arch
    cfg, state = encoder.read_mocov3(str(tmp_path / "small.pth.tar"))
    assert cfg == encoder.VITS["S/16"] == dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12)
    assert "cls_token" in state and not any(k.startswith(("head", "module")) for k in state)
    with pytest.raises(data.UsageError, match="does not fit"):  # tiny weights, ViT-S config: one-line error
        encoder.MoCoV3Encoder(str(tmp_path / "small.pth.tar"))
    with pytest.raises(data.UsageError, match="train_encoder.py --objective mocov3"):
        encoder.MoCoV3Encoder(str(tmp_path / "missing.pth.tar"))
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, tmp_path / "clip.pt")
    with pytest.raises(data.UsageError, match="module.base_encoder"):
        encoder.MoCoV3Encoder(str(tmp_path / "clip.pt"))


def test_mocov3_sincos_position_embedding():
    pe = encoder.sincos_pos_embed(3, 8)  # (1, 1 + 9, 8): zero for [CLS], then sin/cos of row and column per patch
    assert pe.shape == (1, 10, 8) and torch.equal(pe[0, 0], torch.zeros(8))
    row, col = 1, 2  # patch (row 1, column 2) is token 1 + 1*3 + 2
    omega = 1 / 10000 ** (torch.arange(2) / 2)
    expect = torch.cat([torch.sin(row * omega), torch.cos(row * omega), torch.sin(col * omega), torch.cos(col * omega)])
    torch.testing.assert_close(pe[0, 1 + 3 * row + col], expect)
    vit = encoder.build_vit(encoder.VITS["tiny"])
    assert torch.equal(vit.pos_embed, encoder.sincos_pos_embed(4, 32)) and not vit.pos_embed.requires_grad


def test_caption_cache_runs_the_text_tower_once_per_caption(tiny_name):
    """cached_text: one text-tower pass per distinct caption, never again; a cache filled from a split holds the
    same states whatever order the batches come in (so a resumed run reads the same states)."""
    a, b = make_encoder(tiny_name), make_encoder(tiny_name)
    calls = []
    real = a.encode_text
    a.encode_text = lambda captions: calls.append(list(captions)) or real(captions)
    first = a.cached_text(["water", "gold", "water"])                                  # (3, 16, 64)
    again = a.cached_text(["gold", "tree", "gold"])
    assert calls == [["gold", "water"], ["tree"]]                                      # sorted, each once
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], again[0])
    torch.testing.assert_close(first, real(["water", "gold", "water"]), rtol=1e-5, atol=1e-5)  # one batched pass
    split = ["tree", "water", "gold", "fire", "earth"]
    a.caption_states, b.caption_states = {}, {}
    a.cache_captions(split, chunk=2)
    b.cache_captions(split[::-1], chunk=2)
    assert calls[-3:] == [["earth", "fire"], ["gold", "tree"], ["water"]]
    assert a.caption_states.keys() == set(split)
    assert all(torch.equal(a.caption_states[c], b.caption_states[c]) for c in split)
    assert torch.equal(a.cached_text(["gold", "earth"]), torch.stack([real(["gold", "tree"])[0], real(["earth", "fire"])[0]]))
    assert len(calls) == 5                                                             # all read from the cache


def test_pooled_caption_cache_holds_the_pooled_embeddings_apart_from_the_token_states(tiny_name):
    """cached_text(pooled=True) (train.py --text-path adaln): CLIP's pooled text embedding of each caption, from
    one tower pass per distinct caption, in a cache of its own; the token-state cache is left empty."""
    a = make_encoder(tiny_name)
    calls = []
    real = a.embed_text
    a.embed_text = lambda captions: calls.append(list(captions)) or real(captions)
    first = a.cached_text(["water", "gold", "water"], pooled=True)                     # (3, 32)
    again = a.cached_text(["gold", "tree"], pooled=True)
    assert first.shape == (3, a.dim) and calls == [["gold", "water"], ["tree"]]
    torch.testing.assert_close(first, real(["water", "gold", "water"]), rtol=1e-5, atol=1e-5)
    assert torch.equal(again[0], first[1])
    assert a.caption_embeddings.keys() == {"gold", "tree", "water"} and a.caption_states == {}


def test_pixel_encoder_levels_are_each_cells_thumbnail():
    """z of a 16 px cell is its own pixels (grey, [-1, 1]); a larger cell is its bicubic 16x16 thumbnail, a smaller
    one upsampled; the whole image is the 1x1 level. Every grid comes from the crops, whatever min_crop says."""
    pix = encoder.PixelEncoder()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grey = x.mean(1, keepdim=True)
    f = pix.features(x, [1, 2, 4], min_crop=64)
    assert pix.dim == 256 and {M: tuple(v.shape) for M, v in f.items()} == {1: (2, 256, 1, 1), 2: (2, 256, 2, 2),
                                                                            4: (2, 256, 4, 4)}
    torch.testing.assert_close(f[2][1, :, 0, 1], grey[1, 0, :16, 16:].flatten(), atol=1e-5, rtol=0)  # top right
    thumb = F.interpolate((grey + 1) / 2, size=16, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(f[1][:, :, 0, 0], (thumb * 2 - 1).flatten(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(pix.embed(x), f[1][:, :, 0, 0])
