"""`make evaluate` and the stages' validation metric on cascades whose answer is known exactly,
and the refusal of a config that does not match the checkpoints."""
import json

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from conftest import make_stages, save_cascade, uniform
from data.transforms import split_depth, to_slices
from pipeline.__main__ import main as cli
from stages.plan import plan
from test_cascade import UNIFORM_GEOMETRIES, uniform_shares


def experiment_file(tmp_path, geometry, name="exp"):
    """A YAML experiment with this data geometry (photos source, unused when IMAGES= is given)."""
    config = {"data": {"source": {"kind": "photos"}, **geometry}, "stages": {}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def images_file(tmp_path, geometry, n=6):
    size, c, bits = geometry["image_size"], geometry["channels"], geometry["bits"]
    x = torch.randint(0, 2**bits, (n, size, size, c), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "images.npz"
    np.savez(path, images=(x << (8 - bits)).to(torch.uint8).numpy())  # 8-bit pixels of n-bit values
    return path


@pytest.mark.parametrize("geometry", UNIFORM_GEOMETRIES)
def test_evaluate_scores_a_uniform_cascade_at_exactly_n_bits_per_dim(tmp_path, geometry):
    save_cascade(uniform(make_stages(**geometry)), tmp_path / "run")
    code = cli(["evaluate", "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"),
                "--images", str(images_file(tmp_path, geometry))])
    assert code == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["bpd"] == pytest.approx(geometry["bits"], rel=1e-5)
    shares = {name: share for name, share in uniform_shares(geometry).items() if share}  # only stages that exist
    assert report["stages"] == pytest.approx(shares, rel=1e-5)
    nats = geometry["bits"] * geometry["image_size"] ** 2 * geometry["channels"] * np.log(2)
    assert np.allclose(report["nll"], nats, rtol=1e-5)
    value_bits = {"msb": geometry["high_bits"], "lsb": geometry["bits"] - geometry["high_bits"]}
    slices_of = {name: [row for row in report["slices"] if row["stage"] == name] for name in shares}
    for row in report["slices"]:  # uniform: every sub-pixel of a slice costs its part's bits exactly
        assert row["bits_per_subpixel"] == pytest.approx(value_bits[row["part"]], rel=1e-5), row
        assert row["bpd"] == pytest.approx(shares[row["stage"]] / len(slices_of[row["stage"]]), rel=1e-5), row


def test_evaluate_reports_each_slices_bits_which_sum_to_its_stages_share(tmp_path):
    """eval.json's slices are the cascade's order, each slice's exact share (its own NLL scored alone
    agrees), and they add up to their stage's share."""
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    stages = make_stages(**geometry)
    save_cascade(stages, tmp_path / "run")  # peaked, not uniform: the slices cost different bits
    images = images_file(tmp_path, geometry, n=5)
    assert cli(["evaluate", "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"),
                "--images", str(images), "--batch", "2", "--skip-compress"]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [(row["stage"], row["part"], row["k"]) for row in report["slices"]] == \
        [(step.stage, step.part, step.k) for step in plan(stages, 2)]
    for name, share in report["stages"].items():
        assert sum(row["bpd"] for row in report["slices"] if row["stage"] == name) == pytest.approx(share, rel=1e-6)
    x = torch.from_numpy(np.load(images)["images"]).long() >> 4  # the 4-bit values
    msb, lsb = split_depth(x, 4, 2)
    known = {"msb": to_slices(msb, 2), "lsb": to_slices(lsb, 2)}
    dims, subpixels = 8 * 8, 4 * 4
    bpd = [row["bpd"] for row in report["slices"]]
    assert max(bpd) > 1.05 * min(bpd)  # the slices differ, so a mix-up of slices shows
    for row in report["slices"]:
        stage = stages[row["stage"]].eval()
        with torch.no_grad():
            nats = float(stage.slice_nll(known, torch.full((5,), row["k"])).double().mean())
        assert row["bpd"] == pytest.approx(nats / dims / np.log(2), rel=1e-5), row
        assert row["bits_per_subpixel"] == pytest.approx(nats / subpixels / np.log(2), rel=1e-5), row


@pytest.mark.parametrize("geometry", UNIFORM_GEOMETRIES[1:])
def test_validation_bpd_of_a_uniform_stage_is_its_exact_share(geometry):
    size, c, bits, b = geometry["image_size"], geometry["channels"], geometry["bits"], geometry["high_bits"]
    x = torch.randint(0, 2**bits, (10, size, size, c))
    low = bits - b
    batches = [{"image": x[i:i + 4], "msb": x[i:i + 4] >> low, "lsb": x[i:i + 4] & ((1 << low) - 1)}
               for i in range(0, 10, 4)]  # batches of 4, 4 and 2: the mean is per image
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    for name, stage in uniform(make_stages(**geometry)).items():
        result = trainer.validate(stage, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
        assert result[0]["val/bpd"] == pytest.approx(uniform_shares(geometry)[name], rel=1e-5), name


def test_a_config_that_differs_from_the_checkpoints_is_refused(tmp_path, capsys):
    trained = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**trained), tmp_path / "run")
    edited = experiment_file(tmp_path, {**trained, "bits": 5, "high_bits": 3})
    for command in (["evaluate", "--images", str(images_file(tmp_path, trained))], ["sample", "--n", "2"]):
        code = cli([*command, "--exp", str(edited), "--run-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert "bits=5, high_bits=3" in err and "bits=4, high_bits=2" in err
        assert "put the config back" in err and "retrain" in err
    assert not (tmp_path / "run" / "eval.json").exists() and not (tmp_path / "run" / "samples").exists()


def test_evaluate_scores_in_full_float32_without_tf32(tmp_path, monkeypatch):
    """TF32 (or a lower internal precision) would change the exact figures on a GPU: the cascade commands
    turn it off, whatever the process had set."""
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert cli(["evaluate", "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"),
                    "--images", str(images_file(tmp_path, geometry))]) == 0
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(precision)


def test_evaluation_over_batches_is_the_sum_of_its_images_however_they_are_cut(tmp_path):
    """bits/dim and every stage's share from batches of 1, 3 (3 + 3 + 1) and 7 images are the same, and are
    the mean of the per-image NLL: a total that kept only some batches' nats would differ."""
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")  # peaked, not uniform: images score differently
    exp, images = str(experiment_file(tmp_path, geometry)), str(images_file(tmp_path, geometry, n=7))
    reports = []
    for batch in (1, 3, 7):
        assert cli(["evaluate", "--exp", exp, "--run-dir", str(tmp_path / "run"), "--images", images,
                    "--batch", str(batch), "--skip-compress"]) == 0
        reports.append(json.loads((tmp_path / "run" / "eval.json").read_text()))
    nll = np.array(reports[0]["nll"])
    assert nll.std() > 0.01 * nll.mean()  # the images' scores differ
    dims = 8 * 8 * 1
    for report in reports:
        assert report["n_images"] == 7 and report["nll"] == pytest.approx(reports[0]["nll"], rel=1e-6)
        assert report["bpd"] == pytest.approx(nll.mean() / dims / np.log(2), rel=1e-6)
        assert report["stages"] == pytest.approx(reports[0]["stages"], rel=1e-6)
        assert sum(report["stages"].values()) == pytest.approx(report["bpd"], rel=1e-9)


def test_evaluate_keeps_the_images_once_as_uint8(tmp_path, monkeypatch):
    """The images reach the codec as the one uint8 copy (an int64 copy beside it took 8 times their size)."""
    import pipeline.inference.evaluate

    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    given = []
    real = pipeline.inference.evaluate.compress
    monkeypatch.setattr(pipeline.inference.evaluate, "compress", lambda cascade, images, **kw: given.append(images) or
                        real(cascade, images, **kw))
    assert cli(["evaluate", "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"),
                "--images", str(images_file(tmp_path, geometry)), "--batch", "4"]) == 0
    assert given[0].dtype == torch.uint8 and given[0].shape == (6, 8, 8, 1)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["compressed_bpd"] > 0 and set(report["codecs"]) >= {"png", "png_mosaic"}


def test_evaluate_skip_codecs_leaves_out_only_the_ordinary_codecs(tmp_path):
    """--skip-codecs (the bench's every model but one: the same images) gives the same bits/dim and no
    PNG/WebP/JPEG-XL sizes."""
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    args = ["evaluate", "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"),
            "--images", str(images_file(tmp_path, geometry)), "--batch", "4", "--skip-compress"]
    reports = []
    for extra in ([], ["--skip-codecs"]):
        assert cli(args + extra) == 0
        reports.append(json.loads((tmp_path / "run" / "eval.json").read_text()))
    assert set(reports[0]["codecs"]) >= {"png", "webp", "png_mosaic"} and reports[1]["codecs"] == {}
    assert reports[1]["bpd"] == reports[0]["bpd"] and reports[1]["slices"] == reports[0]["slices"]
