"""reproduce.py's plan and tables: which models a preset trains, and that every FID lands in its own cell."""
import json
import os
import re
from pathlib import Path

import pytest

import data
import reproduce


def test_full_preset_trains_each_depth_and_the_sigma_preset_the_sweep():
    assert reproduce.default_sigmas(1) == [] and reproduce.default_sigmas(3) == [0.0, 0.5]  # σ_3, σ_2
    full = [(1, []), (2, [0.0]), (3, [0.0, 0.5])]   # the paper's σ (unconditional: 0 on 1×1, 0.5 on 2×2)
    assert reproduce.models(reproduce.PRESETS["full"]) == full
    assert reproduce.models(reproduce.PRESETS["sigma"]) == full + [
        (2, [0.5]), (2, [1.0]),                     # depth 2: σ_2 swept, the default 0 already trained
        (3, [0.0, 0.0]), (3, [0.0, 1.0])]           # depth 3: σ_3 kept at 0, σ_2 swept (0, 0: also the clean model)
    assert reproduce.models(reproduce.PRESETS["quick"]) == [(1, []), (4, [0.0, 0.5, 0.5])]
    shallow = dict(reproduce.PRESETS["recon"], depths=(1, 3))  # --depths 1 3: the clean model is the deepest
    assert reproduce.models(shallow) == [(1, []), (3, [0.0, 0.5]), (3, [0.0, 0.0])]
    deeper = reproduce.PRESETS["recon"]
    assert reproduce.models(deeper) == [(1, []), (5, [0.0, 0.5, 0.5, 1.0]), (5, [0.0, 0.0, 0.0, 0.0])]
    clean = [(level, s) for d, level, s in reproduce.training_plan(deeper) if s == [0.0] * 4]
    assert clean == [(5, [0.0] * 4), (4, [0.0] * 4), (3, [0.0] * 4), (2, [0.0] * 4), (1, [0.0] * 4)]  # every level
    sweep = [(d, level) for d, level, s in reproduce.training_plan(reproduce.PRESETS["sigma"]) if s == [0.0, 1.0]]
    assert sweep == [(3, 1)]                                   # the σ_2 sweep retrains the image level alone


def test_results_tables_put_each_fid_in_its_cell(tmp_path):
    cfg = reproduce.PRESETS["full"] | {"sigma_sweep": (0.0, 0.5, 1.0), "clean": True}  # every table at once
    fids = {(d, tuple(s), 0.0): 10.0 * d + 100 * (s[-1] if s else 0) for d, s in reproduce.models(cfg)}
    fids[2, (0.0,), reproduce.CFG], fids[3, (0.0, 0.5), reproduce.CFG] = 7.0, 8.0
    args = reproduce.get_parser().parse_args(["--preset", "full", "--device", "cpu", "--prediction", "eps", "--precision", "fp32"])
    args.given = reproduce.given_flags(args)
    oracle = {((0.0, 0.5), 1): (5.0, 0.1), ((0.0, 0.5), 2): (4.0, 0.05), ((0.0, 0.0), 2): (3.0, 0.02)}
    reproduce.write_results(tmp_path, args, cfg, 10, 2, [("random", 0.1, 0.2)], {"z1x1c64": 1.0}, fids,
                            oracle, ["a"], {"train": 60.0}, 120.0, baseline=40.0, unconditional=0.2)
    lines = (tmp_path / "results.md").read_text().splitlines()
    depth_rows = [ln for ln in lines if ln.startswith("| 1 |") or ln.startswith("| 2 |") or ln.startswith("| 3 |")]
    assert depth_rows[0].endswith("| 10.00 | — |")                      # depth 1: no guidance column
    assert depth_rows[1].endswith("| 20.00 | 7.00 |") and depth_rows[2].endswith("| 80.00 | 8.00 |")
    assert depth_rows[3] == "| 2 | — | 20.00* | 70.00 | 120.00 |"      # σ_2 sweep, * = the paper's σ
    assert depth_rows[4] == "| 3 | 0 | 30.00 | 80.00* | 130.00 |"
    assert "| 0, 0.5 | z_3 | 5.00 | 0.1000 |" in lines and "| 0, 0.5 | z_3, z_2 | 4.00 | 0.0500 |" in lines
    assert "| 0, 0 | z_3, z_2 | 3.00 | 0.0200 |" in lines
    assert "Depth 3 with every level trained on clean conditions (σ = 0), no guidance: FID 30.00, " \
           "3.000 × depth 1." in lines                                   # the σ_2 = 0 model of the sweep
    assert [ln for ln in lines if ln.startswith("| 1* (XS+) |")][0].endswith("| 40.00 | — |")
    assert "FID ratios, no guidance: depth3/depth1 8.000, depth3/1* 2.000" in lines
    assert "conditions dropped with p_uncond 0.5; DDIM η = 1, 50 steps per level." in lines[4]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {(r["depth"], tuple(r["sigmas"]), r["cfg"]): r["fid"] for r in saved["fid"]} == fids and saved["p_uncond"] == 0.5
    assert saved["ratios"] == {"depth3/depth1": 8.0, "depth3/1*": 2.0} and saved["unconditional_mse"] == 0.2
    assert "Command: `python reproduce.py --preset full --prediction eps --precision fp32` — " in lines[2] and saved["prediction"] == "eps" and (saved["sampler"], saved["eta"]) == ("ddim", 1.0)


