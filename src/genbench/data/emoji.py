"""``emoji``: the colour emoji of Google's Noto Color Emoji font, rendered into an unlabelled dataset.

A colour dataset that every Debian machine can install (``sudo apt-get install
fonts-noto-color-emoji``; ``scripts/setup_system.sh data`` does it) and that genbench renders
itself, so nothing is downloaded: 1643 distinct images of 3xSxS from Debian 12's font (version
2.042; S = 32 unless ``image_size`` says otherwise), 1393 train and 250 test, no labels.

What is in it, read from the font's own tables (fontTools; the font file is the only source):

- every code point of the font's character map (``cmap``) except those that are no emoji of their
  own: ASCII (``#``, ``*`` and the digits are in the font only as parts of keycaps and draw as plain
  black characters), the emoji components that only modify a neighbour (zero width joiner, the
  combining keycap, variation selectors, lone regional indicators, skin-tone modifiers, tag
  characters; Unicode TR51 sec. 1.4.1 and emoji-data.txt's ``Emoji_Component``), and private-use
  code points (the font maps a few flags and keycaps there as well: duplicates);
- the country flags, pairs of regional indicators (TR51 annex B), and the twelve keycaps
  (``#``/``*``/digit + U+20E3): the ligatures of the font's ``GSUB`` table made of those. A pair the
  font has no flag for draws a generic "?" flag, which is left out this way.

Left out on purpose: skin-tone modifier sequences (660 in Noto 2.042, five recolourings of each of
132 people and hands) and zero-width-joiner sequences (2,953, mostly gender, skin and hair variants
of those): near-duplicates that would make a third of the data repeats of a few shapes, and put
copies of test images into the training split. Renders that come out identical (a flag that two
regions share, such as Norway's for Svalbard) are kept once, the first in code point order.

Each emoji is drawn with Pillow at 109 px, the size of the font's one bitmap strike (136x128 pixel
PNGs in its ``CBDT`` table: FreeType scales no colour bitmaps, so no other size renders), with
libraqm shaping the ligatures, onto a transparent canvas; cropped to the glyph's own bounding box
(so that every emoji fills the frame), centred on a white square (the background emoji are drawn
for), and resized with Pillow's Lanczos filter, which widens its kernel when it shrinks (an
antialiasing prefilter; Lanczos rather than a box average keeps the black outlines sharp at 32x32).

Split: an emoji is a test image when the sha256 of its code points falls in the lowest 15% of the
hash range: 250 images (so that FD against the test split rests on a useful sample); each
split is ordered by the same hash. The split of an emoji depends on its code points alone, not on
what else the font holds, so a newer font moves no emoji between the splits; the hash order makes
"the first N" (``limit``) a spread of the whole set rather than the arrows and symbols that come
first in code point order.

The rendered array is kept in the dataset cache (genbench.data.cache) under a key over the font
file's path, size and mtime, Pillow's, FreeType's and libraqm's versions, ``RENDERER_VERSION`` and
the image size, so only the first load of a size renders (a couple of seconds); ``limit`` and
``shard`` are views of the cached array.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genbench.errors import GenbenchError
from genbench.limits import check_memory
from genbench.utils import default, exists

from . import cache
from .container import ImageDataset, shard_rows
from .idx import ENV_VAR

FONT_FILE = "NotoColorEmoji.ttf"
FONT_PACKAGE = "fonts-noto-color-emoji"
SYSTEM_FONT = Path("/usr/share/fonts/truetype/noto") / FONT_FILE  # where Debian's package puts it
STRIKE_PX = 109  # the font size of Noto Color Emoji's only bitmap strike (136x128 px glyphs)
EMOJI_DEFAULT_SIZE = 32
BACKGROUND = (255, 255, 255)  # emoji are designed for light backgrounds (the glyphs carry their own outlines)
TEST_PERCENT = 15
RENDERER_VERSION = 1  # bump when rendering changes what an emoji renders to: every cached entry is then stale
PROGRESS_DELAY_S = 1.0

# code points of the cmap that are no emoji of their own (see the module docstring)
_NOT_EMOJI = (
    (0x0000, 0x007F),  # ASCII: keycap bases, space, controls
    (0x200D, 0x200D),  # zero width joiner
    (0x20E3, 0x20E3),  # combining enclosing keycap
    (0xE000, 0xF8FF),  # private use
    (0xFE00, 0xFE0F),  # variation selectors
    (0x1F1E6, 0x1F1FF),  # regional indicators (a flag is a pair of them)
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers
    (0xE0000, 0xE007F),  # tags
    (0xF0000, 0x10FFFF),  # supplementary private use
)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
KEYCAP_BASES = frozenset(map(ord, "#*0123456789"))
KEYCAP = 0x20E3


def font_file(data_dir: str | os.PathLike | None = None) -> Path:
    """The emoji font to render: ``data_dir`` (the .ttf itself, or a folder holding NotoColorEmoji.ttf
    directly or in an ``emoji/`` subfolder) when given, and nothing else then; else such a folder at
    ``$GENBENCH_DATA``, when it holds the font; else Debian's ``/usr/share/fonts/truetype/noto``.
    ``$GENBENCH_DATA`` is shared by the datasets (it often holds only Fashion-MNIST), so unlike an
    explicit ``data_dir`` a ``$GENBENCH_DATA`` without the font falls back to the system's."""
    if exists(data_dir):
        given = Path(data_dir).expanduser()
        found = given if given.is_file() else _font_in(given)
        if not exists(found):
            raise GenbenchError(f"emoji: no {FONT_FILE} at {given} (data_dir): pass the font file or a folder "
                                f"holding it, or leave data_dir out to use the system font ({_install_hint()})")
        return found
    env = os.environ.get(ENV_VAR, "").strip()
    found = _font_in(Path(env).expanduser()) if env else None
    if exists(found):
        return found
    if SYSTEM_FONT.is_file():
        return SYSTEM_FONT
    looked = f"{SYSTEM_FONT.parent}" + (f" and ${ENV_VAR}={env}" if env else "")
    raise GenbenchError(f"emoji: the font {FONT_FILE} is not installed (looked in {looked}); {_install_hint()}, "
                        f"or pass --data-dir DIR holding {FONT_FILE}")


