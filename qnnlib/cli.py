"""The ``qnnlib`` command line.

    qnnlib quantize IN.onnx OUT.onnx [--calib FILE.npz|DIR] [--method M] [--report FILE.json] ...
    qnnlib demo

``--calib`` takes an .npz with one array per model input, samples stacked on the first axis (a
single-input model may use any one array name), or a directory of per-sample files read lazily:
``*.npy`` (single-input models) or ``*.npz`` (one array per input), in name order.
Without ``--calib`` inputs are generated and the report says so. Errors exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qnnlib.errors import CalibrationDataError, QnnlibError

log = logging.getLogger("qnnlib")


def load_calibration(path: Path, input_names: list[str]) -> Any:
    """Calibration feeds from an .npz file or a directory (see the module docstring)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise CalibrationDataError(f"calibration directory {str(path)!r} holds no .npy or .npz file")
        return _directory_feeds(files, input_names)
    if path.suffix != ".npz" or not path.is_file():
        raise CalibrationDataError(f"--calib {str(path)!r} is neither an .npz file nor a directory")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if len(input_names) == 1 and len(arrays) == 1:
        return list(next(iter(arrays.values())))
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise CalibrationDataError(
            f"{str(path)!r} has arrays {sorted(arrays)}, but the model's inputs are {input_names}; "
            "name one array after each input, samples on the first axis"
        )
    counts = {len(arrays[n]) for n in input_names}
    if len(counts) != 1:
        raise CalibrationDataError(f"the arrays in {str(path)!r} hold different numbers of samples: {counts}")
    return [{n: arrays[n][i] for n in input_names} for i in range(counts.pop())]


def _directory_feeds(files: list[Path], input_names: list[str]) -> Iterator[Any]:
    for f in files:
        if f.suffix == ".npy":
            if len(input_names) != 1:
                raise CalibrationDataError(
                    f"{str(f)!r}: .npy files only fit single-input models; use .npz with arrays {input_names}"
                )
            yield np.load(f)
        else:
            with np.load(f) as data:
                yield {k: data[k] for k in data.files}


def _cmd_quantize(args: argparse.Namespace) -> int:
    import onnx

    from qnnlib.api import quantize
    from qnnlib.calibration.feeds import input_specs
    from qnnlib.config import QuantConfig
    from qnnlib.graph.model_io import load_model, save_model

    names = [s.name for s in input_specs(load_model(args.input))]
    calib = load_calibration(args.calib, names) if args.calib else None
    config = QuantConfig(
        method=args.method,
        activation_type=args.activation_type,
        exclude=tuple(args.exclude),
        exclude_op_types=tuple(args.exclude_op_type),
        max_calibration_samples=args.max_samples,
    )
    result = quantize(args.input, calib, config=config)
    result.save(args.output)
    if args.integer:
        save_model(result.integer_model(), args.integer)
    if args.report:
        Path(args.report).write_text(result.report.to_json(), encoding="utf-8")
    if not args.quiet:
        print(result.report.to_text())
    del onnx
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qnnlib import demo

    print(demo.run().summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qnnlib`` command."""
    from qnnlib.calibration.methods import METHODS
    from qnnlib.config import DEFAULT_METHOD

    parser = argparse.ArgumentParser(prog="qnnlib", description="Post-training quantisation of ONNX models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantise a float model to an int8 QDQ model")
    q.add_argument("input", help="float ONNX model")
    q.add_argument("output", help="where to write the quantised model")
    q.add_argument("--calib", type=Path, help=".npz file or directory of samples (default: generated inputs)")
    q.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="calibration method")
    q.add_argument("--activation-type", default="uint8", choices=("uint8", "int8"))
    q.add_argument("--exclude", action="append", default=[], metavar="NODE", help="node name or glob to keep float")
    q.add_argument("--exclude-op-type", action="append", default=[], metavar="OP", help="op type to keep float")
    q.add_argument("--max-samples", type=int, default=None, help="read at most this many calibration samples")
    q.add_argument("--report", help="write the report as JSON to this file")
    q.add_argument("--integer", type=Path, help="also write the integer-operator model (QLinearConv, ...) here")
    q.add_argument("-q", "--quiet", action="store_true", help="do not print the report")
    q.set_defaults(func=_cmd_quantize)
    d = sub.add_parser("demo", help="quantise the built-in MNIST example and print the report")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qnnlib`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except QnnlibError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