def test_cond_preset_trains_each_mode_at_its_paper_sigma():
    cfg = reproduce.PRESETS["cond"]
    assert reproduce.cond_models(cfg) == [("class", 1, []), ("class", 3, [0.5, 0.5]),   # σ_3, σ_2 (Table 1, class)
                                          ("text", 1, []), ("text", 3, [0.5, 0.5])]     # COCO's 0.5
    glyphs = ("䥔溍朳㶯鮆騻", ["gold", "water", "tree", "fire", "fish", "horse"], [166, 84, 74, 85, 194, 186])
    targets = reproduce.prompt_targets(glyphs)
    assert targets["class", "金"] == targets["text", "gold"] == 166 and targets["class", "水"] == 84
    assert targets["text", "horse"] == 186 and len(targets) == 12


def test_cond_sampling_flags_follow_the_mode_and_guidance():
    cfg, args = reproduce.PRESETS["cond"], reproduce.get_parser().parse_args(["--preset", "cond", "--device", "cpu", "--cond-path", "adaln", "--text-path", "adaln"])
    plain = reproduce.sample_args(args, cfg, "runs", ("class", 3, False), [0.5, 0.5], 64, "out", "金")
    assert plain[plain.index("--cfg") + 1] == "0" and plain[-2:] == ["--class", "金"]
    assert plain[plain.index("--sigma") + 1:plain.index("--sigma") + 3] == ["0.5", "0.5"]
    assert plain[plain.index("--cond-path") + 1] == "adaln" and plain[plain.index("--n") + 1] == "64"
    guided = reproduce.sample_args(args, cfg, "runs", ("text", 1, True), [], 500, "out")
    assert "--cfg" not in guided and "--sigma" not in guided and "--prompt" not in guided  # diffusion.CFG_DEFAULTS
    assert guided[guided.index("--cond") + 1] == "text" and guided[guided.index("--text-path") + 1] == "adaln"
    assert "--text-path" not in plain  # a class model has no text path
    assert reproduce.slug(("class", 3, True), "金") == "class-depth3-cfg-167"
    assert reproduce.slug(("text", 1, False), "gold") == "text-depth1-nocfg-gold"


def test_cond_tables_put_each_number_in_its_cell(tmp_path):
    cfg = reproduce.PRESETS["cond"]
    fids = {(c, d, g): 100 * (c == "text") + 10 * d + g for c, d, _ in reproduce.cond_models(cfg) for g in (False, True)}
    shares = {(c, d, g, p): (0.5 if g else 0.25) * d / 3 + 0.01 * k for (c, d, g) in fids
              for k, p in enumerate(reproduce.PROMPTS[c])}
    targets = {(c, p): k for c in cfg["conds"] for k, p in enumerate(reproduce.PROMPTS[c])}
    args = reproduce.get_parser().parse_args(["--preset", "cond", "--device", "cpu", "--precision", "fp32"])
    args.given = reproduce.given_flags(args)
    reproduce.write_cond_results(tmp_path, args, cfg, fids, shares, targets, 0.8, {"train": 60.0}, 120.0)
    text = (tmp_path / "results.md").read_text()
    lines = text.splitlines()
    class_part, text_part = text.split("## class-conditional")[1].split("## text-conditional")
    assert "σ_3 … σ_2 = 0.5, 0.5; guidance w = 0.5 0.4 0.3 top-down" in class_part
    assert "guidance w = 1 1 1 top-down" in text_part
    assert "| 1 | 10.00 | 11.00 | 0.108 | 0.192 |" in class_part         # mean over the 6 prompts: + 0.025
    assert "| 3 | 130.00 | 131.00 | 0.275 | 0.525 |" in text_part
    assert "| `--class 金` | radical 一 (1) | 0.083 | 0.167 | 0.250 | 0.500 |" in lines
    assert '| `--prompt "water"` | radical 丨 (2) | 0.093 | 0.177 | 0.260 | 0.510 |' in lines
    assert "![class 金](class-depth3-cfg-167.png)" in lines and "![text gold](text-depth3-cfg-gold.png)" in lines
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {(r["cond"], r["depth"], r["guided"]): r["fid"] for r in saved["fid"]} == fids
    assert {(r["cond"], r["depth"], r["guided"], r["prompt"]): r["share"] for r in saved["adherence"]} == shares


