"""Sampling speed, side by side in one run, with the same noise for every method.

1. One decoder of the default experiment's size over a 28 x 28 sequence (784 sub-pixels):
   cached decoding against recomputing the whole prefix at every step (the same samples, but at
   float ties: `pipeline.inference.agreement`).
2. The whole cascade of the default experiment (28 x 28 x 1), of the previous default
   (ablations/fashion_mnist_b6: S = 4, b = 6, width 128) and of photos32 (32 x 32 x 3), at the
   sizes of their configs (random weights: speed does not depend on them). At batch 16: the
   reference (the simple cached step, `SliceDecoder.step`, in one process, as the project
   sampled before); the same on one thread; the Python fast step (`IncrementalDecoder`) and the
   C++ loop (`stages.native`) in one process; and the default sampler (the C++ loop in forked
   processes of one thread each, `pipeline.inference.processes`). Then the reference against the default
   at batch 1, and the default at the batch that fills the machine.
"""
from __future__ import annotations

import json
import time

import torch

from pipeline.config import data_geometry, load_experiment, stage_names
from pipeline.inference.agreement import compare, slices_agree
from pipeline.inference.cascade import Cascade
from pipeline.inference.processes import worker_count
from stages import STAGES, FirstSliceDecoder, native

SAMPLERS = {"cached": "reference", "incremental": "Python fast step", "native": "C++ loop", "fast": "default"}


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
            "agree": bool(slices_agree(decoder, None, torch.rand(batch, decoder.cfg.length,
                                                                 generator=torch.Generator().manual_seed(0)),
                                       draws["cached"][0], draws["recompute"][0]).all()),
            "max_log_prob_difference_nats": float((draws["cached"][1] - draws["recompute"][1]).abs().max())}


def cascade_speed(cascade: Cascade, batch: int, method: str, workers: int | None, threads: int | None = None):
    """One draw of `batch` images: (images, log-probabilities, row of figures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        (images, log_prob, _), seconds = timed(lambda: cascade.sample(
            batch, generator=torch.Generator().manual_seed(0), method=method, workers=workers))
    finally:
        torch.set_num_threads(before)
    subpixels = len(cascade.plan()) * cascade.h * cascade.w * cascade.C * batch
    processes = worker_count(batch, cascade.device, workers)
    name = f"{SAMPLERS[method]}, {processes} process{'es' if processes > 1 else ''}"
    name += f", {threads} thread" if threads else ""
    return images, log_prob, {"batch": batch, "method": method, "processes": processes, "sampler": name,
                              "s_per_image": seconds / batch, "subpixels_per_s": subpixels / seconds}


def agreement(cascade: Cascade, pairs: list) -> dict:
    """How the images of each pair of draws (from generators seeded 0) agree (`pipeline.inference.agreement`): equal
    but at near-ties of the inverse CDF, and the log-probabilities of the equal images."""
    verdicts, differences = [], [0.0]
    for (images, log_prob, _), (other, other_log_prob, _) in pairs:
        verdicts.append(compare(cascade, cascade.image_seeds(len(images), torch.Generator().manual_seed(0)),
                                images, other))
        same = (images == other).flatten(1).all(1)
        differences.append(float((log_prob[same] - other_log_prob[same]).abs().max()) if same.any() else 0.0)
    return {"images_agree": all(v["disagree"] == 0 for v in verdicts),
            "images_compared": sum(sum(v.values()) for v in verdicts),
            "images_at_near_ties": sum(v["near_ties"] for v in verdicts),
            "max_log_prob_difference_nats": max(differences)}


def fastest(cascade: Cascade, settings: list[tuple], repeat: int) -> list:
    """cascade_speed of each setting, the best of `repeat` rounds taken in turn (this machine's speed
    drifts between minutes: each round measures every setting within seconds of the others)."""
    best = [None] * len(settings)
    for _ in range(repeat):
        for i, setting in enumerate(settings):
            measured = cascade_speed(cascade, *setting)
            if best[i] is None or measured[2]["s_per_image"] < best[i][2]["s_per_image"]:
                best[i] = measured
    return best


def run(quick: bool = False, smoke: bool = False) -> dict:
    out = {"native": native.usable("cpu", torch.float32)}  # whether "fast" is the C++ loop on this machine
    repeat = 1 if smoke else 2 if quick else 3
    fill = 16 if smoke else 64 if quick else 128
    out["cascades"] = []
    for experiment in ("fashion_mnist", "ablations/fashion_mnist_b6", "photos32"):
        cascade = cascade_of(experiment, shrink=smoke)
        shape = " x ".join(map(str, cascade.shape))
        reference, one_thread, python_step, cpp_loop, default = fastest(
            cascade, [(16, "cached", 1), (16, "cached", 1, 1), (16, "incremental", 1), (16, "native", 1),
                      (16, "fast", None)], repeat)
        single = fastest(cascade, [(1, "cached", 1), (1, "fast", None)], repeat)
        rows = [reference[2], one_thread[2], python_step[2], cpp_loop[2], default[2],
                *(row for _, _, row in single), cascade_speed(cascade, fill, "fast", None)[2]]
        ratio = lambda a, b: a[2]["s_per_image"] / b[2]["s_per_image"]  # noqa: E731
        pairs = [(reference, other) for other in (one_thread, python_step, cpp_loop, default)] + [single]
        out["cascades"].append({
            "experiment": experiment, "shape": shape, "stages": list(cascade.stages), "rows": rows,
            "default_vs_reference_at_16": ratio(reference, default),
            "cpp_loop_vs_reference_at_16": ratio(reference, cpp_loop),
            "python_step_vs_reference_at_16": ratio(reference, python_step),
            "default_vs_reference_on_one_thread_at_16": ratio(one_thread, default),
            "default_vs_reference_at_1": ratio(*single),
            **agreement(cascade, pairs)})
        print(f"  sampling {experiment}: {json.dumps(out['cascades'][-1])}", flush=True)
    # last: recomputing the prefix leaves gigabytes in this process's heap, and every fork copies its page tables
    out["decoder"] = decoder_cached_vs_recomputed("fashion_mnist", 4 if smoke else 16, smoke)
    default = out["cascades"][0]
    best = default["rows"][-1]  # the default sampler at the batch that fills the machine
    previous = out["cascades"][1]
    out.update(cached_speedup=out["decoder"]["cached_speedup"], cascade_s_per_image=best["s_per_image"],
               cascade_batch=best["batch"], threads=torch.get_num_threads(),
               # another model, not a faster sampler: the previous default, reference sampler, batch 16
               default_vs_previous_default_at_16=previous["rows"][0]["s_per_image"] / default["rows"][4]["s_per_image"])
    return out
