"""The one image reader, wherever images enter: a source's cache, INPUT and IMAGES=."""
import io

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import make_stages, save_cascade
from data.images import ImageError, as_array, decode
from data.sources import prepare
from pipeline.__main__ import main as cli
from test_evaluate import experiment_file

RAMP16 = np.repeat(np.linspace(0, 65535, 8).astype(np.uint16)[None], 8, axis=0)  # 8 x 8, 0 .. 65535


def pixels(source, channels=1, background="white"):
    return as_array(decode(source, channels, background)[0])


def saved(image: Image.Image, fmt="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def sideways_jpeg() -> tuple[np.ndarray, bytes]:
    """An upright picture (dark top half, light bottom) stored rotated, with EXIF orientation 6."""
    upright = np.full((16, 8), 230, np.uint8)
    upright[:8] = 20
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return upright, saved(stored, "JPEG", quality=95, exif=exif.tobytes())


def drawing_on_transparency(mode: str) -> Image.Image:
    """A dark 2 x 2 square in the middle of a fully transparent 8 x 8 background."""
    if mode == "LA":
        array = np.zeros((8, 8, 2), np.uint8)
        array[3:5, 3:5] = (30, 255)
        return Image.fromarray(array, "LA")
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 30, 30, 30] + [0] * 762)
    image.paste(1, (3, 3, 5, 5))
    image.info["transparency"] = 0
    return image


def test_images_are_read_into_writable_arrays():  # torch.from_numpy warned users of make upscale otherwise
    assert as_array(Image.new("L", (3, 2))).flags.writeable
    assert as_array(Image.new("RGB", (3, 2))).flags.writeable


def test_16_bit_grey_is_scaled_not_clipped():
    assert pixels(saved(Image.fromarray(RAMP16)))[0, :, 0].tolist() == [0, 36, 73, 109, 146, 182, 219, 255]
    as_int32 = Image.fromarray(RAMP16.astype(np.int32))  # how many 16-bit files decode: mode I
    assert pixels(saved(as_int32, "TIFF"))[0, :, 0].tolist() == [0, 36, 73, 109, 146, 182, 219, 255]
    as_float = Image.fromarray(RAMP16.astype(np.float32) / 65535)  # a [0, 1] float image
    assert pixels(saved(as_float, "TIFF"))[0, :, 0].tolist() == [0, 36, 73, 109, 146, 182, 219, 255]


def test_exif_orientation_is_applied():
    upright, data = sideways_jpeg()
    got = pixels(data)[..., 0]
    assert got.shape == (16, 8) and np.abs(got.astype(int) - upright).max() < 12


@pytest.mark.parametrize("mode", ["P", "LA"])
def test_transparent_pixels_go_onto_the_background(mode):
    data = saved(drawing_on_transparency(mode))
    image, transparent = decode(data, 1)
    grey = as_array(image)[..., 0]
    assert transparent and grey[0, 0] == 255 and grey[3, 3] == 30  # white paper, dark drawing
    assert as_array(decode(data, 3, "black")[0])[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ImageError, match="transparent"):
        decode(data, 1, "refuse")


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_grey_palette_images_become_grey(fmt):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    data = saved(Image.fromarray(grey).convert("P"), fmt)
    got = pixels(data, channels=1)
    assert got.shape == (8, 8, 1) and np.abs(got[..., 0].astype(int) - grey).max() <= 4


def test_too_large_images_are_refused_as_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses above twice the limit
    with pytest.raises(ImageError, match="too large") as error:
        decode(saved(Image.new("L", (8, 8))), 1)
    assert error.value.reason == "too large"


def test_the_cache_reads_images_as_the_reader_does(tmp_path, caplog):
    train = tmp_path / "images" / "train"
    train.mkdir(parents=True)
    upright, jpeg = sideways_jpeg()
    (train / "ramp16.png").write_bytes(saved(Image.fromarray(RAMP16)))
    (train / "sideways.jpg").write_bytes(jpeg)
    (train / "drawing.png").write_bytes(saved(drawing_on_transparency("P")))
    (train / "empty.png").write_bytes(b"")
    (train / "truncated.png").write_bytes(saved(Image.fromarray(RAMP16))[:60])
    for i in range(3):
        (train / f"plain{i}.png").write_bytes(saved(Image.new("L", (8, 8), 100 + i)))
    with caplog.at_level("WARNING"):
        path = prepare({"kind": "imagefolder", "path": str(tmp_path / "images")}, channels=1, image_size=(8, 8),
                       val_size=0.34, cache_dir=tmp_path / "cache")
    splits = datasets.load_from_disk(str(path)).with_format("numpy")
    images = np.concatenate([splits[s]["image"] for s in ("train", "val", "test")])
    assert len(images) == 6
    assert "skipped 2 unusable images" in caplog.text and "2 unreadable" in caplog.text
    assert "1 images of" in caplog.text and "transparent pixels" in caplog.text
    rows = {tuple(image[0, :, 0]) for image in images}
    assert (0, 36, 73, 109, 146, 182, 219, 255) in rows  # the 16-bit ramp, scaled
    drawing = next(image for image in images if image[0, 0, 0] == 255 and image[3, 3, 0] < 100)
    assert drawing is not None
    turned = next(image[..., 0] for image in images if image[..., 0].std() > 50 and image[0, 0, 0] < 128
                  and image[7, 0, 0] > 128)  # resized 16 x 8 -> 8 x 8 after a centre crop: dark top, light bottom
    assert turned[0].max() < 128