class _StopAfterKnn(Exception):
    pass


def _stages(tmp_path, monkeypatch, preset, clip_exists, encoder="clip", folders=True, extra=()):
    """The calls reproduce.main makes up to its first training run: ('encoder', argv), ('vae', argv), ('cache',
    hierarchy args) and ('train', train args); ``folders=False`` leaves --runs and --out at their defaults (under
    tmp_path); ``extra``: more flags."""
    calls = []

    class Hier:
        root = tmp_path / "c" / "glyphs"

        def levels(self, depth, patch, top_channels=None):
            return []
    monkeypatch.setattr(reproduce.data, "build_dataset", lambda *a, **kw: [0, 1])
    def encoder_main(argv):
        calls.append(("encoder", argv))
        if "--train" in argv:
            Path(argv[argv.index("--out") + 1]).touch()
        return []
    monkeypatch.setattr(reproduce.train_encoder, "main", encoder_main)
    def vae_main(argv):
        calls.append(("vae", argv))
        Path(argv[argv.index("--out") + 1]).mkdir(parents=True)
    monkeypatch.setattr(reproduce.autoencoder, "main", vae_main)
    monkeypatch.setattr(reproduce.H, "build_cache", lambda a: calls.append(("cache", a)) or Hier())
    def train(a):
        calls.append(("train", a))
        raise _StopAfterKnn()
    monkeypatch.setattr(reproduce.train, "train", train)
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / f"{encoder}.pt"
    if clip_exists:
        weights.touch()
    flags = {"clip": ["--clip", str(weights)], "pixels": ["--encoder", "pixels"]}.get(
        encoder, ["--encoder", encoder, "--pretrained", str(weights)])
    if folders:
        flags += ["--runs", str(tmp_path / "r"), "--out", str(tmp_path / "out")]
    try:
        reproduce.main(reproduce.get_parser().parse_args(
            ["--preset", preset, "--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--data-dir", str(tmp_path / "d")]
            + flags + list(extra)))
    except _StopAfterKnn:
        pass
    return calls


def test_knn_report_comes_after_the_latent_cache_and_reads_it(tmp_path, monkeypatch):
    """One embedding pass of the trained glyph CLIP over the glyphs (the cache's), not two."""
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=False)
    assert [c[0] for c in calls] == ["encoder", "cache", "encoder", "train"]
    train_argv, knn_argv = calls[0][1], calls[2][1]
    assert "--train" in train_argv and "--skip-knn" in train_argv
    assert "--knn" in knn_argv and knn_argv[knn_argv.index("--latent-cache") + 1] == str(tmp_path / "c" / "glyphs")
    assert knn_argv[knn_argv.index("--cache-dir") + 1] == str(tmp_path / "c")   # where the random row is kept
    assert "--no-random-row" in knn_argv                                        # quick: no random-weights row
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True)          # weights present: no training
    assert [c[0] for c in calls] == ["cache", "encoder", "train"] and "--knn" in calls[1][1]
    calls = _stages(tmp_path, monkeypatch, "full", clip_exists=True)           # full: the random row reported
    assert "--knn" in calls[1][1] and "--no-random-row" not in calls[1][1]


def test_image_space_vae_trains_the_glyph_vae_once_and_every_stage_reads_its_latents(tmp_path, monkeypatch):
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False, extra=["--image-space", "vae"])
    assert [c[0] for c in calls] == ["vae", "cache", "encoder", "train"]
    vae_argv, hargs, targs = calls[0][1], calls[1][1], calls[3][1]
    assert vae_argv[vae_argv.index("--out") + 1] == "checkpoints/glyph-vae-quick" and "--resume" in vae_argv
    assert (hargs.image_space, hargs.vae) == (targs.image_space, targs.vae) == ("sd-vae", "checkpoints/glyph-vae-quick")
    assert targs.image_patch == 1 and targs.run == "runs/reproduce-quick-vae"  # 8x8x4 latents: 64 tokens
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False, extra=["--image-space", "vae"])
    assert [c[0] for c in calls] == ["cache", "encoder", "train"]                   # the folder exists: no retraining
    with pytest.raises(reproduce.data.UsageError, match="--vae is the glyph VAE's folder for --image-space vae"):
        _stages(tmp_path, monkeypatch, "quick", clip_exists=True, extra=["--vae", "v"])


