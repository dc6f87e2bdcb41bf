"""Writes tests/files/codec/: a small cascade's checkpoints, eight images and the file the codec made of
them on the machine that ran this, named in machine.json. tests/test_codec.py decodes (and encodes) it
on whatever machine runs the tests: a file must cross CPU kinds bit for bit, which one machine's kernel
levels can only approximate. Run it again (python tests/files/make_codec_file.py) when the file format's
VERSION changes, and commit what it writes.
"""
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]  # conftest's helpers, the project

from benchmarks.report import machine  # noqa: E402
from conftest import make_stages, save_cascade  # noqa: E402
from pipeline.codec.coder import VERSION, compress  # noqa: E402
from pipeline.inference.cascade import Cascade  # noqa: E402
from stages.plan import ORDER  # noqa: E402

# colour, 8 bits, S = 2 and a depth stage: every stage and both parts of a sub-pixel's value
GEOMETRY = dict(image_size=8, channels=3, bits=8, high_bits=5, subscale=2)


def main() -> None:
    out = HERE / "codec"
    save_cascade(make_stages(**GEOMETRY), out)
    cascade = Cascade.load(out, list(ORDER), device="cpu")
    drawn = cascade.sample(6, generator=torch.Generator().manual_seed(0))[0]  # images the model finds likely
    noise = torch.randint(0, 2**GEOMETRY["bits"], (2, 8, 8, 3), generator=torch.Generator().manual_seed(1))
    images = torch.cat([drawn.long(), noise])
    np.savez_compressed(out / "images.npz", images=images.numpy().astype(np.uint8))
    (out / "images.spn").write_bytes(compress(cascade, images))
    made_on = {**machine(), "kernels": torch.backends.cpu.get_cpu_capability(), "codec_version": VERSION,
               "date": date.today().isoformat(), "geometry": GEOMETRY}
    (out / "machine.json").write_text(json.dumps(made_on, indent=2) + "\n")
    print(f"wrote {out}: {made_on}")


if __name__ == "__main__":
    main()
