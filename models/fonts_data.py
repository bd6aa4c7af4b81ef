"""The 62-class glyph data set (0-9, A-Z, a-z) behind models/fonts62/, split by typeface.

Why: the digits demo is saturated (99.8 %) and has only 10 classes, so it cannot show whether a change helps
or how cost grows with the number of classes. Glyphs rendered from Debian's font packages install offline,
cover serif, sans, mono, handwriting and script faces, and split cleanly *by typeface*: a held-out typeface
is never seen in training or validation. Which package goes to which split is fixed in SPLIT below (and
written in models/fonts62/README.md); every font file that covers all 62 characters is one typeface.

    apt-get install -y <the packages in SPLIT>      # or: --install
    .venv/bin/python models/fonts_data.py --out data/fonts62                 # the shipped split
    .venv/bin/python models/fonts_data.py --out my-fonts --fonts ~/fonts/   # your own typefaces (split "custom")

Writes <out>/split.json (every typeface: split, package, file, family, style, caption style) and
<out>/<split>.npz (images uint8 (N, S, S), labels, font index). Rendering is deterministic, so the
same packages give the same file list and images (a test checks split.json against the shipped one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SIZE = 16  # image side in pixels
RENDER = 64  # glyphs are drawn at 4× and box-filtered down
# Which Debian font packages make up each split (train from the 14 packages only).
SPLIT = {
    "train": ["fonts-dejavu-core", "fonts-dejavu-extra", "fonts-liberation2", "fonts-urw-base35",
              "fonts-freefont-ttf", "fonts-noto-core", "fonts-cantarell", "fonts-humor-sans",
              "fonts-dancingscript"],
    "validation": ["fonts-crosextra-carlito", "fonts-noto-mono"],
    "held_out": ["fonts-crosextra-caladea", "fonts-comic-neue", "fonts-kaushanscript"],
}
FONT_SUFFIXES = (".ttf", ".otf")  # URW's .pfb/.t1 copies of the same faces are skipped
# Noto's core package is mostly non-Latin scripts; only its Latin text families are glyph typefaces here.
NOTO_LATIN = ("NotoSans-", "NotoSerif-", "NotoSansDisplay-", "NotoSerifDisplay-")
# Symbol fonts that map 0-9, A-Z, a-z to pictures or math glyphs.
SYMBOL_FAMILIES = ("D050000L", "Standard Symbols PS", "DejaVu Math TeX Gyre")
# Family keywords -> typeface category (first match wins; default sans-serif).
CATEGORIES = (("mono", ("Mono", "Courier")), ("script", ("Z003", "Dancing", "Kaushan", "Chancery")),
              ("handwritten", ("Humor", "Comic")),
              ("serif", ("Serif", "Roman", "C059", "P052", "Bookman", "Caladea", "Times", "Cambo")))


def char_name(ch: str) -> str:
    """The class name of a character: CLIP lowercases text, so case must be said in words."""
    if ch.isdigit():
        return f"the digit {ch}"
    return f"the capital letter {ch}" if ch.isupper() else f"the small letter {ch}"


CLASS_NAMES = tuple(char_name(c) for c in CHARS)


@dataclass(frozen=True)
class Typeface:
    split: str
    package: str  # Debian package, or "" for --fonts
    file: str  # path as installed
    family: str
    style: str
    category: str  # serif | sans-serif | mono | handwritten | script
    look: str  # the caption's style words, e.g. "bold italic serif"


def category(family: str) -> str:
    for name, keys in CATEGORIES:
        if any(k.lower() in family.lower() for k in keys):
            return name
    return "sans-serif"


def look(family: str, style: str) -> str:
    """Weight, slant and width words from the style/family names, then the category."""
    words = (style + " " + family).lower()
    adj = []
    if any(w in words for w in ("bold", "demi", "black", "heavy")):
        adj.append("bold")
    elif any(w in words for w in ("light", "thin")):
        adj.append("light")
    if "condensed" in words or "narrow" in words:
        adj.append("condensed")
    if "italic" in words or "oblique" in words:
        adj.append("italic")
    return " ".join(adj + [{"mono": "monospaced"}.get(category(family), category(family))])


def caption(ch: str, face_look: str) -> str:
    """"the small letter g in a bold serif typeface"; handwriting: "the digit 7, handwritten"."""
    if face_look.endswith("handwritten"):
        return f"{char_name(ch)}, {face_look}"
    return f"{char_name(ch)} in a {face_look} typeface"


def package_files(package: str) -> list[str]:
    """The font files a Debian package installed (dpkg -L), sorted."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"font package {package} is not installed; run `apt-get install -y {package}` "
                         "(or this script with --install)") from None
    files = [f for f in out.splitlines() if f.endswith(FONT_SUFFIXES) and Path(f).is_file()]
    if package == "fonts-noto-core":
        files = [f for f in files if Path(f).name.startswith(NOTO_LATIN)]
    return sorted(files)