def test_top_channels_reach_every_level_and_get_their_own_folders(tmp_path, monkeypatch):
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False, extra=["--top-channels", "8"])
    targs = calls[-1][1]
    assert targs.top_channels == 8 and targs.run == "runs/reproduce-quick-c8"
    assert _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False)[-1][1].top_channels is None
    gmacs = [sum(g for *_, g in reproduce.evaluate.cost_table("XS", "glyphs", [4], top_channels=c)) for c in (None, 8)]
    assert gmacs[1] < gmacs[0]                     # narrower condition tokens: a smaller embedding of each
    monkeypatch.setattr(reproduce.sample, "main", lambda a: a)                   # sampling picks that width too
    args = reproduce.get_parser().parse_args(["--top-channels", "8", "--device", "cpu", "--precision", "fp32"])
    drawn = reproduce.draw_samples(Path("r"), 4, [0, 0.5, 0.5], 0, reproduce.QUICK, Path("o"), args, "XS")
    assert drawn.top_channels == 8


def test_model_guidance_reaches_every_level_and_names_the_results_folder(tmp_path, monkeypatch):
    """--model-guidance w goes to train.py for every level (train.py keys the levels with conditions by it) and to
    sample.py as the version to pick, and the run trains into its own run and results folders."""
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False, extra=["--model-guidance", "0.45"])
    targs = calls[-1][1]
    assert targs.model_guidance == 0.45 and targs.run == "runs/reproduce-quick-mg0.45"
    assert (tmp_path / "results" / "quick-mg0.45").is_dir() and not (tmp_path / "results" / "quick").exists()
    assert _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False)[-1][1].model_guidance == 0
    monkeypatch.setattr(reproduce.sample, "main", lambda a: a)
    args = reproduce.get_parser().parse_args(["--model-guidance", "0.45", "--device", "cpu", "--precision", "fp32"])
    drawn = reproduce.draw_samples(Path("r"), 4, [0, 0.5, 0.5], 0, reproduce.QUICK, Path("o"), args, "XS")
    assert drawn.model_guidance == 0.45 and drawn.cfg == [0]
    with pytest.raises(data.UsageError, match="--model-guidance needs --p-uncond above 0"):
        _stages(tmp_path, monkeypatch, "quick", clip_exists=True, extra=["--model-guidance", "0.45", "--p-uncond", "0"])


def test_another_sampler_reaches_every_draw_and_names_the_results_folder_alone(tmp_path, monkeypatch):
    """--sampler dpm++ samples the levels of the preset's own run folder (trained once, whatever the sampler) into
    its own results folder and samples sub-folder; the presets' DDIM η = 1 keeps the plain names, and preset cond
    keeps DPM-Solver++ as its own."""
    calls = _stages(tmp_path, monkeypatch, "full", clip_exists=True, folders=False, extra=["--sampler", "dpm++"])
    assert calls[-1][1].run == "runs/reproduce-full"
    assert (tmp_path / "results" / "full-dpm++").is_dir() and not (tmp_path / "results" / "full").exists()
    drawn, cfg = [], reproduce.PRESETS["full"]
    monkeypatch.setattr(reproduce.sample, "main", lambda a: drawn.append(a) or a.out)
    for argv, sampler, tag in (([], ("ddim", 1.0), ""), (["--sampler", "ddim"], ("ddim", 1.0), ""),
                               (["--eta", "0.5"], ("ddim", 0.5), "ddim-eta0.5"),
                               (["--sampler", "dpm++"], ("dpm++", 0.0), "dpm++"), (["--sampler", "ddpm"], ("ddpm", 0.0), "ddpm")):
        args = reproduce.get_parser().parse_args(["--preset", "full", "--device", "cpu", "--precision", "fp32"] + argv)
        samples = reproduce.sample_all(args, cfg, Path("r"), Path("o"))
        assert {(a.sampler, a.eta) for a in drawn} == {sampler}
        assert samples["baseline"] == str(Path("r", "samples", tag, "baseline"))
        assert str(Path("r", "samples", tag, "sigma0-0.5-w0.8")) in [npz for *_, npz in samples["fid"]]
        drawn.clear()
    args, cond = reproduce.get_parser().parse_args(["--preset", "cond"]), reproduce.PRESETS["cond"]
    assert reproduce.sampler_of(args, cond) == ("dpm++", 0.0) and reproduce.sampler_tag(args, cond) == ""
    for argv, message in ((["--sampler", "dpm++", "--eta", "1"], "--eta is DDIM's η; pass --sampler ddim"),
                          (["--eta", "-1"], "--eta must be >= 0"),
                          (["--sampler", "ddim", "--eta", "1.5"], "--eta must be >= 0 and <= 1"),
                          (["--preset", "cond", "--sampler", "ddpm"], "--sampler is for the unconditional presets"),
                          (["--preset", "cond", "--eta", "1"], "--eta is DDIM's η")):
        with pytest.raises(data.UsageError, match=message):
            reproduce.main(reproduce.get_parser().parse_args(["--device", "cpu"] + argv))


