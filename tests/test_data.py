"""Datasets: glyph set contents and determinism, ImageFolder with a corrupt file, COCO captions, bad input."""
import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = Path(__file__).resolve().parent.parent
GLYPH_COUNT = 20752  # the pinned pip sources: cvttf-notosanscjk-regular 1.0 (Noto Sans CJK TC) + Unicode 14.0 Unihan


@pytest.fixture(scope="module")
def glyph_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glyphs")
    data.build_glyph_cache(d, image_size=16, quiet=True)
    return d


def test_glyph_count_and_split(glyph_dir):
    train = data.build_dataset("glyphs", "train", 16, data_dir=glyph_dir)
    test = data.build_dataset("glyphs", "test", 16, data_dir=glyph_dir)
    assert len(train) + len(test) == GLYPH_COUNT
    assert len(test) == GLYPH_COUNT // data.HELD_OUT_EVERY
    assert not set(train.chars) & set(test.chars)
    x, y, caption = train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert -1 <= x.min() < x.max() <= 1
    assert train.labels.min() >= 0 and train.labels.max() <= 213
    assert data.dataset_channels("glyphs") == x.shape[0]  # known without reading the set (sample.py's references)


def test_known_characters(glyph_dir):
    ds = {}
    for split in ("train", "test"):
        d = data.build_dataset("glyphs", split, 16, data_dir=glyph_dir)
        ds.update({c: (d.captions[i], int(d.labels[i]) + 1) for i, c in enumerate(d.chars)})
    assert ds["水"] == ("water, liquid, lotion, juice", 85)
    assert ds["龍"][0].startswith("dragon") and ds["龍"][1] == 212
    assert ds["人"][1] == 9


def test_glyph_cache_is_byte_identical_and_reused(glyph_dir, tmp_path):
    data.build_glyph_cache(tmp_path, image_size=16, quiet=True)
    for suffix in (".npy", ".json"):
        assert (tmp_path / f"glyphs-16{suffix}").read_bytes() == (glyph_dir / f"glyphs-16{suffix}").read_bytes()
    npy = tmp_path / "glyphs-16.npy"
    before = npy.stat().st_mtime_ns
    data.build_glyph_cache(tmp_path, image_size=16, quiet=True)
    assert npy.stat().st_mtime_ns == before  # same parameters: not rebuilt
    meta = json.loads((tmp_path / "glyphs-16.json").read_text())
    meta["params"]["format"] = -1  # parameters changed: rebuilt
    (tmp_path / "glyphs-16.json").write_text(json.dumps(meta))
    data.build_glyph_cache(tmp_path, image_size=16, quiet=True)
    assert json.loads((tmp_path / "glyphs-16.json").read_text())["params"]["format"] == data.GLYPH_FORMAT


def test_a_copied_glyph_cache_serves_where_the_font_and_unihan_are_missing(glyph_dir, tmp_path):
    """A GPU box with the data folder but not the font or Unihan packages reads the copy; without one it stops."""
    for suffix in (".npy", ".json"):
        (tmp_path / f"glyphs-16{suffix}").write_bytes((glyph_dir / f"glyphs-16{suffix}").read_bytes())
    for missing in ({"font": str(tmp_path / "missing.otf")}, {"unihan": str(tmp_path / "missing")}):
        assert data.build_glyph_cache(tmp_path, 16, quiet=True, **missing) == tmp_path / "glyphs-16.npy"
    assert data.build_dataset("glyphs", "test", 16, data_dir=tmp_path).chars == \
        data.build_dataset("glyphs", "test", 16, data_dir=glyph_dir).chars
    meta = json.loads((tmp_path / "glyphs-16.json").read_text())
    meta["params"]["format"] = -1  # an older format is not used blind
    (tmp_path / "glyphs-16.json").write_text(json.dumps(meta))
    with pytest.raises(data.UsageError, match="--font"):
        data.build_glyph_cache(tmp_path, 16, font=str(tmp_path / "missing.otf"))


