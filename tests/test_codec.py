"""The cascade as a lossless codec: bit-for-bit round trips, sizes that match the model's
-log2 p(x), independence of the caller's threads, and damaged or foreign files refused."""
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_stages, save_cascade
from pipeline.__main__ import main as cli
from pipeline.inference.cascade import Cascade
from pipeline.codec.coder import VERSION, CodecError, compress, decompress, read_header
from pipeline.io import save_npz
from pipeline.inference.pictures import to_8bit
from test_evaluate import experiment_file

pytestmark = pytest.mark.float_paths  # CI runs these under other CPU kernels too (.ci/run)

GEOMETRIES = [dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2),   # smoke: all three stages
              dict(image_size=4, channels=3, bits=8, high_bits=5, subscale=2),   # colour with a depth stage
              dict(image_size=4, channels=3, bits=6, high_bits=6, subscale=2)]   # colour without one


def model_bits(cascade, images):
    return -float(sum(cascade.log_prob(images).values()).double().sum()) / math.log(2)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_round_trip_is_bit_for_bit(geometry):
    cascade = Cascade(make_stages(**geometry))
    size, c, bits = geometry["image_size"], geometry["channels"], geometry["bits"]
    drawn = cascade.sample(20, generator=torch.Generator().manual_seed(0))[0]  # images the model finds likely
    noise = torch.randint(0, 2**bits, (5, size, size, c))  # and ones it does not
    for images in (drawn, noise, drawn[:1]):
        data = compress(cascade, images)
        back, names = decompress(cascade, data)
        assert torch.equal(back, images.long()) and names == []


def test_real_images_round_trip_and_cost_their_likelihood():
    from data.sources import photo_patches

    patches = photo_patches(patch_size=4)["test"][:40]  # real photographs, 4 x 4 RGB patches
    geometry = GEOMETRIES[1]
    stages = make_stages(**geometry)
    for stage in stages.values():  # a model as unsure as a trained one: no probability below the coder's 2^-24
        with torch.no_grad():
            stage.decoder.head.weight.div_(40)
    cascade = Cascade(stages)
    images = torch.from_numpy(patches).long()
    data = compress(cascade, images, names=[f"p{i}" for i in range(40)])
    back, names = decompress(cascade, data)
    assert torch.equal(back, images) and names == [f"p{i}" for i in range(40)]
    header = read_header(data)["start"] + 4  # fixed header and the CRC
    streams = 8 * (len(data) - header)
    assert streams == pytest.approx(model_bits(cascade, images), rel=0.01)


def test_the_file_does_not_depend_on_how_many_processes_code_it():
    cascade = Cascade(make_stages(**GEOMETRIES[0]))
    images = cascade.sample(40, generator=torch.Generator().manual_seed(2))[0]  # 3 chunks
    files = {workers: compress(cascade, images, workers=workers) for workers in (1, 2, 3)}
    assert files[1] == files[2] == files[3]
    for workers in (1, 3):  # and decodes in any split
        assert torch.equal(decompress(cascade, files[1], workers=workers)[0], images)