def test_reused_levels_are_this_runs_levels_trained_before_it(tmp_path):
    """Only levels this run used and found trained count as reused; other versions in a shared run folder do not."""
    paths = {name: tmp_path / name / "ckpt.pt" for name in ("kept", "retrained", "other-version", "new")}
    for name in ("kept", "retrained", "other-version"):
        paths[name].parent.mkdir()
        paths[name].write_bytes(b"0")
    before = {p: p.stat().st_mtime for p in tmp_path.glob("*/ckpt.pt")}
    os.utime(paths["retrained"], (before[paths["retrained"]] + 5,) * 2)   # written by this run
    paths["new"].parent.mkdir()
    paths["new"].write_bytes(b"0")
    used = [paths["kept"], paths["retrained"], paths["new"], paths["kept"]]
    assert reproduce.reused_levels(before, used) == ["kept"]


def test_64px_glyphs_keep_64_image_tokens_in_their_own_folders(tmp_path, monkeypatch):
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True, folders=False,
                    extra=["--image-size", "64", "--min-crop", "32"])
    hargs, knn_argv, targs = calls[0][1], calls[1][1], calls[2][1]
    assert hargs.image_size == targs.image_size == 64 and hargs.min_crop == targs.min_crop == 32
    assert knn_argv[knn_argv.index("--image-size") + 1] == "64"
    assert targs.image_patch == 8 and targs.run == "runs/reproduce-quick-crop32-64px"   # (64 / 8)² = 64 tokens
    with pytest.raises(reproduce.data.UsageError, match="--image-size 64 runs on pixels"):
        _stages(tmp_path, monkeypatch, "quick", clip_exists=True, extra=["--image-size", "64", "--image-space", "vae"])


def test_cond_preset_runs_no_knn_report(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "conditional", lambda *a: None)  # its results hold no KNN row
    assert [c[0] for c in _stages(tmp_path, monkeypatch, "cond", clip_exists=True)] == ["cache"]


def test_mocov3_encoder_replaces_the_glyph_clip_everywhere(tmp_path, monkeypatch):
    """No CLIP is trained; the cache, the KNN row (reading that cache) and the levels all use the MoCo-v3 ViT."""
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=True, encoder="mocov3")
    assert [c[0] for c in calls] == ["cache", "encoder", "train"]
    moco = str(tmp_path / "mocov3.pt")
    hargs, knn_argv, targs = calls[0][1], calls[1][1], calls[2][1]
    assert (hargs.encoder, hargs.pretrained, hargs.image_size, hargs.image_space) == ("mocov3", moco, 32, "pixels")
    assert "mocov3" in reproduce.H.cache_name(hargs) and "glyph-clip" not in reproduce.H.cache_name(hargs)
    assert knn_argv[knn_argv.index("--objective") + 1] == "mocov3" and "--train" not in knn_argv
    assert knn_argv[knn_argv.index("--pretrained") + 1] == moco
    assert knn_argv[knn_argv.index("--latent-cache") + 1] == str(tmp_path / "c" / "glyphs")
    assert (targs.encoder, targs.pretrained, targs.run) == ("mocov3", moco, str(tmp_path / "r"))


def test_each_encoder_has_its_own_default_run_and_results_folders(tmp_path, monkeypatch):
    """A level trained on the glyph CLIP's cache is never found by a MoCo-v3 run (train.py's run key names
    no encoder), nor are the results written over."""
    for encoder, suffix in (("clip", ""), ("mocov3", "-mocov3")):
        for preset, runs in (("quick", "quick"), ("recon", "quick"), ("full", "full")):
            targs = _stages(tmp_path, monkeypatch, preset, True, encoder, folders=False)[-1][1]
            assert targs.run == f"runs/reproduce-{runs}{suffix}"
            assert (tmp_path / "results" / f"{preset}{suffix}").is_dir()


def test_mocov3_weights_are_checked_before_anything_is_built(tmp_path, monkeypatch):
    for preset, exists, flags, message in (
            ("quick", False, [], "MoCo-v3 weights checkpoints/mocov3-glyphs.pt not found; train them with python "
                                 "train_encoder.py --objective mocov3 --train --data glyphs "),
            ("quick", True, ["--clip", "x.pt"], "--clip is the glyph CLIP's weights"),
            ("cond", True, [], "--preset cond needs --encoder clip")):
        monkeypatch.chdir(tmp_path)
        if exists:
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
            (tmp_path / "checkpoints" / "mocov3-glyphs.pt").touch()
        args = reproduce.get_parser().parse_args(["--preset", preset, "--encoder", "mocov3", "--device", "cpu"] + flags)
        with pytest.raises(reproduce.data.UsageError, match=re.escape(message)):
            reproduce.main(args)
        assert not (tmp_path / "results").exists()                                 # nothing created
    args = reproduce.get_parser().parse_args(["--pretrained", "m.pt", "--device", "cpu"])  # the CLIP has --clip
    with pytest.raises(reproduce.data.UsageError, match="--pretrained is the MoCo-v3 encoder's weights"):
        reproduce.main(args)


