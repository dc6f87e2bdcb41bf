"""Sampling and codec speed of two git revisions side by side, for a change that must leave them alone.

    python -m benchmarks.revisions BEFORE [AFTER] [--rounds 10] [--out bench/revisions]

Each revision is unpacked (`git archive`) into a temporary folder with its own build of the C++
modules. Then, ROUNDS times, each revision in turn measures in a fresh process, on the default
experiment's cascade with random weights (speed does not depend on them): 16 images drawn by the C++
loop and by the default sampler in one process, and those 16 images compressed and decompressed in
one process, best of a few tries each. This machine's speed drifts between minutes, so the rounds
alternate and the ratio after / before is the median of the rounds. The images and the file's bytes
of both revisions are hashed: a refactoring must not change them. Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.__main__ import OneLineParser
from pipeline.io import atomic_write, save_json

ROOT = Path(__file__).resolve().parent.parent
MEASURES = {"native": "C++ loop, s per image", "fast": "default sampler, s per image",
            "encode": "compress, s per image", "decode": "decompress, s per image"}

# One round in the revision's own tree: both the layout before pipeline/ was split and the one after.
ROUND = r"""
import hashlib, json, os, time, torch
if os.path.isdir("pipeline/inference"):
    from pipeline.inference.cascade import Cascade
    from pipeline.codec.coder import compress, decompress
else:
    from pipeline.cascade import Cascade
    from pipeline.codec import compress, decompress
from pipeline.config import data_geometry, load_experiment, stage_names
from stages import STAGES

config = load_experiment("fashion_mnist")
torch.manual_seed(0)
cascade = Cascade({name: STAGES[name](**data_geometry(config), **dict(config["stages"][name].get("model", {})))
                   for name in stage_names(config)})
digest = lambda data: hashlib.sha256(data).hexdigest()[:12]
def best(fn, tries):
    seconds = float("inf")
    for _ in range(tries):
        start = time.perf_counter(); out = fn(); seconds = min(seconds, time.perf_counter() - start)
    return out, seconds / 16
row = {}
for method in ("native", "fast"):
    (images, _, _), row[method] = best(lambda: cascade.sample(
        16, generator=torch.Generator().manual_seed(0), method=method, workers=1), 3)
    row[method + "_images"] = digest(images.numpy().tobytes())
data, row["encode"] = best(lambda: compress(cascade, images, workers=1), 2)
(decoded, _), row["decode"] = best(lambda: decompress(cascade, data, workers=1), 2)
row.update(bytes=len(data), file=digest(data), round_trip=bool(torch.equal(decoded, images)))
print(json.dumps(row))
"""


def unpack(revision: str, tree: Path) -> Path:
    """The tree of `revision` in `tree`, its C++ modules built in <tree>-extensions."""
    tree.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    subprocess.run([sys.executable, "-c", "from stages import canonical, native; native.build(); canonical.build()"],
                   cwd=tree, env=environment(tree), check=True, capture_output=True)
    return tree


def environment(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "TORCH_EXTENSIONS_DIR": f"{tree}-extensions",
            "PYTHONWARNINGS": "ignore"}


def run(before: str, after: str, rounds: int) -> dict:
    rows = {before: [], after: []}
    with tempfile.TemporaryDirectory() as folder:
        trees = {revision: unpack(revision, Path(folder) / f"tree{i}") for i, revision in enumerate(rows)}
        for i in range(rounds):
            for revision, tree in trees.items():
                done = subprocess.run([sys.executable, "-c", ROUND], cwd=tree, env=environment(tree),
                                      capture_output=True, text=True, check=True)
                rows[revision].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"  round {i + 1}/{rounds}: " + ", ".join(
                f"{name} {rows[after][-1][name] / rows[before][-1][name]:.3f}" for name in MEASURES), flush=True)
    median = {revision: {name: statistics.median(r[name] for r in rows[revision]) for name in MEASURES}
              for revision in rows}
    same = {key: len({r[key] for r in rows[before] + rows[after]}) == 1
            for key in ("native_images", "fast_images", "file")}
    return {"before": before, "after": after, "rounds": rounds, "median": median,
            "after_vs_before": {name: median[after][name] / median[before][name] for name in MEASURES},
            "same_images": same["native_images"] and same["fast_images"], "same_file": same["file"],
            "bytes": rows[after][0]["bytes"], "round_trip": all(r["round_trip"] for r in rows[before] + rows[after]),
            "rows": rows}


def markdown(results: dict) -> str:
    b, a = results["before"], results["after"]
    lines = [f"# `{b}` against `{a}`\n", f"`python -m benchmarks.revisions {b} {a} --rounds {results['rounds']}`: "
             f"medians of {results['rounds']} alternating rounds, the default experiment's cascade "
             "(random weights), 16 images, one process.\n",
             f"| measure | {b} | {a} | after / before |", "|---|---|---|---|"]
    for name, label in MEASURES.items():
        lines.append(f"| {label} | {results['median'][b][name]:.4g} | {results['median'][a][name]:.4g} | "
                     f"{results['after_vs_before'][name]:.3f} |")
    lines.append(f"\nSame images from both: {results['same_images']}; the same file ({results['bytes']} bytes) "
                 f"from both: {results['same_file']}; every file decodes to its images: {results['round_trip']}.\n")
    return "\n".join(lines)


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.revisions", description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/revisions"))
    args = parser.parse_args()
    commits = []
    for revision in (args.before, args.after):
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--short", revision + "^{commit}"],
                               cwd=ROOT, capture_output=True, text=True)
        if found.returncode != 0:
            sys.exit(f"error: {revision} is not a commit of this repository: name one (git log --oneline)")
        commits.append(found.stdout.strip())
    if commits[0] == commits[1]:
        sys.exit(f"error: {args.before} and {args.after} are the same commit: name two")
    results = run(*commits, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.out.with_suffix(".json"), results)
    atomic_write(args.out.with_suffix(".md"), markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
