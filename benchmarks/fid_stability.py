"""How stable FID and KID are against the number of samples: a trained run's FID/KID from several
seeds at several FID_N, in its own feature network (`pipeline.inference.quality`).

    python -m benchmarks.fid_stability --exp fashion_mnist [--n 250 500 1000 2000] [--seeds 3]

Writes bench/fid_stability_<exp>.json and prints, per N, the mean and spread (max - min) over seeds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.report import machine
from pipeline.__main__ import OneLineParser
from pipeline.io import save_json
from pipeline.inference.features import as_shown
from pipeline.inference.quality import fid_kid, run_features, split_images
from pipeline.inference.sample import draw, load_cascade


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.fid_stability", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="fashion_mnist")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    args.run_dir = args.run_dir or f"runs/{Path(args.exp).stem}"
    experiment, cascade = load_cascade(args)
    net, record, splits = run_features(args.run_dir, experiment, cascade.bits)
    real = split_images(splits["test"], cascade.bits)
    rows = []
    for seed in range(args.seeds):
        images, _, _ = draw(cascade, max(args.n), 64, 1.0, seed)
        fake = as_shown(images.to(torch.uint8) << (8 - cascade.bits), 8)
        for n in args.n:
            rows.append({"seed": seed, "n": n, **fid_kid(net, real, fake[:n])})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for n in args.n:
        fids = [r["fid"] for r in rows if r["n"] == n]
        kids = [r["kid"] for r in rows if r["n"] == n]
        summary[n] = {"fid_mean": sum(fids) / len(fids), "fid_spread": max(fids) - min(fids),
                      "kid_mean": sum(kids) / len(kids), "kid_spread": max(kids) - min(kids)}
        print(f"N={n}: FID {summary[n]['fid_mean']:.3f} (spread {summary[n]['fid_spread']:.3f}), "
              f"KID {summary[n]['kid_mean']:.5f} (spread {summary[n]['kid_spread']:.5f}) over {args.seeds} seeds")
    out = Path(args.out) / f"fid_stability_{Path(args.exp).stem}.json"
    save_json(out, {"experiment": args.exp, "features": record["name"], "n_real": len(real), "machine": machine(),
                    "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
