"""Images the frozen glyph CLIP embeds in ``reproduce.py`` before training: from scratch, then on a rerun.

Counts work, not time, so it means the same on a busy machine: reproduce.main runs its glyph CLIP, latent cache
and KNN stages with the encoder's forward replaced by a counter (zeros come out: the KNN numbers printed on the
way are meaningless), CLIP training by the seeded initial weights written to the checkpoint, and it stops at the
first denoiser training run. Everything goes to a throw-away folder; the glyph dataset is read from --data-dir.
One pass over the glyph set embeds its 20,752 glyphs (about 45 s on 2 free cores of the README's Intel Xeon).

    python benchmarks/count_encoder_passes.py --preset quick
"""
import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import encoder  # noqa: E402
import reproduce  # noqa: E402


class StopBeforeTraining(Exception):
    pass


def count_passes(preset, data_dir):
    """{run: images embedded} for a run from scratch and a rerun of ``preset``, up to its first training run."""
    seen = []

    def counted(self, fn, x):  # FrozenEncoder._batched: one call per image batch, zeros of the output's shape
        seen.append(len(x))
        return torch.zeros(len(x), *([1 + self.grid ** 2] if fn == self._embed_and_tokens else []), self.dim)

    def initial_weights(args):  # train_encoder.train_clip without its steps
        torch.manual_seed(args.seed)
        torch.save({"state_dict": open_clip.create_model(args.clip).state_dict()}, args.out)

    def stop(args):
        raise StopBeforeTraining

    encoder.FrozenEncoder._batched = counted
    reproduce.train_encoder.train_clip = initial_weights
    reproduce.train.train = stop
    counts, tmp = {}, Path(tempfile.mkdtemp())
    for run in ("from scratch", "rerun"):
        seen.clear()
        try:
            reproduce.main(reproduce.get_parser().parse_args(
                ["--preset", preset, "--clip", str(tmp / "clip.pt"), "--cache-dir", str(tmp / "cache"), "--runs",
                 str(tmp / "runs"), "--out", str(tmp / "out"), "--data-dir", data_dir, "--device", "cpu"]))
        except StopBeforeTraining:
            pass
        counts[run] = sum(seen)
    return counts


def main(args):
    n = sum(len(data.build_dataset("glyphs", split, reproduce.IMAGE_SIZE, data_dir=args.data_dir))
            for split in ("train", "test"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = count_passes(args.preset, args.data_dir)
    for run, images in counts.items():
        print(f"{run}: {images} images through the glyph CLIP ({images / n:.1f} passes over the {n} glyphs)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(reproduce.PRESETS), default="quick", help="reproduce.py preset")
    p.add_argument("--data-dir", default="data", help="glyph dataset cache (rendered when missing)")
    return p


if __name__ == "__main__":
    data.run_main(main, get_parser().parse_args())
