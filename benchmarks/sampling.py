"""Sampling speed, side by side in one run, with the same noise for every method.

1. One decoder of the default experiment's size over a 28 x 28 sequence (784 sub-pixels):
   cached decoding against recomputing the whole prefix at every step (identical samples).
2. The whole cascade of the default experiment (28 x 28 x 1), of the previous default
   (ablations/fashion_mnist_b6: S = 4, b = 6, width 128) and of photos32 (32 x 32 x 3), at the
   sizes of their configs (random weights: speed does not depend on them): the simple cached
   sampler (the reference) against the fast one (`IncrementalDecoder`, the default) at batch 16
   and at batch 1, then the fast one at the batch that fills the machine.
"""
from __future__ import annotations

import json
import time

import torch

from pipeline.cascade import Cascade
from pipeline.config import data_geometry, load_experiment, stage_names
from stages import STAGES, FirstSliceDecoder


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def cascade_of(experiment: str, shrink: bool = False) -> Cascade:
    """The experiment's cascade at its configured sizes, with fresh random weights."""
    config = load_experiment(experiment)
    geometry = data_geometry(config)
    torch.manual_seed(0)
    stages = {}
    for name in stage_names(config):
        model = dict(config["stages"][name].get("model", {}))
        if shrink:
            model.update(width=16, layers=1, heads=2, context_width=16, context_layers=1)
        stages[name] = STAGES[name](**geometry, **model)
    return Cascade(stages)


def decoder_cached_vs_recomputed(experiment: str, batch: int, smoke: bool) -> dict:
    net = load_experiment(experiment)["stages"]["first_slice"].get("model", {})
    size = 8 if smoke else 28
    torch.manual_seed(0)
    stage = FirstSliceDecoder(image_size=size, channels=1, bits=8, high_bits=8, subscale=1,
                              width=net.get("width", 128), layers=net.get("layers", 4), heads=net.get("heads", 4)).eval()
    decoder = stage.decoder
    draws, seconds = {}, {}
    for method in ("cached", "recompute"):
        draws[method], seconds[method] = timed(
            lambda: decoder.sample(batch, generator=torch.Generator().manual_seed(0), method=method))
    tokens = batch * decoder.cfg.length
    return {"sequence": f"{size}x{size} (one decoder, width {decoder.cfg.width}, {decoder.cfg.layers} layers)",
            "batch": batch, "cached_s": seconds["cached"], "recomputed_s": seconds["recompute"],
            "cached_subpixels_per_s": tokens / seconds["cached"],
            "cached_speedup": seconds["recompute"] / seconds["cached"],
            "identical": torch.equal(draws["cached"][0], draws["recompute"][0]),
            "max_log_prob_difference_nats": float((draws["cached"][1] - draws["recompute"][1]).abs().max())}


def cascade_speed(cascade: Cascade, batch: int, method: str, repeat: int):
    (images, log_prob, _), seconds = timed(
        lambda: cascade.sample(batch, generator=torch.Generator().manual_seed(0), method=method), repeat)
    subpixels = len(cascade.plan()) * cascade.h * cascade.w * cascade.C * batch
    return images, log_prob, {"batch": batch, "method": method, "s_per_image": seconds / batch,
                              "subpixels_per_s": subpixels / seconds}


def run(quick: bool = False, smoke: bool = False) -> dict:
    out = {"decoder": decoder_cached_vs_recomputed("fashion_mnist", 4 if smoke else 16, smoke)}
    repeat = 1 if smoke or quick else 2
    fill = 16 if smoke else 64 if quick else 128
    out["cascades"] = []
    for experiment in ("fashion_mnist", "ablations/fashion_mnist_b6", "photos32"):
        cascade = cascade_of(experiment, shrink=smoke)
        shape = " x ".join(map(str, cascade.shape))
        reference = cascade_speed(cascade, 16, "cached", repeat)
        fast = cascade_speed(cascade, 16, "fast", repeat)
        same = torch.equal(reference[0], fast[0])
        single = [cascade_speed(cascade, 1, method, repeat)[2] for method in ("cached", "fast")]
        rows = [reference[2], fast[2], *single, cascade_speed(cascade, fill, "fast", 1)[2]]
        out["cascades"].append({
            "experiment": experiment, "shape": shape, "stages": list(cascade.stages), "rows": rows,
            "fast_vs_reference_at_16": reference[2]["s_per_image"] / fast[2]["s_per_image"],
            "fast_vs_reference_at_1": single[0]["s_per_image"] / single[1]["s_per_image"],
            "identical_images": same, "max_log_prob_difference_nats": float((reference[1] - fast[1]).abs().max())})
        print(f"  sampling {experiment}: {json.dumps(out['cascades'][-1])}", flush=True)
    default = out["cascades"][0]
    best = default["rows"][-1]  # the fast sampler at the batch that fills the machine
    previous = out["cascades"][1]
    out.update(cached_speedup=out["decoder"]["cached_speedup"], cascade_s_per_image=best["s_per_image"],
               cascade_batch=best["batch"], threads=torch.get_num_threads(),
               # another model, not a faster sampler: the previous default, reference sampler, batch 16
               default_vs_previous_default_at_16=previous["rows"][0]["s_per_image"] / default["rows"][1]["s_per_image"])
    return out
