"""The emoji source: which code points are one emoji's variants, splits by base emoji, the real font."""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data import emoji
from data.emoji import base, split_of

ROOT = Path(__file__).resolve().parents[1]
HAVE_EMOJI = Path(emoji.NOTO_FONT).exists() and Path(emoji.EMOJI_TEST).exists()
needs_emoji = pytest.mark.skipif(not HAVE_EMOJI, reason="fonts-noto-color-emoji or unicode-data is not installed")

WOMAN_FARMER_DARK = (0x1F469, 0x1F3FF, 0x200D, 0x1F33E)
MAN_FARMER = (0x1F468, 0x200D, 0x1F33E)
FARMER = (0x1F9D1, 0x200D, 0x1F33E)


def test_variants_of_one_emoji_have_one_base_and_one_split():
    for variants in ((WOMAN_FARMER_DARK, MAN_FARMER, FARMER),
                     ((0x1F44D,), (0x1F44D, 0x1F3FB), (0x1F44D, 0x1F3FF)),  # thumbs up and its skin tones
                     ((0x1F9D1, 0x200D, 0x1F9B0), (0x1F469, 0x1F3FD, 0x200D, 0x1F9B0)),  # red hair
                     ((0x1F3C3,), (0x1F3C3, 0x200D, 0x2640, 0xFE0F), (0x1F3C3, 0x1F3FC, 0x200D, 0x2642, 0xFE0F))):
        assert len({base(v) for v in variants}) == 1
        assert len({split_of(v) for v in variants}) == 1
    assert base(WOMAN_FARMER_DARK) == (0x1F9D1, 0x1F33E)
    assert base((0x1F33E,)) != base(FARMER)  # the ear of rice itself is another emoji


def test_splits_are_shared_out_by_the_hash_and_stable():
    bases = [(0x1F300 + i,) for i in range(2000)]
    counts = {s: sum(split_of(b) == s for b in bases) for s in ("train", "val", "test")}
    assert 0.75 < counts["train"] / 2000 < 0.85 and 0.07 < counts["test"] / 2000 < 0.13
    # the same on every machine and every run: a hash, not a random draw
    assert [split_of(s) for s in ((0x1F600,), (0x1F44D,), (0x2764,), (0x1F1EB, 0x1F1F7))] == ["train", "train", "test", "val"]


@needs_emoji
def test_the_real_emoji_dataset():
    """Noto and OpenMoji at 16 x 16: every glyph's base emoji in one split only, labels are groups, and
    the images are emoji on white (corners white, centres not)."""
    data = emoji.emoji(16, ("noto", "openmoji"))
    names = emoji.group_names()
    assert len(names) == 9 and "Component" not in names and names[-1] == "Flags"
    splits_of_base = defaultdict(set)
    for split, columns in data.items():
        images, labels = columns["image"], columns["label"]
        assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8 and len(labels) == len(images)
        assert set(np.unique(labels)) == set(range(len(names)))  # every group in every split
        assert (images[:, 0, 0] > 240).mean() > 0.9  # white corners (flags and a few squares fill them)
        for key in columns["base"]:
            splits_of_base[key].add(split)
    assert 0.75 < len(data["train"]["image"]) / sum(len(c["image"]) for c in data.values()) < 0.9
    assert len(data["test"]["image"]) > 400
    assert all(len(s) == 1 for s in splits_of_base.values())  # no base emoji in two splits
    images = sum(len(c["image"]) for c in data.values())
    assert 1000 < len(splits_of_base) < images / 2  # variants and the two styles fold into fewer base emoji


def test_missing_packages_are_installed_with_apt(tmp_path, monkeypatch):
    """A stand-in `apt-get` on PATH: both Debian packages are asked for when both files are missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(f"#!{sys.executable}\nimport sys\nopen({str(tmp_path / 'calls')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(emoji, "NOTO_FONT", str(tmp_path / "none.ttf"))
    monkeypatch.setattr(emoji, "EMOJI_TEST", str(tmp_path / "none.txt"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(emoji.EmojiUnavailable, match="sudo apt-get install fonts-noto-color-emoji unicode-data"):
        emoji.ensure_installed()
    assert "install -y -q fonts-noto-color-emoji unicode-data" in (tmp_path / "calls").read_text()


def test_without_the_packages_the_data_command_is_one_line(tmp_path):
    import subprocess
    config = tmp_path / "emoji.yaml"
    config.write_text(f"data: {{source: {{kind: emoji, install: false}}, image_size: 16, channels: 3, "
                      f"cache_dir: {tmp_path / 'cache'}}}\nstages: {{}}\n")
    code = ("import sys; from data import emoji; emoji.NOTO_FONT = '/nonexistent.ttf'; "
            "from pipeline.__main__ import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "data", "--exp", str(config)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: the emoji dataset needs the Debian package")
    assert "Traceback" not in done.stderr and "fonts-noto-color-emoji" in done.stderr
