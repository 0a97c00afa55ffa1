"""denoiser.py: adaLN-Zero init, CFG equivalences with force_drop, the joint null swap, the paper's token
layout for depths 1-5, gradient flow to every condition path, and GMACs against a closed form."""
import pytest
import torch

from data import UsageError
from denoiser import SIZES, Attention, Denoiser, build_model, count_params, forward_gmacs, patchify, token_patch, unpatchify

# paper layout (shared/paper.md §2.2), top-down: z_5 1x1x256, z_4 2x2x128, z_3 4x4x64, z_2 8x8x32; image 4x32x32
LATENTS = [(256, 1, 1), (128, 2, 2), (64, 4, 4), (32, 8, 8)]
IMAGE, IMAGE_PATCH = (4, 32, 32), 2


def paper_levels(depth):
    """[(target_shape, patch, cond_shapes)] of a depth-`depth` model, top level first."""
    latents = LATENTS[: depth - 1]
    levels = [(s, token_patch(s[1]), latents[:i]) for i, s in enumerate(latents)]
    return levels + [(IMAGE, IMAGE_PATCH, latents)]


def perturb(model, seed=0, std=0.05):
    """Make the zero-initialised adaLN / output layers non-zero so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def full_model(B=3, seed=0):
    """A tiny denoiser with two latent conditions, 5 classes and 6 text tokens, plus a batch of inputs."""
    model = Denoiser((3, 8, 8), 2, cond_shapes=[(16, 1, 1), (8, 4, 4)], num_classes=5, text_shape=(6, 12))
    g = torch.Generator().manual_seed(seed)
    inputs = dict(x=torch.randn(B, 3, 8, 8, generator=g), t=torch.randint(0, 1000, (B,), generator=g),
                  conds=[torch.randn(B, 16, 1, 1, generator=g), torch.randn(B, 8, 4, 4, generator=g)],
                  y=torch.randint(0, 5, (B,), generator=g), text=torch.randn(B, 6, 12, generator=g))
    return model, inputs


def test_fresh_denoiser_outputs_exactly_zero():
    model, inp = full_model()
    out = model(**inp)
    assert out.shape == inp["x"].shape and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(model.forward_with_cfg(**inp, w=1.5), torch.zeros_like(out))


def test_cfg_w0_equals_conditional_forward():
    model, inp = full_model()
    perturb(model).eval()
    cond = model(**inp)
    assert cond.abs().max() > 1e-3
    torch.testing.assert_close(model.forward_with_cfg(**inp, w=0.0), cond, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(**inp, force_drop=torch.zeros(3, dtype=torch.bool)), cond)  # eval: no random drop


@pytest.mark.parametrize("w", [0.4, 1.0, 3.0])
def test_cfg_equals_doubled_batch_closed_form(w):
    model, inp = full_model()
    perturb(model).eval()
    f_c = model(**inp, force_drop=torch.zeros(3, dtype=torch.bool))
    f_u = model(**inp, force_drop=torch.ones(3, dtype=torch.bool))
    assert (f_c - f_u).abs().max() > 1e-3  # null conditions change the output
    torch.testing.assert_close(model.forward_with_cfg(**inp, w=w), (1 + w) * f_c - w * f_u, rtol=1e-4, atol=1e-5)


def test_null_conditions_swap_together_per_sample():
    model, inp = full_model(B=64)
    perturb(model)
    model.eval()
    f_c = model(**inp, force_drop=torch.zeros(64, dtype=torch.bool))
    f_u = model(**inp, force_drop=torch.ones(64, dtype=torch.bool))
    model.train()
    model.p_uncond = 0.5
    torch.manual_seed(0)
    out = model(**inp)
    err_c = (out - f_c).flatten(1).abs().amax(1)  # (B,)
    err_u = (out - f_u).flatten(1).abs().amax(1)
    is_c, is_u = err_c < 1e-5, err_u < 1e-5
    assert (is_c ^ is_u).all()  # each sample is entirely conditional or entirely null: one Bernoulli for all
    assert 10 < is_u.sum() < 54  # about half dropped
    model.p_uncond = 1.0
    torch.testing.assert_close(model(**inp), f_u, rtol=1e-5, atol=1e-6)
    mask = torch.arange(64) % 2 == 0  # force_drop overrides random dropout in training mode
    torch.testing.assert_close(model(**inp, force_drop=mask), torch.where(mask[:, None, None, None], f_u, f_c),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_paper_layout_shapes_and_token_counts(depth):
    tokens = {(256, 1, 1): 1, (128, 2, 2): 4, (64, 4, 4): 4, (32, 8, 8): 16, IMAGE: 256}
    for target, patch, conds in paper_levels(depth):
        model = perturb(Denoiser(target, patch, cond_shapes=conds, size="tiny")).eval()
        seen = []
        model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        x = torch.randn(2, *target)
        out = model.forward_with_cfg(x, torch.tensor([0, 999]), [torch.randn(2, *c) for c in conds], w=0.5)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert seen[0] == (4 if conds else 2, tokens[target] + sum(tokens[c] for c in conds), 64)
        assert [p.shape[1] for p in model.cond_null] == [tokens[c] for c in conds]


def test_gradients_reach_every_condition_path():
    model, inp = full_model(B=4)
    perturb(model).train()
    out = model(**inp, force_drop=torch.tensor([True, False, True, False]))
    out.square().sum().backward()
    named = dict(model.named_parameters())
    for name in ["cond_embedders.0.weight", "cond_embedders.1.weight", "cond_pos.0", "cond_pos.1", "cond_null.0",
                 "cond_null.1", "text_embedder.weight", "text_pos", "text_null", "x_embedder.weight"]:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    y_grad = model.y_embedder.weight.grad  # (num_classes + 1, D): the used labels and the null class
    used = set(inp["y"][[1, 3]].tolist()) | {5}
    assert all(y_grad[i].abs().sum() > 0 for i in used)
    assert all(y_grad[i].abs().sum() == 0 for i in set(range(6)) - used)


def test_unconditional_model_and_input_checks():
    model = perturb(Denoiser((1, 8, 8), 4)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    assert not model.has_conditions and full_model()[0].has_conditions
    assert torch.equal(model.forward_with_cfg(x, t, w=2.0), model(x, t))
    with pytest.raises(UsageError):
        model(x, t, conds=[torch.randn(2, 4, 1, 1)])
    with pytest.raises(UsageError):
        full_model()[0](x, t)  # conditions missing
    with pytest.raises(UsageError):
        Denoiser((1, 8, 8), 3)  # patch does not divide
    with pytest.raises(UsageError):
        Denoiser((1, 8, 8), 2, size="M")


def test_patchify_round_trip_and_token_patch():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    torch.testing.assert_close(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))  # (p, p, C) inside a patch
    assert torch.equal(unpatchify(p, 4, 3, 8, 12), x)
    assert [token_patch(m) for m in (1, 2, 4, 8, 16)] == [1, 1, 2, 2, 2]


def test_gmacs_match_closed_form_on_cpu_and_meta():
    """Linear layers (x/cond/text embed, adaLN, qkv, proj, MLP, head) + attention 2 N^2 D per block."""
    B, D, depth = 2, SIZES["tiny"]["width"], SIZES["tiny"]["depth"]
    model, inp = full_model(B)
    inp.pop("x"), inp.pop("t")
    n_x, n = 16, 16 + 1 + 4 + 6  # target 8x8 patch 2; conds 1x1 -> 1, 4x4 -> 4 tokens; 6 text tokens
    macs = (n_x * 12 * D + 256 * D + D * D + 1 * 16 * D + 4 * 32 * D + 6 * 12 * D  # embedders
            + depth * (6 * D * D + n * 12 * D * D + 2 * n * n * D)  # adaLN-Zero blocks
            + 2 * D * D + n_x * D * 12)  # final adaLN + head
    x, t = torch.randn(B, 3, 8, 8), torch.zeros(B, dtype=torch.long)
    assert forward_gmacs(model, x, t, **inp) == pytest.approx(macs / 1e9, rel=1e-9)
    with torch.device("meta"):
        meta = Denoiser((3, 8, 8), 2, cond_shapes=[(16, 1, 1), (8, 4, 4)], num_classes=5, text_shape=(6, 12))
        meta_inp = {k: [c.to("meta") for c in v] if k == "conds" else v.to("meta") for k, v in inp.items()}
        assert forward_gmacs(meta, x.to("meta"), t.to("meta"), **meta_inp) == pytest.approx(macs / 1e9, rel=1e-9)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_depth5_costs_at_most_30_percent_more_than_depth1_size_B():
    """paper.md §3.3: L=5 costs 33.98 / 26.82 = 1.27x the GFLOPs of L=1 (we use DiT-B instead of U-ViT)."""
    def gmacs(depth):
        total = 0.0
        with torch.device("meta"):  # shapes only: no weights are allocated or multiplied
            for target, patch, conds in paper_levels(depth):
                model = Denoiser(target, patch, cond_shapes=conds, size="B")
                total += forward_gmacs(model, torch.zeros(1, *target), torch.zeros(1, dtype=torch.long),
                                       conds=[torch.zeros(1, *c) for c in conds])
        return total
    g = [gmacs(d) for d in range(1, 6)]
    assert all(a < b for a, b in zip(g, g[1:]))
    assert 1.15 < g[4] / g[0] <= 1.30


def test_grid_path_adds_each_condition_token_to_the_target_tokens_it_covers():
    # target 3x8x8 with patch 2: 4x4 tokens; conditions 1x1 (covers all) and 4x4 -> patch 2 -> 2x2 tokens
    model = perturb(Denoiser((3, 8, 8), 2, cond_shapes=[(16, 1, 1), (8, 4, 4)], cond_path="grid")).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 900])
    conds = [torch.randn(2, 16, 1, 1, generator=g), torch.randn(2, 8, 4, 4, generator=g)]
    model(x, t, conds)
    moved = conds[1].clone()
    moved[:, :, :2, 2:] += 1.0  # the top-right 2x2 cell of the 4x4 level = its token (0, 1)
    model(x, t, [conds[0], moved])
    model(x, t, [conds[0] + 1.0, conds[1]])
    base, right, top = (h.reshape(2, 4, 4, -1) for h in seen)  # (B, 4, 4, D): no extra tokens
    changed = (right - base).abs().amax((0, 3)) > 1e-6  # (4, 4) target tokens the edit reached
    assert changed[:2, 2:].all() and changed.sum() == 4  # exactly the 2x2 target tokens under that cell
    assert ((top - base).abs().amax((0, 3)) > 1e-6).all()  # the 1x1 level reaches every target token
    for drop, same in ((torch.ones(2, dtype=torch.bool), True), (torch.zeros(2, dtype=torch.bool), False)):
        out = [model(x, t, c, force_drop=drop) for c in (conds, [conds[0], moved])]
        assert torch.equal(*out) == same  # the null replaces the level under guidance
    with pytest.raises(UsageError):
        Denoiser((3, 6, 6), 2, cond_shapes=[(8, 4, 4)], cond_path="grid")  # 2x2 tokens do not tile 3x3


def test_adaln_text_path_takes_a_pooled_vector_exactly_as_the_class_embedding():
    """text_path "adaln": a pooled text vector through Linear(D_text -> width) into the adaLN vector, its null
    swapped in with the others. With the linear map holding a class model's embedding table and the null its
    null row, one-hot texts give the class model's outputs, dropped or not; the sequence keeps its length."""
    K, B = 5, 4
    torch.manual_seed(0)
    cls = perturb(Denoiser((3, 8, 8), 2, cond_shapes=[(8, 4, 4)], num_classes=K)).eval()
    txt = Denoiser((3, 8, 8), 2, cond_shapes=[(8, 4, 4)], text_shape=(K,), text_path="adaln").eval()
    shared = {k: v for k, v in cls.state_dict().items() if not k.startswith("y_embedder")}
    table = cls.y_embedder.weight.detach()                                             # (K + 1, width)
    txt.load_state_dict(shared | {"text_embedder.weight": table[:K].T, "text_embedder.bias": torch.zeros(table.shape[1]),
                                  "text_null": table[K:]})
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g)
    z, y = [torch.randn(B, 8, 4, 4, generator=g)], torch.tensor([0, 3, 4, 3])
    drop = torch.tensor([False, True, False, True])
    text = torch.nn.functional.one_hot(y, K).float()                                   # (B, K)
    torch.testing.assert_close(txt(x, t, z, text=text, force_drop=drop), cls(x, t, z, y, force_drop=drop))
    torch.testing.assert_close(txt.forward_with_cfg(x, t, z, text=text, w=1.5), cls.forward_with_cfg(x, t, z, y, w=1.5))
    assert not hasattr(txt, "text_pos")
    with pytest.raises(UsageError, match="does not take text of shape"):
        Denoiser((3, 8, 8), 2, text_shape=(6, 12), text_path="adaln")
    with pytest.raises(UsageError, match="unknown text path"):
        Denoiser((3, 8, 8), 2, text_shape=(6,), text_path="pooled")