def load_font(path: str) -> ImageFont.FreeTypeFont | None:
    """The font at a size whose ascent + descent spans RENDER pixels; None if Pillow cannot read it."""
    try:
        probe = ImageFont.truetype(path, RENDER)
        a, d = probe.getmetrics()
        return ImageFont.truetype(path, max(8, round(RENDER * RENDER / max(a + d, 1))))
    except OSError:
        return None


def glyph_bitmap(font: ImageFont.FreeTypeFont, ch: str) -> bytes | None:
    """The drawn glyph's ink (size + pixels), None when it draws nothing."""
    left, top, right, bottom = font.getbbox(ch)
    if right <= left or bottom <= top:
        return None
    im = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(im).text((-left, -top), ch, fill=255, font=font)
    return None if im.getbbox() is None else bytes(str(im.size), "ascii") + im.tobytes()


def covers(font: ImageFont.FreeTypeFont) -> bool:
    """True when every character has its own glyph (not empty, not the font's missing-glyph box)."""
    missing = glyph_bitmap(font, "\U0010fffd")
    return all((g := glyph_bitmap(font, c)) is not None and g != missing for c in CHARS)


def render(font: ImageFont.FreeTypeFont, ch: str, size: int = SIZE) -> np.ndarray:
    """(size, size) uint8, white glyph on black: baseline at the font's ascent, so case and descenders keep
    their height; centred horizontally, squeezed when wider than tall."""
    a, d = font.getmetrics()
    canvas = Image.new("L", (4 * RENDER, a + d), 0)
    ImageDraw.Draw(canvas).text((RENDER, 0), ch, fill=255, font=font)
    x0, _, x1, _ = canvas.getbbox()
    width = max(x1 - x0, a + d)
    left = (x0 + x1) // 2 - width // 2
    box = canvas.crop((left, 0, left + width, a + d))
    return np.asarray(box.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def typefaces(split: str, package: str, files: list[str]) -> list[tuple[Typeface, ImageFont.FreeTypeFont]]:
    """The readable, complete, distinct (family, style) typefaces among files."""
    out, seen = [], set()
    for f in files:
        font = load_font(f)
        if font is None or not covers(font):
            continue
        family, style = font.getname()
        if (family, style) in seen or family in SYMBOL_FAMILIES:
            continue
        seen.add((family, style))
        out.append((Typeface(split, package, f, family, style, category(family), look(family, style)), font))
    return out


def font_paths(paths: list[str]) -> list[str]:
    """Font files among paths (folders searched recursively)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in FONT_SUFFIXES)
        elif p.is_file():
            files.append(str(p))
        else:
            raise SystemExit(f"--fonts: {p} is neither a font file nor a folder; give .ttf/.otf files or folders")
    return files


def build(packages: dict[str, list[str]] | None = None, fonts: list[str] | None = None):
    """[(Typeface, font)] for the package split (default SPLIT) or, with fonts, one "custom" split."""
    if fonts:
        return typefaces("custom", "", font_paths(fonts))
    return [tf for split, pkgs in (packages or SPLIT).items() for pkg in pkgs
            for tf in typefaces(split, pkg, package_files(pkg))]


def arrays(faces) -> dict[str, dict[str, np.ndarray]]:
    """split -> images (N, S, S) uint8, labels (N,), font (N,) index into the split's typefaces; font-major."""
    out = {}
    for split in dict.fromkeys(tf.split for tf, _ in faces):
        mine = [(tf, f) for tf, f in faces if tf.split == split]
        images = np.stack([render(f, c) for _, f in mine for c in CHARS])
        out[split] = {"images": images, "labels": np.tile(np.arange(len(CHARS)), len(mine)),
                      "font": np.repeat(np.arange(len(mine)), len(CHARS))}
    return out


def split_record(faces) -> dict:
    return {"chars": CHARS, "size": SIZE, "packages": SPLIT,
            "typefaces": [asdict(tf) for tf, _ in faces]}


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(images, labels, typefaces of each image) of one split written by this script."""
    folder = Path(folder)
    data = np.load(folder / f"{split}.npz")
    faces = [tf for tf in json.loads((folder / "split.json").read_text())["typefaces"] if tf["split"] == split]
    return data["images"], data["labels"], [faces[i] for i in data["font"]]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for split.json and <split>.npz")
    ap.add_argument("--fonts", nargs="+", metavar="PATH", help="your own font files/folders (one 'custom' split)")
    ap.add_argument("--install", action="store_true", help="apt-get install the split's packages first")
    args = ap.parse_args(argv)
    if args.install:
        pkgs = [p for ps in SPLIT.values() for p in ps]
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], check=True)
    faces = build(fonts=args.fonts)
    if not faces:
        raise SystemExit("no font covering all of 0-9, A-Z, a-z was found; give other --fonts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, a in arrays(faces).items():
        np.savez_compressed(out / f"{split}.npz", **a)
    (out / "split.json").write_text(json.dumps(split_record(faces), indent=1) + "\n")
    counts = {s: sum(tf.split == s for tf, _ in faces) for s in dict.fromkeys(tf.split for tf, _ in faces)}
    print(f"wrote {out}: typefaces per split {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
