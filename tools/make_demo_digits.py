"""Render the demo's digit images (28x28, white on black, MNIST-like) into qnnlib/demo/digits.npz.

    python tools/make_demo_digits.py

Digits 0-9 in the DejaVu fonts, at random sizes, offsets, rotations and stroke widths, centred by
mass like MNIST. Needs Pillow and the DejaVu fonts; the result is committed, so users need neither.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
OUT = Path(__file__).resolve().parent.parent / "qnnlib" / "demo" / "digits.npz"


def render(digit: int, rng: np.random.Generator) -> np.ndarray:
    font = ImageFont.truetype(str(FONTS[int(rng.integers(len(FONTS)))]), int(rng.integers(44, 60)))
    img = Image.new("L", (84, 84), 0)
    ImageDraw.Draw(img).text((22, 6), str(digit), font=font, fill=255,
                             stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    box = img.getbbox() or (0, 0, 84, 84)
    img = img.crop(box)
    scale = 20 / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    canvas = np.zeros((28, 28), np.float32)
    arr = np.asarray(img, np.float32)
    ys, xs = np.nonzero(arr)
    cy, cx = np.average(ys, weights=arr[ys, xs]), np.average(xs, weights=arr[ys, xs])
    top, left = round(14 - cy), round(14 - cx)
    top, left = min(max(top, 0), 28 - arr.shape[0]), min(max(left, 0), 28 - arr.shape[1])
    canvas[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
    out = Image.fromarray(canvas.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.4))
    return np.asarray(out, np.uint8)


def main() -> None:
    rng = np.random.default_rng(2026)
    labels = np.tile(np.arange(10), 20)
    images = np.stack([render(int(d), rng) for d in labels])
    np.savez_compressed(OUT, images=images, labels=labels.astype(np.uint8))
    print(f"wrote {len(images)} digits to {OUT}")


if __name__ == "__main__":
    main()
