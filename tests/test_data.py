"""Every source kind, the real built-in data, and the DataModule's batches."""
import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.datamodule import SubscaleDataModule
from data import sources
from data.sources import FASHION_MNIST_DIR, fashion_mnist, photo_patches, prepare

ROOT = Path(__file__).resolve().parents[1]

HAVE_FASHION_MNIST = Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists()
needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST,
                                         reason="apt-get install dataset-fashion-mnist (CI installs it)")


def random_images(n, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def load(path):
    return datasets.load_from_disk(str(path)).with_format("numpy", dtype=np.uint8)


def test_hub_source_through_a_local_parquet_repository(tmp_path):
    """A hub name is resolved by `datasets.load_dataset`; a local folder of parquet files stands in."""
    repo = tmp_path / "user_dataset" / "data"
    repo.mkdir(parents=True)
    for split, n in (("train", 20), ("test", 6)):
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in random_images(n)], "label": [0] * n},
                                        features=datasets.Features({"img": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
        ds.to_parquet(str(repo / f"{split}-00000-of-00001.parquet"))
    source = {"kind": "hub", "name": str(tmp_path / "user_dataset"), "image_column": "img"}
    splits = load(prepare(source, channels=1, image_size=(8, 8), val_size=0.25, cache_dir=tmp_path / "cache"))
    assert {s: len(d) for s, d in splits.items()} == {"train": 15, "val": 5, "test": 6}
    assert splits["train"][0]["image"].shape == (8, 8, 1)


def test_imagefolder_skips_and_counts_corrupt_files(tmp_path, caplog):
    for split, n in (("train", 5), ("test", 3)):
        folder = tmp_path / "images" / split
        folder.mkdir(parents=True)
        for i, array in enumerate(random_images(n, 16, 20, seed=n)):
            Image.fromarray(array).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "broken.png").write_bytes(b"not a png at all")
    source = {"kind": "imagefolder", "path": str(tmp_path / "images")}
    with caplog.at_level("WARNING"):
        splits = load(prepare(source, channels=3, image_size=(8, 8), val_size=0.2, cache_dir=tmp_path / "c"))
    assert len(splits["train"]) + len(splits["val"]) == 5 and len(splits["test"]) == 3
    assert "skipped 1 unusable images of 6" in caplog.text and "(1 unreadable)" in caplog.text
    # centre crop (16 x 20 -> 16 x 16) then resize to 8 x 8: red side margins of 2 pixels vanish
    framed = np.full((16, 20, 3), 128, np.uint8)
    framed[:, :2] = framed[:, -2:] = (255, 0, 0)
    Image.fromarray(framed).save(tmp_path / "images" / "test" / "0.png")
    splits = load(prepare(source, channels=3, image_size=(8, 8), val_size=0.2, cache_dir=tmp_path / "c2"))
    assert any((splits["test"][i]["image"] == 128).all() for i in range(3))


def test_source_without_a_usable_image_is_an_error(tmp_path):
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="no readable image|no usable image"):
        prepare({"kind": "imagefolder", "path": str(tmp_path / "images")}, 1, (8, 8), cache_dir=tmp_path / "c")


@pytest.mark.parametrize("kind", ["parquet", "arrow", "disk"])
def test_local_arrow_parquet_and_saved_datasets(tmp_path, kind):
    arrays = {"train": random_images(10, 8, 8), "test": random_images(4, 8, 8, seed=1)}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in arr]}, features=datasets.Features({"image": datasets.Image()}))
        for s, arr in arrays.items()})
    if kind == "disk":
        dd.save_to_disk(str(tmp_path / "saved"))
        source = {"kind": "disk", "path": str(tmp_path / "saved")}
    else:
        files = {}
        for split, ds in dd.items():
            path = tmp_path / f"{split}.{kind}"
            if kind == "parquet":
                ds.to_parquet(str(path))
            else:
                ds.save_to_disk(str(tmp_path / f"{split}_arrow"))
                path = next((tmp_path / f"{split}_arrow").glob("*.arrow"))
            files[split] = str(path)
        source = {"kind": kind, "data_files": files}
    splits = load(prepare(source, channels=3, image_size=None, val_size=0.2, cache_dir=tmp_path / "c"))
    assert len(splits["test"]) == 4 and len(splits["train"]) + len(splits["val"]) == 10
    test_bytes = {splits["test"][i]["image"].tobytes() for i in range(4)}
    assert test_bytes == {a.tobytes() for a in arrays["test"]}  # exact pixels, no resizing