def _font_in(directory: Path) -> Path | None:
    for candidate in (directory / "emoji" / FONT_FILE, directory / FONT_FILE):
        if candidate.is_file():
            return candidate
    return None


def _install_hint() -> str:
    return (f"install the Debian package {FONT_PACKAGE} with 'sudo apt-get install {FONT_PACKAGE}' "
            "(scripts/setup_system.sh data installs it)")


def load_emoji(data_dir, image_size: int | None, limit: int | None, shard: tuple[int, int] | None = None,
               progress: bool = True) -> ImageDataset:
    """The emoji dataset (see the module docstring): from the cache when it holds this font at this
    size, else rendered into it first. Train images are the first rows of the cached array and test
    images the rest, so ``limit`` and ``shard`` are views of the mapping."""
    from PIL import features

    path = font_file(data_dir).resolve()
    if not features.check("raqm"):
        raise GenbenchError("emoji: this Pillow has no libraqm, which shapes the flags and keycaps from their "
                            "code points; install a Pillow wheel from PyPI (they include it)")
    size = default(image_size, EMOJI_DEFAULT_SIZE)
    request = {"image_size": size, "renderer": RENDERER_VERSION, "strike": STRIKE_PX,
               "freetype": features.version("freetype2"), "raqm": features.version("raqm")}
    try:
        st = path.stat()
    except OSError as e:
        raise GenbenchError(f"{path}: cannot read the emoji font: {e.strerror}") from None
    key = cache.content_key(request, [(str(path), st.st_size, st.st_mtime_ns)])
    entry = cache.entry_dir(path, request, kind="emoji")
    found = cache.read_entry_with_index(entry, key)
    if found is None:
        _render_into_cache(path, size, entry, key, progress)
        found = cache.read_entry_with_index(entry, key)
        if found is None:
            raise GenbenchError(f"{entry}: the dataset cache just written cannot be read back")
    pixels, index = found
    n_train = index.get("num_train")
    if not isinstance(n_train, int) or not 0 < n_train < len(pixels):
        raise GenbenchError(f"{entry / cache.INDEX_FILE}: num_train {n_train!r} does not split {len(pixels)} "
                            "images; delete the folder to render the emoji again")
    train, test = pixels[:n_train][:limit], pixels[n_train:][:limit]
    rows = shard_rows(len(train), shard)
    check_memory(float(train[rows].nbytes + test.nbytes), f"emoji dataset: {len(train) + len(test)} images of "
                 f"3x{size}x{size} uint8")
    return ImageDataset(
        name="emoji",
        train_pixels=torch.from_numpy(train[rows]),  # mapped, not read: pages come in as they are used
        test_pixels=torch.from_numpy(test),
        train_total=len(train) if exists(shard) else None,
    )


# ---------------------------------------------------------------------------------------------
# What the font holds


def _font_error(path: Path, e: BaseException) -> GenbenchError:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return GenbenchError(f"{path}: cannot read the emoji font ({detail}): the file is damaged or not Noto Color "
                         f"Emoji; reinstall it with 'sudo apt-get install --reinstall {FONT_PACKAGE}'")


