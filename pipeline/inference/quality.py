"""Sample quality: FID and KID (torchmetrics) between images drawn from the cascade and the test split,
in the features of the run's own feature network (`pipeline.inference.features`).

`make quality` (and `make evaluate`, after bits/dim) draws FID_N images at TEMPERATURE from seed SEED
and writes `$(RUN_DIR)/quality.json` (quality-t<T>.json at another temperature):
    {"fid", "kid", "kid_std", "features" (the feature network's name), "feature_task",
     "feature_test_accuracy", "n_samples", "n_real", "temperature", "seed",
     "inception": {"fid", "kid", "kid_std"} (with INCEPTION=<weights file> only)}
and logs them to W&B (job_type quality). FID is biased by the number of images; KID is not: compare
figures only at the same FID_N, against the same test split, with the same feature network.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import datasets
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from data.datamodule import SubscaleDataModule
from pipeline.inference.features import as_shown, feature_network
from pipeline.io import save_json
from pipeline.tracking import log_job

KID_SUBSET = 100  # images per KID subset (fewer when fewer images are compared)
KID_SUBSETS = 50


@torch.no_grad()
def fid_kid(net: torch.nn.Module | str, real: torch.Tensor, fake: torch.Tensor, batch: int = 256) -> dict:
    """FID and KID of `fake` against `real`, both 8-bit images as (N, C, H, W) uint8, in the features
    of `net` (a module with `num_features`: a FeatureNetwork, or `inception(...)`), or, when `net` is the
    path of torch-fidelity's Inception-v3 weights (pt_inception-2015-12-05), in Inception's 2048 pool features (grey images repeated to 3 channels; needs `torch-fidelity`).
    Returns {"fid", "kid", "kid_std"}; raises ValueError for fewer than 2 images on a side, or for
    Inception weights or torch-fidelity that are not there. KID's subsets are drawn by a generator
    seeded 0, so the same images give the same figure."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID and KID need at least 2 images on each side, not {len(real)} and {len(fake)}")
    subset = max(2, min(KID_SUBSET, len(real) // 2, len(fake) // 2))  # subsets that differ from one another
    if isinstance(net, str):
        net = inception(net)
        real, fake = (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images for images in (real, fake))
    fid = FrechetInceptionDistance(feature=net, normalize=False)
    with warnings.catch_warnings():  # that KID keeps every feature vector: a few MB here
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=net, subsets=KID_SUBSETS, subset_size=subset, normalize=False)
    for metric in (fid, kid):
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch):
                metric.update(images[start:start + batch], real=is_real)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # KID's random subsets
    try:
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def inception(path: str):
    """torchmetrics' Inception-v3 (2048 pool features, `num_features` set) with the weights of a local
    file; ValueError in one line when the file is missing or not those weights, or torch-fidelity is
    not installed (nothing is downloaded)."""
    if not Path(path).is_file():
        what = "a folder" if Path(path).is_dir() else "no such file"
        raise ValueError(f"INCEPTION={path}: {what}; give the path of pt_inception-2015-12-05-6726825d.pth "
                         f"(torch-fidelity's Inception-v3 weights), which is never downloaded here")
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception needs it
    except ImportError as error:
        raise ValueError("Inception features need the package torch-fidelity: pip install torch-fidelity") from error
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
    except Exception as error:  # noqa: BLE001 - torch.load's and load_state_dict's errors are many
        raise ValueError(f"INCEPTION={path} is not torch-fidelity's Inception-v3 weights "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})") from error
    net.num_features = 2048
    return net


def test_images(experiment: dict) -> tuple[datasets.DatasetDict, str]:
    """The experiment's prepared data (all splits) and its cache name (which names the feature network)."""
    data = SubscaleDataModule(**experiment["data"])
    if data.streaming:
        raise ValueError("FID and KID read the test split from a prepared cache, and this source is streamed: "
                         "remove streaming: true (or use FID_N=0)")
    data.prepare_data()
    data.setup()
    return data.splits, data.cache_path().name


def split_images(split: datasets.Dataset, bits: int) -> torch.Tensor:
    """A cache split's images as the cascade would draw them: (N, C, H, W) uint8 8-bit values."""
    rows = split.with_format("numpy")
    return torch.cat([as_shown(rows[start:start + 1024]["image"], bits) for start in range(0, len(split), 1024)])


def run_features(run_dir, experiment: dict, bits: int):
    """(feature network, its record, the data's splits) of a run, training the network when missing."""
    splits, name = test_images(experiment)
    net, record = feature_network(run_dir, splits, name, bits, log=lambda line: print(line, file=sys.stderr))
    return net, record, splits


def main(args) -> None:
    """`make quality`: draw FID_N images from the trained cascade and score them against the test split."""
    from pipeline.inference.sample import check_memory, check_sampling_settings, draw, load_cascade

    check_sampling_settings(args.n, args.batch, args.temperature)
    inception_net = inception(args.inception) if args.inception else None  # checked before any work
    if args.n < 2:
        raise ValueError(f"FID_N={args.n}: FID and KID need at least 2 images")
    experiment, cascade = load_cascade(args)
    check_memory(args.n, args.batch, cascade)
    net, record, splits = run_features(args.run_dir, experiment, cascade.bits)
    real = split_images(splits["test"], cascade.bits)
    images, _, _ = draw(cascade, args.n, args.batch, args.temperature, args.seed)
    fake = as_shown(images.to(torch.uint8) << (8 - cascade.bits), 8)  # n-bit -> 8-bit values, (N, C, H, W)
    result = {**fid_kid(net, real, fake), "features": record["name"], "feature_task": record["task"],
              "feature_test_accuracy": record["test_accuracy"], "n_samples": len(fake), "n_real": len(real),
              "temperature": args.temperature, "seed": args.seed}
    if args.inception:
        result["inception"] = fid_kid(inception_net, real, fake)
    out = Path(args.run_dir) / ("quality.json" if args.temperature == 1.0 else f"quality-t{args.temperature:g}.json")
    save_json(out, result)
    print(f"FID {result['fid']:.3f}, KID {result['kid']:.5f} +- {result['kid_std']:.5f} of {len(fake)} samples "
          f"(temperature {args.temperature:g}) against {len(real)} test images, features {record['name']} "
          f"({record['task']}, test accuracy {record['test_accuracy']:.3f}); wrote {out}")
    if args.inception:
        print(f"Inception features: FID {result['inception']['fid']:.3f}, KID {result['inception']['kid']:.5f}")
    suffix = "" if args.temperature == 1.0 else f"_t{args.temperature:g}"
    log_job(experiment, "quality", Path(args.run_dir),
            {f"test/fid{suffix}": result["fid"], f"test/kid{suffix}": result["kid"],
             f"test/kid_std{suffix}": result["kid_std"], "features": record["name"]})