def test_glyph_rendering_is_centred(glyph_dir):
    d = data.build_dataset("glyphs", "train", 16, data_dir=glyph_dir)
    ink = (255 - d.images.astype(np.float64)).sum(0)  # average ink over all glyphs, (H, W)
    ys, xs = np.indices(ink.shape)
    cy, cx = (ys * ink).sum() / ink.sum(), (xs * ink).sum() / ink.sum()
    assert abs(cy - 7.5) < 1.0 and abs(cx - 7.5) < 1.0


def _make_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def test_image_folder_skips_corrupt_file(tmp_path):
    ds = data.ImageFolder(_make_folder(tmp_path / "imgs"), image_size=32)
    assert ds.num_classes == 2 and len(ds) == 7
    with pytest.warns(UserWarning, match="unreadable"):
        items = [ds[i] for i in range(len(ds))]
    assert len(ds.skipped) == 1
    assert all(x.shape == (3, 32, 32) for x, _, _ in items)
    assert sorted({y for _, y, _ in items}) == [0, 1]


def test_center_crop_matches_adm():
    img = Image.fromarray(np.arange(300 * 500 * 3, dtype=np.uint32).astype(np.uint8).reshape(300, 500, 3))
    assert data.center_crop_arr(img, 64).shape == (64, 64, 3)
    flat = Image.fromarray(np.full((100, 400, 3), 7, np.uint8))
    assert (data.center_crop_arr(flat, 50) == 7).all()


def test_folder_dataset_split(tmp_path):
    (tmp_path / "only").mkdir()
    for k in range(25):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / "only" / f"{k:02d}.png")
    train = data.build_dataset(f"folder:{tmp_path}", "train", 8)
    test = data.build_dataset(f"folder:{tmp_path}", "test", 8)
    assert (len(train), len(test)) == (24, 1)
    assert data.dataset_channels(f"folder:{tmp_path}") == train[0][0].shape[0] == 3
    assert data.dataset_channels("imagenet") == data.dataset_channels("coco") == 3
    assert Path(test.paths[0]).name == "19.png"
    assert len(list(test)) == 1  # iteration ends at the last image (no wrap-around past it)
    with pytest.raises(IndexError):
        train[24]