def emoji_sequences(path: Path) -> list[str]:
    """The emoji the font at `path` has, as strings of code points: the single code points in code
    point order, then the flags and keycaps in code point order (see the module docstring)."""
    from fontTools.ttLib import TTFont

    try:
        # checkChecksums=2: reading a table whose bytes do not match the checksum the font's table
        # directory records raises, so a damaged file is refused, not rendered into a few odd emoji
        with TTFont(path, lazy=True, checkChecksums=2) as font:
            for tag in sorted(font.reader.tables):
                font.reader[tag]  # every table's bytes, checksum checked: 0.1 s for the 11 MB font
            if "CBDT" not in font:
                raise GenbenchError(f"{path}: not a colour bitmap emoji font (it has no CBDT table); expected "
                                    f"Noto Color Emoji ({FONT_PACKAGE})")
            cmap = font.getBestCmap() or {}
            ligatures = _ligatures(font["GSUB"].table) if "GSUB" in font else []
    except GenbenchError:
        raise
    except Exception as e:  # noqa: BLE001 - fontTools raises whatever its parser trips on (struct.error,
        raise _font_error(path, e) from None  # AssertionError, KeyError, TTLibError, ...) on a damaged file
    singles = [chr(c) for c in sorted(cmap) if not any(lo <= c <= hi for lo, hi in _NOT_EMOJI)]
    code_point = {glyph: c for c, glyph in sorted(cmap.items(), reverse=True)}  # the lowest one per glyph
    sequences = set()
    for glyphs in ligatures:
        points = [code_point.get(g) for g in glyphs]
        is_flag = len(points) == 2 and all(p in REGIONAL_INDICATORS for p in points)
        is_keycap = len(points) == 2 and points[0] in KEYCAP_BASES and points[1] == KEYCAP
        if is_flag or is_keycap:
            sequences.add("".join(map(chr, points)))
    return singles + sorted(sequences)


def _ligatures(gsub) -> list[list[str]]:
    """The glyph sequences of every ligature substitution (lookup type 4, or type 7 wrapping it)."""
    found = []
    for lookup in gsub.LookupList.Lookup if gsub.LookupList else []:
        for sub in lookup.SubTable:
            kind = sub.ExtensionLookupType if lookup.LookupType == 7 else lookup.LookupType
            if kind != 4:
                continue
            sub = sub.ExtSubTable if lookup.LookupType == 7 else sub
            found += [[first, *lig.Component] for first, ligs in sub.ligatures.items() for lig in ligs]
    return found


def code_points(sequence: str) -> str:
    """'1F1FA 1F1F8' for the US flag: how the index and the tests name an emoji."""
    return " ".join(f"{ord(c):04X}" for c in sequence)


def _split_hash(sequence: str) -> int:
    return int.from_bytes(hashlib.sha256(f"emoji {code_points(sequence)}".encode()).digest()[:8], "big")


def is_test(sequence: str) -> bool:
    """Whether the emoji belongs to the test split: by the hash of its code points alone."""
    return _split_hash(sequence) % 100 < TEST_PERCENT


# ---------------------------------------------------------------------------------------------
# Rendering


def render(font, sequence: str):
    """One emoji at the font's native size as an RGB PIL image: drawn on a transparent canvas,
    cropped to its own opaque pixels, centred on a white square; None when it draws nothing."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(sequence)
    canvas = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), sequence, font=font, embedded_color=True)
    box = canvas.getbbox()  # of the pixels with alpha > 0
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (*BACKGROUND, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB")


def render_all(path: Path, size: int, progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(the distinct emoji the font at `path` draws, their (N, 3, size, size) uint8 pixels), in
    ``emoji_sequences`` order; a render identical to an earlier one (at full size) is dropped."""
    from PIL import Image, ImageFont

    sequences = emoji_sequences(path)
    check_memory(float(len(sequences)) * 3 * size * size, f"emoji dataset: {len(sequences)} images of "
                 f"3x{size}x{size} uint8")
    try:
        font = ImageFont.truetype(str(path), STRIKE_PX, layout_engine=ImageFont.Layout.RAQM)
    except (OSError, ValueError) as e:
        raise _font_error(path, e) from None
    kept, pixels, seen = [], [], set()
    for sequence in tqdm(sequences, desc="rendering emoji", unit="img", disable=not progress, leave=False,
                         delay=PROGRESS_DELAY_S, dynamic_ncols=True):
        try:
            image = render(font, sequence)
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: raqm_layout() failed
            raise _font_error(path, e) from None
        if image is None:
            continue
        digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        kept.append(sequence)
        pixels.append(np.asarray(image.resize((size, size), Image.Resampling.LANCZOS)).transpose(2, 0, 1))
    return kept, np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.uint8)


def _render_into_cache(path: Path, size: int, entry: Path, key: str, progress: bool) -> None:
    """Render every emoji and write them to the cache entry: the train split first, then the test
    split, each ordered by its hash."""
    sequences, pixels = render_all(path, size, progress)
    order = sorted(range(len(sequences)), key=lambda i: (is_test(sequences[i]), _split_hash(sequences[i])))
    n_train = sum(not is_test(s) for s in sequences)
    if n_train == 0 or n_train == len(sequences):
        raise GenbenchError(f"{path}: only {len(sequences)} emoji render, too few for a train and a test split; "
                            f"expected Noto Color Emoji ({FONT_PACKAGE})")
    cache.write_entry(entry, key, (len(order), 3, size, size), np.uint8, (pixels[i] for i in order),
                      {"font": str(path), "image_size": size, "num_train": n_train,
                       "emoji": [code_points(sequences[i]) for i in order]})