def test_build_model_reads_the_text_path_and_old_metas_build_the_token_path():
    """A checkpoint's meta rebuilds the model it was trained as: the adaln text path from "text_path", and a
    meta written before that key existed as the paper's in-context text tokens (its weights load unchanged)."""
    meta = {"target": [3, 8, 8], "patch": 2, "conds": [[8, 4, 4]], "num_classes": 0, "model": "tiny",
            "p_uncond": 0.1, "cond_path": "tokens"}
    torch.manual_seed(0)
    pooled = Denoiser((3, 8, 8), 2, [(8, 4, 4)], text_shape=(7,), text_path="adaln")
    rebuilt = build_model(meta | {"text_shape": [7], "text_path": "adaln"})
    rebuilt.load_state_dict(pooled.state_dict())  # strict: the same parameters, the same shapes
    assert rebuilt.text_path == "adaln" and rebuilt.text_null.shape == (1, SIZES["tiny"]["width"])
    tokens = Denoiser((3, 8, 8), 2, [(8, 4, 4)], text_shape=(6, 12))
    old = build_model(meta | {"text_shape": [6, 12]})                                  # no "text_path": before it existed
    old.load_state_dict(tokens.state_dict())
    assert old.text_path == "tokens" and old.text_pos.shape == (1, 6, SIZES["tiny"]["width"])