def test_mocov3_results_name_the_encoder_and_its_command(tmp_path):
    (tmp_path / "m.pt").touch()
    args = reproduce.get_parser().parse_args(["--preset", "quick", "--encoder", "mocov3", "--pretrained",
                                              str(tmp_path / "m.pt"), "--device", "cpu", "--precision", "fp32"])
    cfg = reproduce.preset_config(args)
    args.given = reproduce.given_flags(args)
    reproduce.resolve_encoder(args, cfg)
    fids = {(1, (), 0.0): 100.0, (4, (0.0, 0.5, 0.5), 0.0): 90.0}
    reproduce.write_results(tmp_path, args, cfg, 10, 2, [("trained", 0.3, 0.5)], {}, fids, {}, [], {}, 60.0)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert (f"Command: `python reproduce.py --preset quick --encoder mocov3 --pretrained {tmp_path / 'm.pt'} --precision "
            "fp32` — ") in lines[2]
    assert f"Encoder: MoCo-v3 ViT ({tmp_path / 'm.pt'})." in lines[4]
    assert "MoCo-v3 ViT, KNN radical accuracy (K = 20) on the held-out glyphs:" in lines
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["encoder"] == "mocov3" and saved["encoder_weights"] == str(tmp_path / "m.pt")


def test_baseline_and_depths_flags_are_checked_before_anything_is_built(tmp_path, monkeypatch):
    """--baseline takes a denoiser size and an unconditional preset, --depths includes 1; a bad value stops at once."""
    monkeypatch.chdir(tmp_path)
    for argv, message in ((["--preset", "quick", "--baseline", "XXL"], "--baseline takes a denoiser size"),
                          (["--preset", "cond", "--baseline", "XS+"], "--baseline takes a denoiser size"),
                          (["--preset", "quick", "--depths", "3", "4"], "--depths takes depths from 1 to 5"),
                          (["--preset", "cond", "--steps", "0"], "--steps takes a positive number"),
                          (["--preset", "quick", "--p-uncond", "1.5"], "--p-uncond"),
                          (["--preset", "quick", "--min-crop", "0"], "--min-crop must be >= 1"),
                          (["--preset", "quick", "--top-channels", "0"], "--top-channels must be >= 1"),
                          (["--preset", "quick", "--model-guidance", "1"], "--model-guidance must be >= 0 and < 1")):
        with pytest.raises(data.UsageError, match=message):
            reproduce.main(reproduce.get_parser().parse_args(argv + ["--device", "cpu"]))
    assert list(tmp_path.iterdir()) == []  # no results folder, no data, no cache


def test_steps_flag_sets_every_level_and_reaches_train(monkeypatch):
    """--steps N trains image and latent levels N steps (the cond preset's 1,000-step tables: --steps 1000)."""
    parse = lambda *argv: reproduce.preset_config(reproduce.get_parser().parse_args(["--device", "cpu", *argv]))  # noqa: E731
    assert (parse("--preset", "long")["steps"], parse("--preset", "long")["latent_steps"]) == (2000, 1000)
    assert (parse("--preset", "cond")["steps"], parse("--preset", "cond")["latent_steps"]) == (2500, 2500)
    cfg = parse("--preset", "cond", "--steps", "1000", "--depths", "1", "2")
    assert (cfg["steps"], cfg["latent_steps"], cfg["depths"]) == (1000, 1000, (1, 2))
    assert reproduce.PRESETS["cond"]["steps"] == 2500                         # the preset itself is unchanged
    args = reproduce.get_parser().parse_args(["--preset", "cond", "--steps", "1000", "--clip", "c.pt", "--device", "cpu", "--precision", "fp32"])
    seen = []
    monkeypatch.setattr(reproduce.train, "train", seen.append)
    reproduce.train_level(args, cfg, Path("runs"), 2, 2, [0.5], "XS", "class")   # a latent level
    reproduce.train_level(args, cfg, Path("runs"), 2, 1, [0.5], "XS", "class")   # the image level
    assert [a.steps for a in seen] == [1000, 1000] and seen[0].text_path == "adaln"


