"""FID Inception throughput against its batch size (evaluate.inception_features; paper §6.1's metric).

Embeds the same samples .npz at each batch size, in turn, and prints images/s and the largest difference of
each batch size's features from the first's: 0 means the FIDs are bit-identical. On a CPU small batches are
faster (their activations stay in cache), which is why ``evaluate.inception_batch`` gives 8 there.

    python benchmarks/bench_fid.py results/full/depth1-none.npz --batch-sizes 50 8
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
from data import HelpFormatter, UsageError, check_range, machine, run_main  # noqa: E402


def main(args):
    check_range("--batch-sizes", args.batch_sizes, 1)
    kind, images = evaluate.read_npz(args.samples)
    if kind != "images":
        raise UsageError(f"{args.samples} holds statistics, not images; pass a samples .npz")
    print(f"machine: {machine(args.device)}")
    first = None
    for bs in args.batch_sizes:
        start = time.perf_counter()
        feats = evaluate.inception_features(images, bs, args.device, progress=False)  # (N, 2048)
        seconds = time.perf_counter() - start
        first = feats if first is None else first
        print(f"batch {bs}: {len(images) / seconds:.2f} images/s ({seconds:.1f} s for {len(images)}), "
              f"features differ from batch {args.batch_sizes[0]}'s by at most {np.abs(feats - first).max():.1e}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("samples", help="a samples .npz (arr_0 uint8 N×H×W[×C]), e.g. results/full/depth1-none.npz")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[50, 8], help="images per Inception forward, in turn")
    p.add_argument("--device", default="cpu", help="where Inception runs: cpu or cuda")
    return p


if __name__ == "__main__":
    run_main(main, get_parser().parse_args())
