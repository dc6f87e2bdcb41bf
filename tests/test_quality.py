"""FID and KID validated before they are trusted: in the project's own feature networks, real test
images are close to real training images, and farther the more they are corrupted (noise, blur,
shuffled slices). The feature network file: named by its hash, refused when it does not match."""
from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data import emoji
from data.sources import FASHION_MNIST_DIR, fashion_mnist, image_features
from data.transforms import from_slices, to_slices
from pipeline.inference import features
from pipeline.inference.quality import fid_kid

HAVE_FASHION_MNIST = Path(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz").exists()
HAVE_EMOJI = Path(emoji.NOTO_FONT).exists() and Path(emoji.EMOJI_TEST).exists()
N = 500  # images on each side


def as_split(columns: dict) -> datasets.Dataset:
    images = columns["image"]
    columns = {"image": images, "label": columns["label"]}  # not the emoji's base
    return datasets.Dataset.from_dict(columns, features=image_features(*images.shape[1:], labels=True))


@pytest.fixture(scope="module", params=["fashion_mnist", "emoji"])
def trained(request):
    """(feature network, train images, test images) of a real dataset at its bits, images (N, C, H, W)."""
    rng = np.random.default_rng(0)
    if request.param == "fashion_mnist":
        if not HAVE_FASHION_MNIST:
            pytest.skip("Fashion-MNIST is not installed")
        data, bits = fashion_mnist(), 8
        pick = {split: rng.permutation(len(c["image"]))[:20000] for split, c in data.items()}
        data = {split: {key: value[pick[split]] for key, value in c.items()} for split, c in data.items()}
    else:
        if not HAVE_EMOJI:
            pytest.skip("the emoji packages are not installed")
        data, bits = emoji.emoji(32, ("noto", "openmoji")), 5
    net = features.train_network(as_split(data["train"]), bits, steps=600, log=lambda line: None)
    test = features.as_shown(data["test"]["image"][rng.permutation(len(data["test"]["image"]))[:N]], bits)
    # two disjoint sets of training images, the yardstick of "small": for the emoji, of different base
    # emoji (as train and test are), else FID would measure near-copies
    train = data["train"]["image"]
    if "base" in data["train"]:
        side = np.array([hash_parity(key) for key in data["train"]["base"]])
    else:
        side = rng.permutation(len(train)) % 2
    halves = [features.as_shown(train[side == k][rng.permutation(int((side == k).sum()))[:N]], bits) for k in (0, 1)]
    return net, halves[0], halves[1], test, "base" in data["train"]


def hash_parity(key: str) -> int:
    import hashlib
    return hashlib.sha256(key.encode()).digest()[0] % 2


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    rng = torch.Generator().manual_seed(1)
    return (images.float() + sigma * torch.randn(images.shape, generator=rng)).round().clamp(0, 255).to(torch.uint8)


def blurred(images: torch.Tensor, radius: float) -> torch.Tensor:
    out = []
    for im in images.permute(0, 2, 3, 1).numpy():
        picture = Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).filter(ImageFilter.GaussianBlur(radius))
        out.append(np.asarray(picture).reshape(im.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def shuffled_slices(images: torch.Tensor, swaps: int, subscale: int = 4) -> torch.Tensor:
    """Each image's S*S slices with `swaps` random pairs of them exchanged (pixels moved up to S-1)."""
    slices = to_slices(images.permute(0, 2, 3, 1), subscale).clone()  # (N, S*S, h, w, C)
    rng = np.random.default_rng(2)
    for i in range(len(slices)):
        for _ in range(swaps):
            a, b = rng.choice(subscale**2, 2, replace=False)
            slices[i, [a, b]] = slices[i, [b, a]]
    return from_slices(slices, subscale).permute(0, 3, 1, 2).contiguous()


CORRUPTIONS = {"noise": (noisy, (8, 16, 32, 64)), "blur": (blurred, (0.5, 1.0, 2.0, 3.0)),
               "shuffled slices": (shuffled_slices, (1, 2, 4, 8))}


@pytest.mark.slow
def test_test_images_are_close_to_training_images(trained):
    """FID and KID of N test against N training images are smaller than those of the mildest
    corruption; for Fashion-MNIST, FID is also about that of two disjoint sets of N training images
    (the figure's own noise at this size). The emoji's test split holds other emoji than training,
    which the feature network (trained on the training emoji) tells apart: there it is larger."""
    net, train, other_train, test, distinct_emoji = trained
    between = fid_kid(net, train, test)
    halves = fid_kid(net, train, other_train)
    if not distinct_emoji:  # the emoji's test split holds other emoji than training: farther than noise
        assert between["fid"] < 1.5 * halves["fid"] + 1e-3
    for corrupt, levels in CORRUPTIONS.values():
        mildest = fid_kid(net, train, corrupt(test, levels[0]))
        assert between["fid"] < mildest["fid"] and between["kid"] < mildest["kid"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_fid_and_kid_grow_with_the_corruption(trained, kind):
    net, train, _, test, _ = trained
    corrupt, levels = CORRUPTIONS[kind]
    scores = [fid_kid(net, train, corrupt(test, level)) for level in levels]
    fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
    assert fids == sorted(fids) and len(set(fids)) == len(fids), (kind, fids)
    assert kids == sorted(kids), (kind, kids)


def test_fid_of_identical_sets_is_zero_and_sides_are_checked():
    net = features.FeatureNetwork(1, 10, "labels").eval()
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    assert fid_kid(net, images, images)["fid"] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_kid(net, images, images[:1])


def small_split(n=64, labels=True, channels=1):
    rng = np.random.default_rng(0)
    columns = {"image": rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8)}
    if labels:
        columns["label"] = rng.integers(0, 3, n)
        return as_split(columns)
    return datasets.Dataset.from_dict(columns, features=image_features(8, 8, channels))


def test_feature_network_file_is_named_by_its_hash_and_checked(tmp_path):
    splits = {"train": small_split(), "test": small_split()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "STEPS", 20)
        net, record = features.feature_network(tmp_path, splits, "data-a", 8, log=lambda line: None)
    files = list(tmp_path.glob("features-*.pt"))
    assert [f.name for f in files] == [f"features-{record['name']}.pt"] and net.name == record["name"]
    again, _ = features.feature_network(tmp_path, splits, "data-a", 8, log=lambda line: None)  # loaded, not trained
    assert again.name == net.name and len(list(tmp_path.glob("features-*.pt"))) == 1
    # tampered weights: refused in one line
    saved_record = torch.load(files[0], weights_only=True)
    saved_record["state_dict"]["head.bias"] += 1
    torch.save(saved_record, files[0])
    with pytest.raises(ValueError, match="do not hash to its name"):
        features.load(files[0])


def test_unlabelled_data_learns_rotations():
    """No labels: the network learns which way up an image is (here: bright top, dark bottom, noise)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(255, 0, 8)[None, :, None, None]
    images = (ramp * 0.7 + rng.integers(0, 60, (256, 8, 8, 1))).clip(0, 255).astype(np.uint8)
    split = datasets.Dataset.from_dict({"image": images}, features=image_features(8, 8, 1))
    net = features.train_network(split, 8, steps=150, log=lambda line: None)
    assert net.task == "rotation" and net.classes == 4
    assert features.accuracy(net, split, 8) > 0.9


def test_inception_features_without_weights_or_package_are_one_line(tmp_path):
    images = torch.zeros((4, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="no such file.*never downloaded"):
        fid_kid(str(tmp_path / "none.pth"), images, images)
    with pytest.raises(ValueError, match=f"INCEPTION={tmp_path}: a folder; give the path of"):
        fid_kid(str(tmp_path), images, images)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not weights")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install torch-fidelity"):
            fid_kid(str(weights), images, images)
    else:
        with pytest.raises(ValueError, match="is not torch-fidelity's Inception-v3 weights"):
            fid_kid(str(weights), images, images)