def test_coco_random_caption(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(tmp_path / "train2014" / "a.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 1, "caption": f"caption {k}"} for k in range(5)]}
    (tmp_path / "annotations" / "captions_train2014.json").write_text(json.dumps(ann))
    ds = data.build_dataset("coco", "train", 32, data_path=tmp_path)
    seen = {ds[0][2] for _ in range(60)}
    assert seen == {f"caption {k}" for k in range(5)}
    x, y, _ = ds[0]
    assert x.shape == (3, 32, 32) and y == -1


@pytest.mark.parametrize("call, message", [
    (lambda tmp: data.build_dataset("mnist"), "unknown dataset"),
    (lambda tmp: data.build_dataset("imagenet", data_path=tmp / "nope"), "--data-path"),
    (lambda tmp: data.build_dataset(f"folder:{tmp / 'nope'}"), "not found"),
    (lambda tmp: data.build_dataset(f"folder:{tmp}"), "no class subfolders"),
    (lambda tmp: data.build_dataset("coco", data_path=tmp), "captions_train2014.json"),
    (lambda tmp: data.build_glyph_cache(tmp, 16, font=str(tmp / "missing.otf")), "--font"),
    (lambda tmp: data.build_glyph_cache(tmp, 16, unihan=str(tmp / "missing")), "--unihan"),
])
def test_bad_input_raises_usage_error(tmp_path, call, message):
    with pytest.raises(data.UsageError, match=message):
        call(tmp_path)
    assert not list(tmp_path.glob("glyphs-*"))  # nothing half-written


def test_empty_class_folder(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(data.UsageError, match="no images"):
        data.build_dataset(f"folder:{tmp_path}")


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "data.py", "--data", "imagenet", "--data-path", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def test_cli_show_writes_grid(glyph_dir, tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "data.py", "--data", "glyphs", "--image-size", "16", "--data-dir", str(glyph_dir),
                        "--show", "4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{GLYPH_COUNT} images" in r.stdout
    assert Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)


@pytest.mark.parametrize("error, code, line", [
    (data.UsageError("--n must be >= 1, got 0"), 2, "error: --n must be >= 1, got 0"),
    (PermissionError(13, "Permission denied", "runs/x/ckpt.pt"), 1,
     "error: Permission denied (runs/x/ckpt.pt); the folder is not writable: pick another output folder or fix its permissions"),
    (OSError(28, "No space left on device", "runs/x/log.txt"), 1,
     "error: No space left on device (runs/x/log.txt); free disk space and run the command again"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
])
def test_run_main_turns_failures_into_one_line(capsys, error, code, line):
    def main(args):
        raise error
    with pytest.raises(SystemExit) as e:
        data.run_main(main, None)
    assert e.value.code == code and capsys.readouterr().err == line + "\n"


def test_help_shows_every_default_but_none():
    """--help gives argparse's "(default: X)" after each flag, but not "(default: None)": such a flag's own help
    says what happens without it. Checked on a small parser and on every script's."""
    p = argparse.ArgumentParser(formatter_class=data.HelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--model", default=None, help="denoiser size (default: the level's)")
    text = " ".join(p.format_help().split())
    assert "sampling steps (default: 50)" in text and "denoiser size (default: the level's)" in text
    assert "None" not in text
    for script in ("autoencoder", "evaluate", "hierarchy", "reproduce", "sample", "train"):
        parser = importlib.import_module(script).get_parser()
        subparsers = [a.choices.values() for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        helps = [" ".join(q.format_help().split()) for q in [parser, *(q for c in subparsers for q in c)]]
        assert any("(default:" in h for h in helps) and not any("(default: None)" in h for h in helps), script


def test_radical_class_by_character_or_kangxi_number(glyph_dir):
    """金 and 167 name the same class, and the training glyphs of that class carry kRSUnicode radical 167."""
    gold = data.radical_class("金")
    assert gold == data.radical_class("167") == data.radical_class("\u2fa6") == 166  # ⾦ KANGXI RADICAL GOLD
    assert data.radical_class("一") == data.radical_class("1") == 0 and data.radical_class("龠") == 213
    assert data.radical_name(gold) == "radical 金 (167)"
    train = data.build_dataset("glyphs", "train", 16, data_dir=glyph_dir)
    chars = {c for c, y in zip(train.chars, train.labels) if y == gold}
    assert {"銀", "鉄", "針"} <= chars and not {"水", "木"} & chars
    unihan = data.read_unihan(data.default_unihan())
    assert {unihan[ord(c)][1] for c in chars} == {167}


@pytest.mark.parametrize("bad", ["0", "215", "x", "金金", ""])
def test_unknown_radical_is_one_line(bad):
    with pytest.raises(data.UsageError, match="is not a Kangxi radical; give the radical"):
        data.radical_class(bad)


def test_missing_image_folder_is_named_before_any_work(tmp_path):
    """--data folder:PATH is checked with the other flags, before an encoder is loaded or a cache folder made."""
    data.check_dataset_name(f"folder:{tmp_path}")
    with pytest.raises(data.UsageError, match=f"image folder {tmp_path / 'nope'} not found"):
        data.check_dataset_name(f"folder:{tmp_path / 'nope'}")


def test_folder_lock_removes_the_empty_folders_it_created(tmp_path):
    """A failed first write (here: an error inside the lock) leaves no empty folders behind, parents included;
    folders that existed, or that something else wrote into, stay."""
    with pytest.raises(data.UsageError):
        with data.folder_lock(tmp_path / "cache" / "name", "the latent cache"):
            raise data.UsageError("stop")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    with data.folder_lock(tmp_path / "runs" / "a" / "level", "the run folder"):
        (tmp_path / "runs" / "a" / "note.txt").write_text("kept")
    assert sorted(p.name for p in (tmp_path / "runs" / "a").iterdir()) == ["note.txt"]
    with data.folder_lock(tmp_path / "runs" / "b", "the run folder"):
        (tmp_path / "runs" / "b" / "meta.json").write_text("{}")
    assert (tmp_path / "runs" / "b" / "meta.json").exists()