def test_the_callers_threads_do_not_matter():
    cascade = Cascade(make_stages(**GEOMETRIES[0]))
    images = cascade.sample(18, generator=torch.Generator().manual_seed(2))[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        data = compress(cascade, images)
        torch.set_num_threads(1)
        cascade.log_prob(images[:3])  # other work in between, at another batch size
        back, _ = decompress(cascade, data)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(back, images.long())


def damaged(data: bytes):
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    version = bytearray(data[:-4])
    version[4] = VERSION + 1
    version += struct.pack("<I", zlib.crc32(bytes(version)))
    return {"truncated": (data[: len(data) - 7], "damaged or truncated"),
            "cut inside the header": (data[:10], "damaged or truncated"),
            "flipped byte": (bytes(flipped), "damaged or truncated"),
            "unknown version": (bytes(version), f"format version {VERSION + 1}"),
            "not ours": (b"\x89PNG\r\n" + data[6:], "not a compressed image file")}


def test_bad_files_are_refused():
    cascade = Cascade(make_stages(**GEOMETRIES[0]))
    images = cascade.sample(4, generator=torch.Generator().manual_seed(3))[0]
    data = compress(cascade, images)
    for what, (bad, message) in damaged(data).items():
        with pytest.raises(CodecError, match=message):
            decompress(cascade, bad)
    other = Cascade(make_stages(**GEOMETRIES[0], seed=9))  # same geometry, other weights
    with pytest.raises(CodecError, match="another model"):
        decompress(other, data)


def test_compress_and_decompress_commands(tmp_path, capsys):
    from PIL import Image

    geometry = GEOMETRIES[0]
    save_cascade(make_stages(**geometry), tmp_path / "run")
    exp = str(experiment_file(tmp_path, geometry))
    folder = tmp_path / "mine"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 16, (3, 8, 8), dtype=np.uint8) << 4  # 4-bit values as 8-bit
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"photo{i}.png")
    run = ["--exp", exp, "--run-dir", str(tmp_path / "run")]
    assert cli(["compress", *run, "--input", str(folder), "--out", str(tmp_path / "mine.spn")]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert cli(["decompress", *run, "--input", str(tmp_path / "mine.spn"), "--out", str(tmp_path / "back")]) == 0
    for i, image in enumerate(pixels):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "back" / f"photo{i}.png")), image)
    assert cli(["decompress", *run, "--input", str(tmp_path / "mine.spn"), "--out", str(tmp_path / "b.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "b.npz")["images"][..., 0], pixels)

    data = (tmp_path / "mine.spn").read_bytes()
    capsys.readouterr()
    for what, (bad, message) in damaged(data).items():
        (tmp_path / "bad.spn").write_bytes(bad)
        code = cli(["decompress", *run, "--input", str(tmp_path / "bad.spn"), "--out", str(tmp_path / what)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, what
        assert not (tmp_path / what).exists()  # nothing written
    save_cascade(make_stages(**geometry, seed=5), tmp_path / "other")
    code = cli(["decompress", "--exp", exp, "--run-dir", str(tmp_path / "other"), "--input",
                str(tmp_path / "mine.spn"), "--out", str(tmp_path / "x")])
    assert code == 2 and "another model" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_names_in_a_file_are_plain_file_names(monkeypatch):
    """A name stored in a file becomes a file name: a crafted `../x` is refused, never written outside OUT."""
    import pipeline.codec.coder as codec

    cascade = Cascade(make_stages(**GEOMETRIES[0]))
    images = cascade.sample(2, generator=torch.Generator().manual_seed(4))[0]
    for bad in ("../b", "a\0b", "x" * 251):  # a path, a NUL, longer than a file name may be
        with pytest.raises(ValueError, match="plain file name"):
            compress(cascade, images, names=["a", bad])
    monkeypatch.setattr(codec, "valid_names", lambda names: True)  # a file made elsewhere, with a valid CRC
    crafted = compress(cascade, images, names=["a", "../b"])
    monkeypatch.undo()
    with pytest.raises(CodecError, match="names are invalid"):
        decompress(cascade, crafted)


def test_neither_command_overwrites_and_both_want_input(tmp_path, capsys):
    geometry = GEOMETRIES[0]
    save_cascade(make_stages(**geometry), tmp_path / "run")
    run = ["--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run")]
    cascade = Cascade.load(tmp_path / "run", ["first_slice", "size_spn", "depth_spn"], device="cpu")
    (tmp_path / "x.spn").write_bytes(compress(cascade, cascade.sample(2, generator=torch.Generator())[0]))
    save_npz(tmp_path / "in.npz", images=to_8bit(cascade.sample(2, generator=torch.Generator())[0], 8).numpy())
    for existing in ("old.npz", "old.txt", "old.png"):
        (tmp_path / existing).write_bytes(b"keep me")
        code = cli(["decompress", *run, "--input", str(tmp_path / "x.spn"), "--out", str(tmp_path / existing)])
        assert code == 2 and "exists" in capsys.readouterr().err
        code = cli(["compress", *run, "--input", str(tmp_path / "in.npz"), "--out", str(tmp_path / existing)])
        assert code == 2 and "exists" in capsys.readouterr().err
        assert (tmp_path / existing).read_bytes() == b"keep me"
    for command in ("compress", "decompress"):  # INPUT is asked for first
        code = cli([command, *run, "--input", "", "--out", ""])
        assert code == 2 and "no input given" in capsys.readouterr().err
    code = cli(["decompress", *run, "--input", str(tmp_path), "--out", str(tmp_path / "new.npz")])
    assert code == 2 and f"{tmp_path} is a folder: give INPUT=<a file written by make compress>" in capsys.readouterr().err
    for command in ("upscale", "deepen"):  # the samplers that start from an image: INPUT= unset, not "."
        code = cli([command, *run, "--input", " "])
        assert code == 2 and "no input given: INPUT=<an image file>" in capsys.readouterr().err
        code = cli([command, *run, "--input", str(tmp_path)])  # a folder, where one image is wanted
        assert code == 2 and f"{tmp_path} is a folder: give the path of one image file in it" in capsys.readouterr().err


def peaked_cascade():
    """8 x 8 colour at 8 bits, b = n, with peaked outputs (make_stages): far from uniform, unlike the
    coder's own floor, so a probability path that feeds the wrong value forward costs many bits. The head's
    rows are random (ordinal_init false): rows smooth in the value spread each sub-pixel's mass over
    neighbouring values, about 3 bits per sub-pixel instead of under 1.6."""
    return Cascade(make_stages(image_size=8, channels=3, bits=8, high_bits=8, subscale=2, ordinal_init=False))


def test_the_file_costs_its_likelihood_on_a_peaked_model():
    cascade = peaked_cascade()
    images = cascade.sample(32, generator=torch.Generator().manual_seed(0))[0]  # 2 chunks
    data = compress(cascade, images)
    assert compress(cascade, images.to(torch.uint8)) == data  # 8-bit values as uint8, as make evaluate gives them
    header = read_header(data)
    streams = 8 * (len(data) - header["start"] - 4)
    bits = model_bits(cascade, images)
    assert bits < 0.2 * images.numel() * 8  # far from uniform's 8 bits per sub-pixel
    flush = 64 * len(header["counts"])  # the range coder ends each chunk's stream with at most two words
    assert abs(streams - bits) <= 0.01 * bits + flush, (streams, bits)


def test_a_decode_that_goes_astray_stops_at_its_first_chunk(monkeypatch):
    import pipeline.codec.coder as codec
    from stages import canonical

    cascade = peaked_cascade()
    images = cascade.sample(40, generator=torch.Generator().manual_seed(1))[0]  # 3 chunks
    data = compress(cascade, images)
    stored = read_header(data)["probe"]
    chunks = []
    code_chunk = codec.code_chunk
    monkeypatch.setattr(codec, "code_chunk", lambda *args, **kw: chunks.append(1) or code_chunk(*args, **kw))
    monkeypatch.setattr(codec, "probe", lambda cascade: stored)  # a machine whose probe agrees ...
    step = canonical.Decoder.step
    monkeypatch.setattr(canonical.Decoder, "step", lambda self, previous, t: step(self, previous, t).flip(-1))
    with pytest.raises(CodecError, match="decoded differently|does not decode"):  # ... and whose steps do not
        decompress(cascade, data, workers=1)
    assert len(chunks) == 1


def test_a_machine_whose_arithmetic_differs_is_refused_before_any_work(monkeypatch):
    import pipeline.codec.coder as codec

    cascade = Cascade(make_stages(**GEOMETRIES[0]))
    images = cascade.sample(4, generator=torch.Generator().manual_seed(3))[0]
    data = bytearray(compress(cascade, images)[:-4])
    start = codec.HEAD.size + 32  # the probe digest follows the model digest
    data[start:start + 8] = bytes(8)
    data = bytes(data) + struct.pack("<I", zlib.crc32(bytes(data)))
    monkeypatch.setattr(codec, "code_chunk", lambda *args, **kw: pytest.fail("decoding started"))
    with pytest.raises(CodecError, match="computes the codec's probabilities differently.*nothing was decoded"):
        decompress(cascade, data)


def test_a_file_decodes_bit_for_bit_under_other_cpu_kernels(tmp_path):
    """Compress under torch's and MKL's kernels for CPUs without AVX (and the pinned module built without
    vector flags), decompress under AVX2's (another build of it): the same images, bit for bit."""
    import os
    import subprocess
    import sys

    geometry = dict(image_size=8, channels=3, bits=8, high_bits=8, subscale=2)
    save_cascade(make_stages(**geometry), tmp_path / "run")
    exp = str(experiment_file(tmp_path, geometry))
    cascade = Cascade.load(tmp_path / "run", ["first_slice", "size_spn"], device="cpu")
    pixels = to_8bit(cascade.sample(20, generator=torch.Generator().manual_seed(5))[0], 8).numpy()
    save_npz(tmp_path / "in.npz", images=pixels)
    levels = ["default", "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "default"]
    root = Path(__file__).resolve().parents[1]
    for level, command, source, out in ((levels[0], "compress", "in.npz", "x.spn"),
                                        (levels[1], "decompress", "x.spn", "back.npz")):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2" if level == "default"
               else "AVX2", "WANDB_MODE": "disabled"}
        done = subprocess.run([sys.executable, "-m", "pipeline", command, "--exp", exp, "--run-dir",
                               str(tmp_path / "run"), "--input", str(tmp_path / source), "--out", str(tmp_path / out)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "back.npz")["images"], pixels)


def test_a_file_made_on_another_machine_decodes_and_encodes_bit_for_bit():
    """tests/files/codec/images.spn was made on the machine its machine.json names (an Intel Xeon, AVX-512
    kernels; the project's figures come from an AMD EPYC): whichever CPU runs this, the file decodes to the
    same images, and the same images encode to the same bytes (tests/files/make_codec_file.py wrote them).
    Seen to fail, refusing the file, with one constant of the pinned exp changed in its 8th digit."""
    import json

    folder = Path(__file__).resolve().parent / "files" / "codec"
    made = json.loads((folder / "machine.json").read_text())
    assert made["codec_version"] == VERSION, "the file format changed: python tests/files/make_codec_file.py"
    cascade = Cascade.load(folder, ["first_slice", "size_spn", "depth_spn"], device="cpu")
    images = torch.from_numpy(np.load(folder / "images.npz")["images"]).long()
    data = (folder / "images.spn").read_bytes()
    back, names = decompress(cascade, data)
    assert torch.equal(back, images) and names == []
    assert compress(cascade, images) == data


def test_the_pinned_exp_and_erf_are_accurate():
    """stages/canonical.cpp computes exp and erf itself (libm's differ between versions)."""
    from stages import canonical

    points = np.concatenate([np.linspace(-700, 700, 2001), np.linspace(-6, 6, 2001), [0.0, -0.0, 1e-300]])
    values = np.array(canonical.load().elementary(points.tolist()))
    exp, erf = values[:len(points)], values[len(points):]
    assert np.allclose(exp, np.exp(points), rtol=4e-16, atol=0)
    assert np.abs(erf - np.array([math.erf(x) for x in points])).max() < 1.5e-7


def test_without_a_compiler_the_codec_says_so_and_evaluate_leaves_out_the_file(tmp_path, capsys, monkeypatch):
    import json

    from stages import canonical

    def unavailable():
        raise canonical.CanonicalUnavailable("the codec needs its C++ module: install a C++ compiler")

    monkeypatch.setattr(canonical, "load", unavailable)
    geometry = GEOMETRIES[0]
    save_cascade(make_stages(**geometry), tmp_path / "run")
    run = ["--exp", str(experiment_file(tmp_path, geometry)), "--run-dir", str(tmp_path / "run")]
    save_npz(tmp_path / "in.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    code = cli(["compress", *run, "--input", str(tmp_path / "in.npz"), "--out", str(tmp_path / "x.spn")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "C++ compiler" in err[-1]
    assert not (tmp_path / "x.spn").exists()
    assert cli(["evaluate", *run, "--images", str(tmp_path / "in.npz")]) == 0
    assert "real compressed size is left out" in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["compressed_bpd"] is None and report["bpd"] > 0