def test_inputs_of_deepen_are_read_by_the_same_reader(tmp_path):
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    exp = experiment_file(tmp_path, geometry)
    inputs = {"ramp16.png": saved(Image.fromarray(RAMP16)),
              "palette.png": saved(Image.fromarray(np.full((8, 8), 200, np.uint8)).convert("P")),
              "grey.gif": saved(Image.fromarray(np.full((8, 8), 200, np.uint8)), "GIF")}
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        code = cli(["deepen", "--exp", str(exp), "--run-dir", str(tmp_path / "run"), "--input",
                    str(tmp_path / name), "--n", "2"])
        assert code == 0, name
        kept = np.load(tmp_path / "run" / "deepen" / "samples.npz")["images"][..., 0] >> 6
        expected = [0, 0, 1, 1, 2, 2, 3, 3] if name == "ramp16.png" else [3] * 8  # 200 >> 6 == 3
        assert (kept[:, 0] == expected).all(), name


def test_an_empty_or_missing_input_is_a_clear_error(tmp_path):
    from pipeline.io import read_images

    with pytest.raises(ValueError, match="no input given"):  # `make upscale` without INPUT: not the cwd
        read_images("", 1)
    with pytest.raises(FileNotFoundError, match="a folder of images, or an .npz"):
        read_images(tmp_path / "nope", 1)


def several_frames(fmt: str, count: int) -> bytes:
    """An animation or a multi-page file of `count` different 8 x 8 grey frames."""
    frames = [Image.fromarray(np.full((8, 8), 10 + 100 * i, np.uint8)).convert("RGB" if fmt == "MPO" else "L")
              for i in range(count)]
    return saved(frames[0], fmt, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("fmt, count", [("GIF", 3), ("TIFF", 2), ("PNG", 3), ("WEBP", 3)])
def test_a_file_of_several_frames_is_refused_naming_the_count(fmt, count):
    with pytest.raises(ImageError, match=f"it has {count} frames") as error:
        decode(several_frames(fmt, count), 1)
    assert error.value.reason == "multi-frame"


def test_a_cameras_mpo_photograph_is_its_first_frame():
    assert pixels(several_frames("MPO", 2))[..., 0].mean() == pytest.approx(10, abs=2)


@pytest.mark.parametrize("command", ["compress", "evaluate", "upscale"])
def test_commands_refuse_a_multi_frame_input_in_one_line(tmp_path, capsys, command):
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "plain.png").write_bytes(saved(Image.new("L", (8, 8), 100)))
    (folder / "moving.gif").write_bytes(several_frames("GIF", 3))
    given = {"compress": ["--input", str(folder), "--out", str(tmp_path / "x.spn")],
             "evaluate": ["--images", str(folder)], "upscale": ["--input", str(folder / "moving.gif")]}[command]
    code = cli([command, "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"), *given])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot use {folder / 'moving.gif'}: it has 3 frames") and "one image per file" in err
    assert not (tmp_path / "x.spn").exists() and not (tmp_path / "run" / "eval.json").exists()


def test_a_source_skips_and_counts_multi_frame_files(tmp_path, caplog):
    train = tmp_path / "images" / "train"
    train.mkdir(parents=True)
    for i in range(6):
        (train / f"plain{i}.png").write_bytes(saved(Image.new("L", (8, 8), 100 + i)))
    (train / "moving.gif").write_bytes(several_frames("GIF", 3))
    with caplog.at_level("WARNING"):
        path = prepare({"kind": "imagefolder", "path": str(tmp_path / "images")}, channels=1, image_size=(8, 8),
                       val_size=0.34, cache_dir=tmp_path / "cache")
    splits = datasets.load_from_disk(str(path))
    assert sum(len(splits[s]) for s in ("train", "val", "test")) == 6
    assert "skipped 1 unusable images" in caplog.text and "1 multi-frame" in caplog.text


def broken_npz(path, kind: str) -> None:
    """An .npz that numpy cannot read as arrays: cut short, empty, another file, pickled objects, an .npy."""
    whole = io.BytesIO()
    np.savez_compressed(whole, images=np.zeros((50, 8, 8, 1), np.uint8))
    if kind == "pickled":
        np.savez(path, images=np.array([{"pixels": 1}, None], dtype=object))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 8, 8, 1), np.uint8))
    else:
        path.write_bytes({"cut": whole.getvalue()[:len(whole.getvalue()) // 2], "empty": b"",
                          "text": b"name,value\nx,1\n", "pk text": b"PKG-INFO\nName: x\n"}[kind])


@pytest.mark.parametrize("kind", ["cut", "empty", "text", "pk text", "pickled", "npy"])
def test_an_npz_that_is_not_whole_is_one_line(tmp_path, capsys, kind):
    geometry = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    broken_npz(tmp_path / "images.npz", kind)
    code = cli(["evaluate", "--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run"),
                "--images", str(tmp_path / "images.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot read {tmp_path / 'images.npz'}: ") and "numpy.savez" in err
    assert ("does not begin as a zip archive" in err) == (kind in ("text", "pk text"))  # not numpy's "pickled data"
    assert not (tmp_path / "run" / "eval.json").exists()
