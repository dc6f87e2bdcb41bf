"""`make bench`: the project's performance measured side by side in one run, written to
bench/results.json and bench/results.md.

    python -m benchmarks.run [--quick] [--minutes 15] [--longer 40] [--smoke] [--parts quality,...] [--out bench]
        [--lr-from bench/quality/results.json]

--quick: reduced sizes and 1 minute of training per model (a few minutes in all);
--smoke: seconds, on the `smoke` experiment, to keep the code working (CI runs it);
--parts: only the parts named (memory, sampling, throughput, experiment64, quality, gpu), for
example the quality comparison alone into another --out; the report leaves out the others;
--lr-from: the quality part trains at the learning rates an earlier run's sweep chose (its
results.json), without a sweep of its own (a longer point alone, say).
Parts: memory and time per training step against image size and S; sampling speed; the 64 x 64
experiment's step and sampling costs (not in --smoke);
quality at equal training minutes against a single full-image transformer and ordinary
codecs; the cascade trained there as a codec (real size, encode and decode speed); training
throughput and the fraction of the machine's matmul peak it reaches; and the figures of
`python -m benchmarks.gpu` when they were measured on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import codec, experiment64, memory, quality, sampling, throughput
from benchmarks.report import machine, minutes_text, table
from pipeline.__main__ import OneLineParser
from pipeline.io import atomic_write, save_json

PARTS = ("memory", "sampling", "throughput", "experiment64", "quality", "gpu")


def markdown(results: dict) -> str:
    out = [f"# Benchmarks\n\n`{results['command']}` on {results['machine']['cpu']} "
           f"({results['machine']['threads']} threads, torch {results['machine']['torch']}), "
           f"{results['date']}; {results['minutes_total']:.1f} minutes in all.\n"]
    if "memory" in results:
        m = results["memory_settings"]
        out.append(f"## Memory and time per training step\n\nSize SPN (S = 1: the full-image transformer), "
                   f"width {m['width']}, batch {m['batch']}, 3 channels; budgets "
                   f"{m['memory_budget_mb']} MB and {m['time_budget_s']} s per case.\n")
        out.append(table(["image", "S", "slice", "peak MB", "step s", "memory vs S=1", "time vs S=1", "ideal 1/S^2",
                          "status"],
                         [[r["image"], r["S"], r["slice"], r["peak_mb"], r["step_s"], r.get("peak_mb_vs_S1"),
                           r.get("step_s_vs_S1"), r["ideal"], r["status"]] for r in results["memory"]]))
    if "sampling" in results:
        s = results["sampling"]
        d = s["decoder"]
        out.append(f"\n## Sampling\n\n{d['sequence']}, batch {d['batch']}: cached {d['cached_s']:.3g} s, "
                   f"recomputing the prefix {d['recomputed_s']:.3g} s: **{d['cached_speedup']:.1f}x**, the same "
                   f"samples (but at float ties): {d['agree']}.\n")
        rows = []
        for c in s["cascades"]:
            for r in c["rows"]:
                rows.append([c["experiment"], c["shape"], r["sampler"], r["batch"], r["s_per_image"],
                             r["subpixels_per_s"]])
        out.append(table(["cascade", "image", "sampler", "batch", "s per image", "sub-pixels/s"], rows))
        default = "the C++ loop" if s.get("native") else "the Python fast step (the C++ loop could not be built)"
        out.append(f"\nThe default sampler, which `make sample` uses: {default} in processes of one thread each, one "
                   f"per core (the first share in the sampling process, the others forked).")
        for c in s["cascades"]:
            out.append(f"\n{c['experiment']}: the default sampler against the reference at batch 16: "
                       f"**{c['default_vs_reference_at_16']:.2f}x** (in one process: the C++ loop "
                       f"{c['cpp_loop_vs_reference_at_16']:.2f}x, the Python fast step "
                       f"{c['python_step_vs_reference_at_16']:.2f}x; against the reference on one thread: "
                       f"{c['default_vs_reference_on_one_thread_at_16']:.2f}x), at batch 1: "
                       f"{c['default_vs_reference_at_1']:.2f}x; the same images but at float ties {c['images_agree']} "
                       f"({c['images_at_near_ties']} of {c['images_compared']} differ from a near-tie on), "
                       f"log-probabilities of equal images within {c['max_log_prob_difference_nats']:.1e} nats.")
        out.append(f"\nThe default cascade (default sampler) against the previous default (S = 4, b = 6, width 128; the "
                   f"reference sampler it shipped with), batch 16: **{s['default_vs_previous_default_at_16']:.1f}x** "
                   f"less time per image, of which the sampler gives {s['cascades'][0]['default_vs_reference_at_16']:.2f}x "
                   f"and the smaller model the rest.")
    q = results.get("quality")
    if q:
        names = {"cascade": "cascade (" + ", ".join(q["cascade"]["stages"]) + ")",
                 "single_transformer": "single full-image transformer", "pixelcnnpp": "PixelCNN++"}
        minutes = " and ".join(f"{p['minutes']:g}" for p in q["points"])
        out.append(f"\n## Quality at equal compute ({minutes} minutes of training each)\n\n"
                   f"Test bits/dim on {q['test_images']} test images of `{q['experiment']}`, each model at the best "
                   f"learning rate of the same sweep (below).\n")
        rows = [[names[m], *[p[m]["bpd"] for p in q["points"]]] for m in names]
        rows.append(["cascade's lead over PixelCNN++", *[p["cascade_lead"] for p in q["points"]]])
        out.append(table(["model", *[f"{p['minutes']:g} min" for p in q["points"]]], rows))
        out.append("\nA lead of at least 0.10 bits/dim over PixelCNN++: " + ", ".join(
            f"{'yes' if p['cascade_lead'] >= 0.10 else 'no'} at {minutes_text(p['minutes'])}" for p in q["points"]) + ".\n")
        for p in q["points"]:  # the steps each model trained in its minutes
            trained = [f"{names[m]}: " + ", ".join(
                f"{stage} {row['steps']}" + (f" of {row['planned_steps']} planned" if "planned_steps" in row else "")
                for stage, row in p[m]["training"].items()) for m in ("cascade", "single_transformer")]
            out.append(f"\nSteps trained in {minutes_text(p['minutes'])}: " + "; ".join(trained)
                       + f"; PixelCNN++: {p['pixelcnnpp']['steps']}.")
        first = q["points"][0]
        out.append(f"\nThe cascade's stages at {minutes_text(first['minutes'])}: "
                   + ", ".join(f"{k} {v:.3f}" for k, v in first["cascade"]["stages"].items())
                   + (f"; its real compressed file {first['cascade']['compressed_bpd']:.4f}"
                      if first["cascade"].get("compressed_bpd") else "") + ".\n")
        if first["cascade"].get("slices"):
            out.append("Each slice's share of its bits/dim (bits per sub-pixel of the slice): " + ", ".join(
                f"{row['stage']} {row['part']} k={row['k']} {row['bpd']:.3f} ({row['bits_per_subpixel']:.2f})"
                for row in first["cascade"]["slices"]) + ".\n")
        source = q.get("lr_from")
        out.append((f"Learning rates from an earlier run's sweep, not swept again here (`{source['command']}`, "
                    f"{source['date']}, {source['machine']}, `{source['file']}`): " if source else
                    "Learning-rate sweep: ")
                   + f"each rate trained {minutes_text(q['sweep']['cascade']['pilot_minutes'])}, "
                   f"validation bits/dim on {(source or q)['val_images']} validation images:\n")
        out.append(table(["model", "base lr", *[f"x{f}" for f in q["sweep"]["cascade"]["val_bpd"]], "chosen lr"],
                         [[names[m], q["sweep"][m]["base_lr"], *q["sweep"][m]["val_bpd"].values(), q["lr"][m]]
                          for m in names]))
        out.append("\nOrdinary codecs on the same test images:\n")
        out.append(table(["codec", "test bits/dim"], [[name, value] for name, value in q["codecs"].items()]))
    c = results.get("codec")
    if c:
        out.append(f"\n## The cascade as a codec\n\n`make compress` and `make decompress` on the first {c['images']} "
                   f"test images with the cascade trained above ({c['chunk']} images coded together on one thread, "
                   f"{c['processes']} processes side by side): file {c['file_bpd']:.4f} bits/dim against the model's "
                   f"{c['model_bpd']:.4f} (**{c['overhead_percent']:+.2f}%**, header included); encode "
                   f"{c['encode_s_per_image']:.4f} s and decode {c['decode_s_per_image']:.4f} s per image (one process: "
                   f"{c['encode_s_per_image_one_process']:.4f} s and {c['decode_s_per_image_one_process']:.4f} s); "
                   f"identical images and files: {c['identical']}.")
    if "throughput" in results:
        t = results["throughput"]
        out.append(f"\n## Training throughput\n\nMatmul peak measured now: {t['matmul_peak_flops'] / 1e9:.0f} GFLOP/s "
                   f"({t['threads']} threads).\n")
        out.append(table(["stage", "parameters", "batch", "images/s", "GFLOP per step", "GFLOP/s", "of peak"],
                         [[r["stage"], r["parameters"], r["batch"], r["images_per_s"], r["flops_per_step"] / 1e9,
                           r["flops_per_s"] / 1e9, r["utilisation"]] for r in t["stages"]]))
    if results.get("experiment64"):
        out += experiment64.markdown(results["experiment64"])
    if "gpu" in results:
        g = results["gpu"]
        out.append("\n## On a GPU\n\n" + (g["note"] if "note" in g else table(
            ["setting", "stage", "batch", "images/s", "MFU", "s per image (sampling)"],
            [[r["setting"], r["stage"], r["batch"], r.get("images_per_s"), r.get("model_flops_utilisation"),
              r.get("s_per_image")] for r in g["rows"]])))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.run", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per model (default 15, quick 1)")
    parser.add_argument("--longer", type=float, default=None,
                        help="the second, longer point of the quality comparison (default 40, quick 2; 0: none)")
    parser.add_argument("--lr-from", default=None, metavar="RESULTS_JSON",
                        help="train the quality part's models at the learning rates an earlier run's sweep chose "
                             "(its results.json) instead of sweeping again")
    parser.add_argument("--exp", default="fashion_mnist")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"the parts to run, comma-separated (default all: {','.join(PARTS)}; codec follows quality)")
    parser.add_argument("--out", default=None, help="the folder of the report (default bench; --quick: bench/quick)")
    args = parser.parse_args()
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        sys.exit(f"error: --parts {args.parts!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none named'}; "
                 f"name some of {', '.join(PARTS)}")
    experiment = "smoke" if args.smoke else args.exp
    rates = None
    if args.lr_from:
        if "quality" not in parts:
            parser.error("--lr-from: the learning rates are the quality part's; add quality to --parts")
        try:
            rates = quality.earlier_rates(Path(args.lr_from), experiment)
        except ValueError as error:
            parser.error(f"--lr-from: {error}")
    out = Path(args.out or ("bench/quick" if args.quick else "bench"))  # a quick try keeps the committed report
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    minutes = args.minutes if args.minutes is not None else 0.1 if args.smoke else 1.0 if args.quick else 15.0
    command = "make bench" + (" QUICK=1" if args.quick else "") + (f" MINUTES={args.minutes:g}" if args.minutes else "")
    if args.smoke:
        command = "python -m benchmarks.run --smoke"
    if len(parts) < len(PARTS) or args.lr_from:  # options make bench does not pass
        command = f"python -m benchmarks.run --parts {','.join(parts)}" + (" --quick" if args.quick else "") + \
            (f" --minutes {args.minutes:g}" if args.minutes else "") + \
            (f" --longer {args.longer:g}" if args.longer is not None else "") + (" --smoke" if args.smoke else "") + \
            (f" --lr-from {args.lr_from}" if args.lr_from else "")
    results = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    # Memory first: each case forks this process, and a fork starts with this process's peak memory
    # as its own (ru_maxrss carries over), which the sampling benchmark's recomputed decoding raises.
    if "memory" in parts:
        print("memory per training step ...", flush=True)
        measured = memory.run(args.quick, args.smoke)
        results["memory"], results["memory_settings"] = measured["rows"], measured["settings"]
    if "sampling" in parts:
        print("sampling ...", flush=True)
        results["sampling"] = sampling.run(args.quick, args.smoke)
    if "throughput" in parts:
        print("training throughput ...", flush=True)
        results["throughput"] = throughput.run(experiment, args.quick, args.smoke)
    if "experiment64" in parts and not args.smoke:
        print("the 64 x 64 experiment ...", flush=True)
        try:
            results["experiment64"] = experiment64.run(args.quick)
        except ValueError as error:  # its data cannot be had here (the emoji packages): the rest still runs
            print(f"  left out: {error}", flush=True)
    if "quality" in parts:
        print(f"quality at {minutes_text(minutes)} each ...", flush=True)
        longer = None if args.smoke else args.longer if args.longer is not None else 2 * minutes if args.quick else 40.0
        results["quality"] = quality.run(experiment, minutes,
                                         test_images=64 if args.smoke else 1000 if args.quick else None,
                                         folder=out / "runs", longer=longer or None,
                                         val_images=32 if args.smoke else 256 if args.quick else 1000, rates=rates)
        print("the cascade as a codec ...", flush=True)
        runs = out / "runs"
        results["codec"] = codec.run(runs / "cascade.yaml", runs / "cascade", runs / "test_images.npz",
                                     count=64 if args.smoke else 256 if args.quick else 1000)
    if "gpu" in parts:
        gpu = out / "gpu.json"
        measured = json.loads(gpu.read_text()) if gpu.exists() else None
        results["gpu"] = measured if measured and measured.get("device") != "cpu" else {
            "note": "Not measured: no GPU was available to this run. `python -m benchmarks.gpu` measures it on a "
                    "machine with one (bf16 mixed precision, torch.compile, MFU, sampling) and writes bench/gpu.json, "
                    "which this report then includes."}
    results["minutes_total"] = (time.perf_counter() - start) / 60
    save_json(out / "results.json", results)
    atomic_write(out / "results.md", markdown(results).encode())
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({results['minutes_total']:.1f} minutes)")


if __name__ == "__main__":
    main()
