"""One stage alone, for a fixed budget of training seconds: the reduced-budget rows of the
README's ablation table.

The stage's real training step (Monte-Carlo estimator, AdamW betas (0.9, 0.95), weight decay
0.01 on matrices, gradient clipping at 1, linear warmup then cosine decay to 0) in a plain
loop on Fashion-MNIST at 28 x 28, without Lightning. With --seconds, 25 timed steps first
fix how many steps fit (so that the schedule completes). Then the exact validation share of
the stage (its slices' NLL per dimension of the whole image) on the first 1,000 validation
images, and each slice's own bits per sub-pixel. One JSON line per run goes to --log. --save writes the
trained stage as a checkpoint, and --init starts a stage from the decoder of the stage before it in the
cascade's order, saved so (`SubscaleStage.start_from`, as `init_from` does in training).

    python -m benchmarks.ablate --stage size_spn --high-bits 8 --seconds 480 --model '{"width": 64}'
    python -m benchmarks.ablate --stage first_slice --subscale 2 --steps 1000 --save runs/first.ckpt
    python -m benchmarks.ablate --stage size_spn --subscale 2 --steps 2000 --init runs/first.ckpt
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import jsonargparse
import torch

from data.datamodule import SubscaleDataModule
from pipeline.__main__ import OneLineParser
from pipeline.checkpoints import load_stage, save_stage
from stages import GEOMETRY, STAGES
from stages.metrics import bits_per_dim
from stages.plan import ORDER

DEFAULT_MODEL = dict(width=128, layers=4, heads=4, context_width=128, context_layers=2, context_attention_layers=1)


def model_arguments(stage: str, text: str) -> dict:
    """--model's JSON object of `stage` arguments, each key and value checked against the stage's
    signature as the pipeline's experiment files are (jsonargparse), values converted to its types.
    Raises ValueError, in one line, for text that is not a JSON object, an unknown key or a value
    of the wrong type."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model: not JSON ({error})") from None
    if not isinstance(given, dict):
        raise ValueError(f"--model: a JSON object of stage arguments is wanted, such as '{{\"width\": 64}}', "
                         f"not {' '.join(text.split())}")
    checker = jsonargparse.ArgumentParser(exit_on_error=False)
    checker.add_class_arguments(STAGES[stage], "model", skip=set(GEOMETRY))  # the geometry has its own flags
    try:
        parsed = checker.parse_object({"model": given})
    except jsonargparse.ArgumentError as error:
        raise ValueError(f"--model: {' '.join(str(error).split())}") from None
    return {key: parsed.model[key] for key in given}


def exact_val(stage, data) -> tuple[float, dict]:
    """The stage's share of bits/dim on the validation subset, and each slice's bits per own sub-pixel."""
    stage.eval()
    total, count, per_slice = 0.0, 0, {}
    with torch.no_grad():
        for batch in data.val_dataloader():
            known, size = stage.sliced(batch), batch["msb"].shape[0]
            for k in stage.modelled_slices():
                nats = float(stage.slice_nll(known, torch.full((size,), k)).sum())
                per_slice[k] = per_slice.get(k, 0.0) + nats
                total += nats
            count += size
    own = stage.h * stage.w * stage.C * math.log(2)
    return float(bits_per_dim(total / count, stage.dims)), {k: round(v / count / own, 3) for k, v in per_slice.items()}


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.ablate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="size_spn", choices=list(STAGES))
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--high-bits", type=int, default=8)
    parser.add_argument("--subscale", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=0, help="a time budget instead of --steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--model", default="{}", help="JSON of stage arguments over the defaults")
    parser.add_argument("--init", default="", help="the checkpoint (--save) of the stage before it, whose decoder "
                                                   "the stage starts from")
    parser.add_argument("--save", default="", help="write the trained stage to this checkpoint")
    parser.add_argument("--tag", default="")
    parser.add_argument("--log", default="bench/ablations.jsonl")
    args = parser.parse_args()
    if not args.lr >= 0:
        parser.error(f"--lr {args.lr}: the learning rate is a number of 0 or more, such as 2e-3")
    if args.init and args.stage == ORDER[0]:
        parser.error(f"--init: the {ORDER[0]} is the first stage and starts from none")
    if args.init and not Path(args.init).is_file():
        what = "a folder, not a checkpoint file" if Path(args.init).is_dir() else "no such checkpoint"
        parser.error(f"--init {args.init}: {what} (write one with --save)")

    geometry = dict(image_size=28, channels=1, bits=args.bits, high_bits=args.high_bits, subscale=args.subscale)
    try:
        model = {**DEFAULT_MODEL, **model_arguments(args.stage, args.model)}
        with torch.random.fork_rng():  # settings the stage refuses, before the data loads; the draws stay as they were
            STAGES[args.stage](**geometry, **model)
    except ValueError as error:
        parser.error(str(error))

    torch.manual_seed(0)
    data = SubscaleDataModule(source={"kind": "fashion_mnist"}, image_size=28, channels=1, bits=args.bits,
                              high_bits=args.high_bits, subscale=args.subscale, batch_size=args.batch,
                              eval_batch_size=250, val_subset=1000)
    data.prepare_data()
    data.setup()
    stage = STAGES[args.stage](**geometry, **model)
    if args.init:
        try:
            stage.start_from(load_stage(ORDER[ORDER.index(args.stage) - 1], args.init))
        except ValueError as error:  # a --init whose decoder does not fit this stage's
            parser.error(str(error))
    initial = copy.deepcopy(stage.state_dict())
    decay = [p for p in stage.parameters() if p.dim() >= 2]
    no_decay = [p for p in stage.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))

    def step(batch) -> torch.Tensor:
        estimate = stage.estimate(stage.sliced(batch), stage.random_slices(batch["msb"].shape[0]))
        optimizer.zero_grad()
        (estimate.mean() / stage.dims).backward()
        return estimate

    if args.seconds:  # how many steps fit: the median of 20 timed steps after 5 of warming up
        times, batches = [], iter(data.train_dataloader())
        for _ in range(25):
            start = time.perf_counter()
            step(next(batches))
            times.append(time.perf_counter() - start)
        optimizer.zero_grad()
        optimizer.state.clear()
        stage.load_state_dict(initial)
        args.steps = int(args.seconds / (sorted(times[5:])[len(times[5:]) // 2] * 1.03))
        print(f"{args.steps} steps fit in {args.seconds:g} s", flush=True)

    def schedule(i: int) -> float:  # linear warmup, then cosine decay to 0 (as the stages train)
        if i < args.warmup:
            return (i + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * min((i - args.warmup) / max(args.steps - args.warmup, 1), 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    done, start, recent = 0, time.time(), []
    while done < args.steps:
        for batch in data.train_dataloader():
            stage.train()
            estimate = step(batch)
            torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            recent.append(float(bits_per_dim(estimate.detach().mean(), stage.dims)))
            done += 1
            if done % 200 == 0:
                print(f"step {done}: train bpd {sum(recent[-200:]) / 200:.3f}, {time.time() - start:.0f} s", flush=True)
            if done >= args.steps:
                break
    seconds = time.time() - start
    val, per_slice = exact_val(stage, data)
    if args.save:
        save_stage(stage, args.save, args.steps)
    result = {"tag": args.tag, "stage": args.stage, "bits": args.bits, "high_bits": args.high_bits,
              "subscale": args.subscale, "init": args.init, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "model": model,
              "parameters": sum(p.numel() for p in stage.parameters()), "train_s": round(seconds),
              "val_bpd": round(val, 4), "per_slice_bits": per_slice}
    print(json.dumps(result), flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