def test_p_uncond_and_model_reach_train_and_another_p_uncond_gets_its_own_folders(monkeypatch):
    """--p-uncond goes to every level's train.py; a value other than the preset's (the paper's 0.1, or 0.5 for full)
    names its own run and results folders (train.py's level names do not carry it); --model replaces the preset's size;
    --min-crop reaches train.py and names its folders too."""
    parse = lambda *argv: reproduce.get_parser().parse_args(["--device", "cpu", "--precision", "fp32", *argv])  # noqa: E731
    default, half = parse("--preset", "quick"), parse("--preset", "quick", "--p-uncond", "0.5", "--model", "XS-U")
    assert reproduce.preset_config(default)["p_uncond"] == 0.1                # the paper's
    assert reproduce.folders(default, reproduce.preset_config(default)) == (Path("results/quick"), Path("runs/reproduce-quick"))
    cfg = reproduce.preset_config(half)
    assert cfg["model"] == "XS-U" and reproduce.PRESETS["quick"]["model"] == "XS"
    assert reproduce.folders(half, cfg) == (Path("results/quick-p0.5"), Path("runs/reproduce-quick-p0.5"))
    recon = parse("--preset", "recon", "--p-uncond", "0.5")                   # recon reuses quick's levels of that value
    assert reproduce.folders(recon, reproduce.preset_config(recon))[1] == Path("runs/reproduce-quick-p0.5")
    seen = []
    monkeypatch.setattr(reproduce.train, "train", seen.append)
    reproduce.train_level(half, cfg, Path("runs"), 3, 1, [0.0, 0.5], cfg["model"])
    assert seen[0].p_uncond == 0.5 and seen[0].model == "XS-U"
    full, sweep, paper = parse("--preset", "full"), parse("--preset", "sigma"), parse("--preset", "full", "--p-uncond", "0.1")
    assert reproduce.preset_config(full)["p_uncond"] == 0.5                   # the full preset's own default
    assert reproduce.folders(full, reproduce.preset_config(full)) == (Path("results/full"), Path("runs/reproduce-full"))
    assert reproduce.folders(sweep, reproduce.preset_config(sweep)) == (Path("results/sigma"), Path("runs/reproduce-full"))
    assert reproduce.folders(paper, reproduce.preset_config(paper)) == (Path("results/full-p0.1"), Path("runs/reproduce-full-p0.1"))
    reproduce.train_level(full, reproduce.preset_config(full), Path("runs"), 3, 1, [0.0, 0.5], "XS")
    assert seen[1].p_uncond == 0.5 and seen[1].min_crop == 64                # the hierarchy's default: no crops at 32 px
    crops = parse("--preset", "quick", "--min-crop", "8", "--p-uncond", "0.5")  # crops of 16 and 8 px (paper §3.3)
    assert reproduce.folders(crops, reproduce.preset_config(crops)) == (Path("results/quick-crop8-p0.5"),
                                                                        Path("runs/reproduce-quick-crop8-p0.5"))
    reproduce.train_level(crops, reproduce.preset_config(crops), Path("runs"), 3, 1, [0.0, 0.5], "XS")
    assert seen[2].min_crop == 8