def test_cpu_bf16_attention_matches_sdpa_in_value_and_gradient():
    """Under CPU bf16 autocast the attention is two matmuls and a softmax (torch's CPU flash kernel is slow in
    bf16); it must agree with F.scaled_dot_product_attention in fp32 to bf16 precision, forward and backward."""
    torch.manual_seed(0)
    attn = Attention(64, 2)
    x = torch.randn(4, 69, 64, requires_grad=True)
    ref = attn(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    (g,) = torch.autograd.grad(out.float().square().sum(), x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    assert (g - g_ref).abs().max() < 0.03 * g_ref.abs().max()
    assert not torch.equal(out.float(), ref)  # the bf16 path really ran


def test_uvit_long_skips_and_output_conv_match_the_hand_wired_network():
    """XS-U (U-ViT, Bao et al. §3): block 0's output joins block 5's input and block 1's joins block 4's, each
    through Linear(2D -> D) on [stream, skip]; blocks 2, 3 in the middle; then the head and a 3x3 conv. A fresh
    model still outputs zero (the conv starts as the identity)."""
    torch.manual_seed(0)
    model = Denoiser((3, 8, 8), 2, size="XS-U")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    assert torch.equal(model(x, t), torch.zeros_like(x))
    y = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.final_conv(y), y)
    perturb(model).eval()
    b, skip = model.blocks, model.skip_linears
    assert len(b) == SIZES["XS-U"]["depth"] == 6 and len(skip) == 2
    h, c = model.x_embedder(patchify(x, 2)) + model.pos_embed, model.t_embedder(t)  # (2, 16, D), (2, D)
    a = b[0](h, c)
    s = b[1](a, c)
    m = b[3](b[2](s, c), c)
    o = b[4](skip[0](torch.cat([m, s], -1)), c)  # the innermost skip first
    o = b[5](skip[1](torch.cat([o, a], -1)), c)
    ref = torch.nn.functional.conv2d(unpatchify(model.final_layer(o, c), 2, 3, 8, 8), model.final_conv.weight,
                                     model.final_conv.bias, padding=1)
    torch.testing.assert_close(model(x, t), ref)
    no_skip = Denoiser((3, 8, 8), 2, size="XS")
    no_skip.load_state_dict({k: v for k, v in model.state_dict().items() if "skip" not in k and "final_conv" not in k})
    assert not torch.allclose(no_skip(x, t), ref)  # the skips and the conv change the output


def test_uvit_gmacs_add_the_skip_linears_and_the_conv():
    """XS-U's forward GMACs = XS's + 2 skips x N x 2D x D + the 3x3 conv's 9 C^2 H W (meta device: no weights)."""
    D, n, (C, H, W) = SIZES["XS-U"]["width"], 16, (3, 8, 8)
    with torch.device("meta"):
        x, t = torch.zeros(1, C, H, W), torch.zeros(1, dtype=torch.long)
        plain, uvit = (forward_gmacs(Denoiser((C, H, W), 2, size=s), x, t) for s in ("XS", "XS-U"))
    assert uvit - plain == pytest.approx((2 * n * 2 * D * D + 9 * C * C * H * W) / 1e9, rel=1e-9)
    meta = {"target": [C, H, W], "patch": 2, "conds": [], "num_classes": 0, "model": "XS-U", "p_uncond": 0.1,
            "text_shape": None}
    assert build_model(meta).uvit and len(build_model(meta).skip_linears) == 2  # a checkpoint rebuilds it