def test_unknown_source_kind_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data source kind 'ftp'"):
        prepare({"kind": "ftp"}, 1, (8, 8), cache_dir=tmp_path)


@needs_fashion_mnist
def test_fashion_mnist_is_the_real_data():
    splits = fashion_mnist()
    assert splits["train"]["image"].shape == (60000, 28, 28, 1) and splits["test"]["image"].shape == (10000, 28, 28, 1)
    assert splits["train"]["image"].mean() == pytest.approx(72.94, abs=0.05)
    for split in splits.values():  # the classes, 0 to 9, of every image, in the images' order
        assert len(split["label"]) == len(split["image"]) and set(np.unique(split["label"])) == set(range(10))
    assert np.bincount(splits["test"]["label"]).tolist() == [1000] * 10


def test_photo_patches_are_in_one_split_only():
    splits = photo_patches(patch_size=32)
    digests = {split: {hashlib.sha1(p.tobytes()).hexdigest() for p in patches} for split, patches in splits.items()}
    assert all(len(d) > 50 for d in digests.values())
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"] \
        and not digests["val"] & digests["test"]
    assert splits["test"].shape[1:] == (32, 32, 3) and splits["test"].dtype == np.uint8


@needs_fashion_mnist
def test_datamodule_batches(tmp_path):
    data = SubscaleDataModule(source={"kind": "fashion_mnist"}, image_size=28, channels=1, bits=5, high_bits=3,
                              subscale=4, batch_size=8, val_subset=20, cache_dir=str(tmp_path))
    data.prepare_data()
    data.setup("fit")
    assert len(data.splits["train"]) + len(data.splits["val"]) == 60000 and len(data.splits["test"]) == 10000
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "msb", "lsb"}
    for value in batch.values():
        assert value.shape == (8, 28, 28, 1) and value.dtype == torch.uint8
    assert batch["image"].max() < 32 and batch["msb"].max() < 8 and batch["lsb"].max() < 4
    assert torch.equal((batch["msb"] << 2) | batch["lsb"], batch["image"])
    first = [b["image"] for b in data.val_dataloader()]
    again = [b["image"] for b in data.val_dataloader()]
    assert sum(len(b) for b in first) == 20 and all(torch.equal(a, b) for a, b in zip(first, again))


def test_datamodule_rejects_bad_geometry():
    with pytest.raises(ValueError, match="not divisible by subscale=3"):
        SubscaleDataModule(source={"kind": "photos"}, image_size=32, channels=3, subscale=3)


def fake_idx(path: Path, count: int) -> None:
    header = np.array([0x803, count, 28, 28], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.full(count * 28 * 28, 7, np.uint8).tobytes())