def test_defer_fid_lists_the_samples_and_finish_scores_them_into_the_same_results(tmp_path, monkeypatch):
    """--defer-fid (a GPU box without the FID weights) samples every model and stops before any FID; --finish (same
    flags, elsewhere) scores exactly those files and writes the results files that one run would have written."""
    import numpy as np
    calls = {"fid": [], "sampled": []}

    class Hier:
        root = tmp_path / "c"

        def levels(self, depth, patch, top_channels=None):
            return []

    def fake_sample(args):
        npz = Path(args.out) / f"d{args.depth}-w{args.cfg}-{args.model}-{len(args.reference or '')}{args.keep}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, arr_0=np.full((4, 32, 32, 3), 10 * len(calls["sampled"]), np.uint8))
        calls["sampled"].append(npz)
        return npz
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce.data, "build_dataset", lambda *a, **kw: [0, 1])
    monkeypatch.setattr(reproduce.train_encoder, "main", lambda a: [("trained", 0.5, 0.7)])
    monkeypatch.setattr(reproduce.H, "build_cache", lambda a: Hier())
    monkeypatch.setattr(reproduce.train, "train", lambda a: None)
    monkeypatch.setattr(reproduce.sample, "main", fake_sample)
    monkeypatch.setattr(reproduce, "reference_images", lambda test_set, n: np.zeros((4, 32, 32, 3), np.uint8))
    monkeypatch.setattr(reproduce.evaluate, "dataset_stats", lambda *a, **kw: (0, 0))
    monkeypatch.setattr(reproduce.evaluate, "inception_features",
                        lambda images, device, **kw: calls["fid"].append(int(images[0, 0, 0, 0])) or images)
    monkeypatch.setattr(reproduce.evaluate, "feature_stats", lambda feats: (float(feats[0, 0, 0, 0]),))
    monkeypatch.setattr(reproduce.evaluate, "frechet_distance", lambda mu, mu_ref, sigma_ref: 100.0 + mu)
    (tmp_path / "clip.pt").touch()
    argv = ["--preset", "gpu", "--device", "cpu", "--precision", "bf16", "--clip", str(tmp_path / "clip.pt")]
    reproduce.main(reproduce.get_parser().parse_args(argv + ["--defer-fid"]))
    out = tmp_path / "results" / "gpu"
    assert calls["fid"] == [] and not (out / "results.md").exists()           # no FID on the sampling machine
    pending = json.loads((out / "pending.json").read_text())
    assert [tuple(f[:3]) for f in pending["samples"]["fid"]] == [(1, [], 0.0), (3, [0.0, 0.5], 0.0),
                                                                (3, [0.0, 0.5], reproduce.CFG)]
    assert pending["samples"]["baseline"] and [o[:2] for o in pending["samples"]["oracle"]] == [[[0.0, 0.5], 1],
                                                                                              [[0.0, 0.5], 2]]
    assert len(calls["sampled"]) == 6 and "S+" in pending["samples"]["baseline"]

    reproduce.main(reproduce.get_parser().parse_args(argv + ["--finish"]))
    assert calls["fid"] == [0, 10, 20, 30, 40, 50] and len(calls["sampled"]) == 6  # each file scored once, none redrawn
    saved = json.loads((out / "results.json").read_text())
    assert {(r["depth"], r["cfg"]): r["fid"] for r in saved["fid"]} == {(1, 0.0): 100.0, (3, 0.0): 110.0,
                                                                       (3, reproduce.CFG): 120.0}
    assert saved["baseline_1star"] == 130.0 and [o["fid"] for o in saved["oracle"]] == [140.0, 150.0]
    assert saved["ratios"] == {"depth3/depth1": 1.1, "depth3/1*": 110.0 / 130.0}
    assert "; FID afterwards (--finish) on " in saved["machine"] and "sample" in saved["timings_s"]
    lines = (out / "results.md").read_text().splitlines()
    assert "Command: `python reproduce.py --preset gpu --clip " in lines[2] and "--defer-fid` — machine:" in lines[2]
    assert "| 1* (S+) |" in "\n".join(lines)

    with pytest.raises(data.UsageError, match="drawn with --sampler ddim --eta 1; pass the same"):
        reproduce.main(reproduce.get_parser().parse_args(argv + ["--finish", "--eta", "0.5", "--out", str(out)]))
    legacy = {k: v for k, v in pending.items() if k != "sampler"}  # from before the presets' DDIM: DPM-Solver++
    (out / "pending.json").write_text(json.dumps(legacy))
    with pytest.raises(data.UsageError, match="drawn with --sampler dpm\\+\\+; pass the same"):
        reproduce.main(reproduce.get_parser().parse_args(argv + ["--finish"]))
    (calls["sampled"][2]).unlink()
    with pytest.raises(data.UsageError, match="1 sample files of .* not found"):
        reproduce.main(reproduce.get_parser().parse_args(argv + ["--finish"]))
    with pytest.raises(data.UsageError, match="pending.json not found"):
        reproduce.main(reproduce.get_parser().parse_args(argv + ["--finish", "--out", str(tmp_path / "elsewhere")]))
    with pytest.raises(data.UsageError, match="--defer-fid is for an unconditional preset"):
        reproduce.main(reproduce.get_parser().parse_args(["--preset", "cond", "--defer-fid", "--device", "cpu"]))


def test_each_one_star_baseline_costs_about_its_hierarchy():
    """Table 6's 1*: XS+ (full) and S+ (gpu) do about the forward GMACs of depth 3 of their size (within 5 %)."""
    cost = lambda size, depth: sum(g for *_, g in reproduce.evaluate.cost_table(size, "glyphs", [depth]))  # noqa: E731
    for preset in ("full", "gpu"):
        cfg = reproduce.PRESETS[preset]
        assert abs(cost(cfg["baseline"], 1) / cost(cfg["model"], max(cfg["depths"])) - 1) < 0.05


def test_pixel_encoder_runs_no_encoder_training_or_knn_and_has_its_own_folders(tmp_path, monkeypatch):
    calls = _stages(tmp_path, monkeypatch, "quick", clip_exists=False, encoder="pixels", folders=False)
    assert [c[0] for c in calls] == ["cache", "train"]                      # no CLIP, no KNN report
    hargs, targs = calls[0][1], calls[1][1]
    assert (hargs.encoder, hargs.pretrained, targs.encoder) == ("pixels", "none", "pixels")
    assert targs.run == "runs/reproduce-quick-pixels" and (tmp_path / "results" / "quick-pixels").is_dir()
    assert isinstance(reproduce.H.make_encoder(hargs), reproduce.H.PixelEncoder)
    with pytest.raises(data.UsageError, match="--encoder pixels has no weights"):
        reproduce.main(reproduce.get_parser().parse_args(["--encoder", "pixels", "--pretrained", "x.pt", "--device", "cpu"]))
