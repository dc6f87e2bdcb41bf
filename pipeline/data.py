"""`make data`: prepare the experiment's data cache once and print what it holds."""
from __future__ import annotations

from data.datamodule import SubscaleDataModule
from pipeline.config import load_experiment


def main(args) -> None:
    experiment = load_experiment(args.exp)
    data = SubscaleDataModule(**experiment["data"])
    data.prepare_data()
    data.setup()
    sizes = ", ".join(f"{split} {len(ds)}" for split, ds in data.splits.items())
    print(f"{experiment['name']}: {data.cache_path()} ({sizes} images of {data.shape})")