def test_missing_fashion_mnist_is_installed_with_apt(tmp_path, monkeypatch):
    """A stand-in `apt-get` on PATH plays the Debian package: it must be asked for dataset-fashion-mnist."""
    target = tmp_path / "fashion-mnist"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(f"""#!{sys.executable}
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(ROOT)!r}]  # the tests and the project, installed or not
from test_data import fake_idx
from pathlib import Path
open({str(tmp_path / 'calls')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')
if sys.argv[1] == 'install':
    Path({str(target)!r}).mkdir(exist_ok=True)
    fake_idx(Path({str(target)!r}) / 'train-images-idx3-ubyte.gz', 3)
    fake_idx(Path({str(target)!r}) / 't10k-images-idx3-ubyte.gz', 2)
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(target))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    splits = sources.fashion_mnist(str(target))
    assert "install -y -q dataset-fashion-mnist" in (tmp_path / "calls").read_text()
    assert splits["train"]["image"].shape == (3, 28, 28, 1) and splits["test"]["image"].shape == (2, 28, 28, 1)


def test_fashion_mnist_without_package_or_hub_is_one_line(tmp_path):
    """No IDX files, no installing, no hub (tests run offline): one line naming both ways out."""
    config = tmp_path / "offline.yaml"
    config.write_text("data: {source: {kind: fashion_mnist, path: /nonexistent, install: false}, image_size: 28,"
                      f" cache_dir: {tmp_path / 'cache'}}}\nstages: {{}}\n")
    done = subprocess.run([sys.executable, "-m", "pipeline", "data", "--exp", str(config)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1",
                                                               "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in done.stderr
    assert "apt-get install dataset-fashion-mnist" in error[0] and "EXP=photos32" in error[0]


def image_folder(root: Path, n: int = 6, seed: int = 0) -> Path:
    folder = root / "images" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(random_images(n, 8, 8, seed=seed)):
        Image.fromarray(array).save(folder / f"{i}.png")
    return root / "images"


def test_editing_an_image_folder_prepares_the_cache_anew(tmp_path):
    source = {"kind": "imagefolder", "path": str(image_folder(tmp_path))}
    first = prepare(source, 3, (8, 8), val_size=0.2, cache_dir=tmp_path / "cache")
    assert prepare(source, 3, (8, 8), val_size=0.2, cache_dir=tmp_path / "cache") == first  # unchanged: reused
    edited = tmp_path / "images" / "train" / "0.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(edited)
    os.utime(edited, ns=(1, 1))  # even with an old modification time, the size changed
    second = prepare(source, 3, (8, 8), val_size=0.2, cache_dir=tmp_path / "cache")
    assert second != first
    images = np.concatenate([load(second)[s]["image"] for s in ("train", "val", "test")])
    assert any((image == 7).all() for image in images)


RACE = """
import sys
from data.sources import prepare
print(prepare({"kind": "imagefolder", "path": sys.argv[1]}, 3, (8, 8), val_size=0.2, cache_dir=sys.argv[2]))
"""


def test_two_processes_preparing_one_cache_both_succeed(tmp_path):
    folder = image_folder(tmp_path, n=200)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(folder), str(tmp_path / "cache")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-1000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    assert not list((tmp_path / "cache").glob("*.partial*"))
    assert len(load(paths.pop())["test"]) > 0


def parquet_shards(tmp_path, shards=4, per_shard=6) -> dict:
    files = {"train": [], "test": []}
    for split in files:
        for s in range(shards):
            arrays = random_images(per_shard, 8, 8, seed=100 * s + (split == "test"))
            ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays]},
                                            features=datasets.Features({"image": datasets.Image()}))
            path = tmp_path / f"{split}-{s}.parquet"
            ds.to_parquet(str(path))
            files[split].append(str(path))
    return files


def test_streaming_parquet_shards_split_across_processes(tmp_path):
    source = {"kind": "parquet", "data_files": parquet_shards(tmp_path), "streaming": True}
    seen = []
    for rank in range(2):
        data = SubscaleDataModule(source=source, image_size=8, channels=3, bits=8, high_bits=8, subscale=2,
                                  batch_size=4, val_subset=None)
        data.processes = lambda rank=rank: (rank, 2)
        images = [image for batch in data.val_dataloader() for image in batch["image"]]
        seen.append({image.numpy().tobytes() for image in images})
        assert len(next(iter(data.train_dataloader()))["image"]) == 4
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24  # the test split (no val): each image once
    assert data.splits is None  # nothing prepared on disk


def read_idx_whole(raw: bytes, folder):
    from data.sources import read_idx

    (folder / "whole.gz").write_bytes(gzip.compress(raw))
    return read_idx(folder / "whole.gz")


@pytest.mark.parametrize("cut", [10, 500])
def test_a_truncated_idx_file_is_one_line(tmp_path, cut):
    from data.sources import read_idx

    pixels = np.random.default_rng(0).integers(0, 256, 4 * 28 * 28, dtype=np.uint8)
    raw = np.array([0x803, 4, 28, 28], ">u4").tobytes() + pixels.tobytes()  # 4 images of 28 x 28
    assert read_idx_whole(raw, tmp_path).shape == (4, 28, 28)
    (tmp_path / "images-idx3-ubyte").write_bytes(raw[:cut])
    (tmp_path / "images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:cut])
    for name in ("images-idx3-ubyte", "images-idx3-ubyte.gz"):
        with pytest.raises(ValueError, match="not a whole IDX image file .*reinstall dataset-fashion-mnist"):
            read_idx(tmp_path / name)
