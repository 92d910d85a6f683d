"""Passes that bring a float model into the form the planner expects.

Each pass edits qnnlib's private copy of the model in place and returns notes for the report.
They run in :func:`normalize` in this order:

1. ``weight_inputs_to_initializers``: graph inputs that carry an initializer (UltraFace) are weights.
2. ``upgrade_opset``: opsets below 13 are converted, since per-channel DequantizeLinear needs 13.
3. ``constants_to_initializers``: Constant nodes (Paddle exports, and those the converter adds)
   become initializers.
4. ``name_nodes``: every node gets a unique, deterministic name.
5. ``eliminate_identities``: Identity and inference-mode Dropout nodes are bypassed.
6. ``float16_to_float32``: float16 weights and tensors become float32 inside, with Casts at the
   model's inputs and outputs so that its interface stays float16.
   (shape inference runs here, so that the next pass knows static shapes)
6b. ``fold_constants``: nodes whose inputs are all constants, and Shape of statically shaped
   tensors, become initializers (evaluated with onnx's reference evaluator).
7. ``fold_batchnorm``: BatchNormalization after a Conv is folded into the Conv's weight and bias.
8. ``fold_conv_add``: a constant per-channel Add after a Conv (CNTK's bias) joins the Conv's bias.
9. ``matmul_add_to_gemm``: a 2-D MatMul with constant weights followed by a constant bias Add
   becomes a Gemm, whose bias is quantised to int32 (onnxruntime would otherwise fuse the pair
   into a float Gemm before its QDQ fusions).
10. ``infer_types``: shape inference, with onnxruntime filling element types that it misses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qnnlib.errors import UnsupportedModelError
from qnnlib.graph.edit import drop_unused_initializers, replace_nodes
from qnnlib.graph.index import GraphIndex, attribute, subgraphs
from qnnlib.graph.model_io import EXTERNAL_DATA_THRESHOLD, model_size
from qnnlib.graph.names import NameAllocator

log = logging.getLogger(__name__)

#: Per-channel DequantizeLinear (the ``axis`` attribute) needs this opset.
PER_CHANNEL_OPSET = 13
#: QuantizeLinear and DequantizeLinear exist from this opset on.
MIN_QDQ_OPSET = 10


@dataclass
class NormalizedModel:
    """The normalised private copy of the model and what normalisation did to it."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    original_opset: int = 0
    per_channel_ok: bool = True
    float16_interface: bool = False


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise UnsupportedModelError(
        "the model imports no default ONNX domain opset; re-export it with an opset_import for ''"
    )


def normalize(model: onnx.ModelProto, *, fold_batchnorm_nodes: bool = True) -> NormalizedModel:
    """Run every normalisation pass on ``model`` (qnnlib's own copy) and collect notes."""
    result = NormalizedModel(model=model, original_opset=default_opset(model))
    opset = result.original_opset
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UnsupportedModelError(
            f"the model uses opset {opset}, newer than the {newest} that the installed onnx "
            f"{onnx.__version__} knows; upgrade onnx and onnxruntime, or export at opset <= {newest}"
        )
    notes = result.notes
    notes += weight_inputs_to_initializers(model)
    upgrade_notes, result.per_channel_ok = upgrade_opset(model, PER_CHANNEL_OPSET)
    notes += upgrade_notes
    notes += constants_to_initializers(model)
    notes += name_nodes(model)
    notes += eliminate_identities(model)
    fp16_notes = float16_to_float32(model)
    result.float16_interface = bool(fp16_notes)
    notes += fp16_notes
    notes += infer_types(model)
    if fold_constants(model):
        notes.append("folded constant subgraphs into initializers")
        notes += infer_types(model)
    if fold_batchnorm_nodes:
        notes += fold_batchnorm(model)
        notes += infer_types(model)
    fused = fold_conv_add(model) + matmul_add_to_gemm(model)
    if fused:
        notes += fused
        notes += infer_types(model)
    return result


# -- 1 ------------------------------------------------------------------------------------------
def name_nodes(model: onnx.ModelProto) -> list[str]:
    """Give unnamed or duplicate-named nodes the name ``<OpType>_<index>`` (made unique)."""
    names = NameAllocator(model)
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.op_type}_{i}")
            renamed += 1
        seen.add(node.name)
    return [f"named {renamed} unnamed or duplicate nodes"] if renamed else []


# -- 2 ------------------------------------------------------------------------------------------
def constants_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Turn Constant nodes of the main graph into initializers (their output names are kept)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = _constant_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved += 1
                continue
        keep.append(node)
    if moved:
        replace_nodes(model, keep)
    return [f"turned {moved} Constant nodes into initializers"] if moved else []


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), np.int64)
    return None  # sparse or string constants stay as nodes


# -- 3 ------------------------------------------------------------------------------------------
def weight_inputs_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Drop graph inputs that have an initializer of the same name: qnnlib treats them as weights.

    IR version 4 is the first where initializers need not be graph inputs, so older models move to it.
    """
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    real = [i for i in graph.input if i.name not in init_names]
    dropped = len(graph.input) - len(real)
    if dropped:
        del graph.input[:]
        graph.input.extend(real)
        model.ir_version = max(model.ir_version, 4)
        return [f"treated {dropped} graph inputs that have initializers as constant weights"]
    return []


# -- 4 ------------------------------------------------------------------------------------------
def eliminate_identities(model: onnx.ModelProto) -> list[str]:
    """Bypass Identity nodes and inference-mode Dropout nodes whose mask output is unused."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    index = GraphIndex(model)
    rename: dict[str, str] = {}
    removed: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Identity":
            pass
        elif node.op_type == "Dropout":
            if len(node.output) > 1 and node.output[1] and index.uses(node.output[1]):
                continue
            if len(node.input) > 2 and node.input[2]:  # training_mode input
                continue
        else:
            continue
        out = node.output[0]
        if out in outputs or index.read_in_subgraph(out):
            continue
        source = node.input[0]
        rename[out] = rename.get(source, source)
        removed.append(node)
    if not removed:
        return []
    for key in list(rename):  # resolve chains of identities
        target = rename[key]
        while target in rename:
            target = rename[target]
        rename[key] = target
    gone = {id(n) for n in removed}
    keep = [n for n in graph.node if id(n) not in gone]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    replace_nodes(model, keep)
    return [f"removed {len(removed)} Identity/Dropout nodes"]


# -- 5 ------------------------------------------------------------------------------------------
def upgrade_opset(model: onnx.ModelProto, target: int) -> tuple[list[str], bool]:
    """Convert a model below ``target`` with onnx.version_converter.

    Returns the notes and whether per-channel quantisation is possible. A model that cannot be
    converted keeps its opset when that still has QuantizeLinear (>= 10; weights are then
    quantised per tensor), and is refused otherwise.
    """
    opset = default_opset(model)
    if opset >= target:
        return [], True
    try:
        converted = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeError/IndexError/... on failure
        if opset >= MIN_QDQ_OPSET:
            note = (f"opset {opset} could not be upgraded to {target} ({_first_line(exc)}); weights are "
                    "quantised per tensor, which this opset allows")
            log.warning(note)
            return [note], False
        raise UnsupportedModelError(
            f"the model uses opset {opset}, which has no QuantizeLinear, and onnx.version_converter "
            f"could not upgrade it to {target}: {_first_line(exc)}. Convert it yourself "
            f"(onnx.version_converter.convert_version(model, {target})) and fix what it reports"
        ) from exc
    converted.ir_version = max(converted.ir_version, model.ir_version, 7)
    model.CopyFrom(converted)
    return [f"upgraded opset {opset} to {target} so that per-channel DequantizeLinear is valid"], True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- 6 ------------------------------------------------------------------------------------------
def float16_to_float32(model: onnx.ModelProto) -> list[str]:
    """Compute in float32 inside: convert float16 weights, tensors and casts; keep the interface.

    A float16 graph input ``x`` gets ``Cast(to=float)`` into ``x_float32`` that the graph reads
    instead; a float16 graph output ``y`` is produced by ``Cast(to=float16)`` from ``y_float32``.
    """
    graph = model.graph
    fp16 = TensorProto.FLOAT16
    has_fp16 = any(t.data_type == fp16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16 for v in list(graph.input) + list(graph.output)
    )
    if not has_fp16:
        return []
    names = NameAllocator(model)
    for t in graph.initializer:
        if t.data_type == fp16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and node.op_type in ("Cast", "CastLike") and attr.i == fp16:
                attr.i = TensorProto.FLOAT
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            if attr.name == "dtype" and attr.i == fp16:
                attr.i = TensorProto.FLOAT
    new_nodes: list[onnx.NodeProto] = []
    rename_inputs: dict[str, str] = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == fp16:
            inner = names.fresh(f"{inp.name}_float32")
            rename_inputs[inp.name] = inner
            new_nodes.append(helper.make_node("Cast", [inp.name], [inner], to=TensorProto.FLOAT,
                                              name=names.fresh(f"{inp.name}_to_float32")))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename_inputs:
                node.input[i] = rename_inputs[name]
    tail: list[onnx.NodeProto] = []
    for out in graph.output:
        if out.type.tensor_type.elem_type == fp16:
            inner = rename_inputs.get(out.name) or names.fresh(f"{out.name}_float32")
            if out.name not in rename_inputs:
                for node in graph.node:
                    for i, name in enumerate(node.output):
                        if name == out.name:
                            node.output[i] = inner
                    for i, name in enumerate(node.input):
                        if name == out.name:
                            node.input[i] = inner
            tail.append(helper.make_node("Cast", [inner], [out.name], to=fp16,
                                         name=names.fresh(f"{out.name}_to_float16")))
    nodes = new_nodes + list(graph.node) + tail
    replace_nodes(model, nodes)
    del graph.value_info[:]
    for node in graph.node:
        if any(True for _ in subgraphs(node)):
            log.warning("node %r has subgraphs; float16 inside them is left as it is", node.name)
    return ["converted float16 weights and tensors to float32 inside; inputs and outputs stay float16"]


# -- 6b -----------------------------------------------------------------------------------------
#: Constant folding never creates an initializer larger than this many bytes.
FOLD_MAX_BYTES = 1 << 26
#: Ops never folded: random generators, and ops whose value the graph should keep visible.
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace nodes whose inputs are all initializers, and Shape of static shapes, by initializers.

    Returns how many nodes were folded. A node whose evaluation fails, or whose result would exceed
    :data:`FOLD_MAX_BYTES`, is left as it is.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    index = GraphIndex(model)
    constants: dict[str, np.ndarray] = {}
    outputs = set(index.graph_outputs)
    opset = default_opset(model)
    folded: set[int] = set()

    def value(name: str) -> np.ndarray | None:
        if name in constants:
            return constants[name]
        if index.is_constant(name):
            return index.constant(name)
        return None

    for node in index.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or any(True for _ in subgraphs(node)):
            continue
        if any(o in outputs for o in node.output):
            continue
        results: list[np.ndarray] | None = None
        if node.op_type == "Shape":
            shape = index.shape(node.input[0])
            if shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
                start = int(attribute(node, "start", 0))  # type: ignore[arg-type]
                end = attribute(node, "end", None)
                dims = list(shape)[start:None if end is None else int(end)]  # type: ignore[arg-type]
                results = [np.array(dims, np.int64)]
        else:
            inputs = [value(n) if n else None for n in node.input]
            if not node.input or any(n and v is None for n, v in zip(node.input, inputs)):
                continue
            try:
                single = helper.make_model(
                    helper.make_graph([node], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                                                      for n, v in zip(node.input, inputs) if n and v is not None],
                                      [onnx.ValueInfoProto(name=o) for o in node.output if o]),
                    opset_imports=[helper.make_opsetid("", opset)])
                feeds = {n: v for n, v in zip(node.input, inputs) if n and v is not None}
                results = list(ReferenceEvaluator(single).run(None, feeds))
            except Exception:  # noqa: BLE001 - an op the evaluator cannot run stays a node
                results = None
        if results is None or sum(np.asarray(r).nbytes for r in results) > FOLD_MAX_BYTES:
            continue
        for name, result in zip([o for o in node.output if o], results):
            constants[name] = np.asarray(result)
        folded.add(id(node))
    if not folded:
        return 0
    used = {n for node in index.nodes if id(node) not in folded for n in node.input} | outputs
    for node in index.nodes:
        if id(node) in folded:
            for name in node.output:
                if name in used and name in constants:
                    graph.initializer.append(numpy_helper.from_array(constants[name], name))
    replace_nodes(model, (n for n in graph.node if id(n) not in folded))
    drop_unused_initializers(model)
    del graph.value_info[:]
    return len(folded)


# -- 7 ------------------------------------------------------------------------------------------
def fold_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold ``Conv -> BatchNormalization`` into the Conv.

    With ``f = gamma / sqrt(var + eps)``: ``W'[c] = W[c] * f[c]`` and
    ``b'[c] = (b[c] - mean[c]) * f[c] + beta[c]``. Only when the Conv output feeds the
    BatchNormalization alone and every parameter is a constant.
    """
    graph = model.graph
    index = GraphIndex(model)
    names = NameAllocator(model)
    inits = {t.name: t for t in graph.initializer}
    removed: set[int] = set()
    folded = 0
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        if attribute(bn, "training_mode", 0) or any(o and index.uses(o) for o in bn.output[1:]):
            continue
        if not all(name in inits for name in bn.input[1:5]):
            continue
        conv = index.producer(bn.input[0])
        if conv is None or conv.op_type != "Conv" or id(conv) in removed:
            continue
        if len(index.uses(bn.input[0])) != 1 or index.is_graph_output(bn.input[0]):
            continue
        if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        eps = float(attribute(bn, "epsilon", 1e-5))  # type: ignore[arg-type]
        factor = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        new_w = (w * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        new_b = ((b - mean) * factor + beta).astype(np.float32)
        w_name = names.fresh(f"{conv.input[1]}_bnfolded")
        b_name = names.fresh(f"{conv.name}_bias_bnfolded")
        graph.initializer.append(numpy_helper.from_array(new_w, w_name))
        graph.initializer.append(numpy_helper.from_array(new_b, b_name))
        inits[w_name] = graph.initializer[-2]
        inits[b_name] = graph.initializer[-1]
        conv.input[1] = w_name
        if has_bias:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    if not folded:
        return []
    keep = [n for n in graph.node if id(n) not in removed]
    replace_nodes(model, keep)
    drop_unused_initializers(model)
    return [f"folded {folded} BatchNormalization nodes into their Conv"]


# -- 8 ------------------------------------------------------------------------------------------
def fold_conv_add(model: onnx.ModelProto) -> list[str]:
    """Fold ``Conv -> Add(c)`` into the Conv's bias when ``c`` is a constant per output channel.

    ``c`` may have shape ``(C,)`` broadcast as ``(1, C, 1, ..)``, ``(1, C, 1, ..)``, ``(C, 1, ..)`` or be a
    scalar; the new bias is ``b + c`` with ``b = 0`` when the Conv had none.
    """
    graph = model.graph
    index = GraphIndex(model)
    names = NameAllocator(model)
    removed: set[int] = set()
    for add in list(graph.node):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for data_pos in (0, 1):
            data, const = add.input[data_pos], add.input[1 - data_pos]
            conv = index.producer(data)
            if conv is None or conv.op_type != "Conv" or id(conv) in removed or not index.is_constant(const):
                continue
            if len(index.uses(data)) != 1 or index.is_graph_output(data) or not index.is_constant(conv.input[1]):
                continue
            if len(conv.input) > 2 and conv.input[2] and not index.is_constant(conv.input[2]):
                continue
            channels = int(index.shape(conv.input[1])[0])  # type: ignore[index]
            rank = len(index.shape(data) or ()) or 4
            per_channel = _per_channel_vector(index.constant(const), channels, rank)
            if per_channel is None:
                continue
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            bias = index.constant(conv.input[2]).astype(np.float32) if has_bias else np.zeros(channels, np.float32)
            name = names.fresh(f"{conv.name}_bias_addfolded")
            graph.initializer.append(numpy_helper.from_array((bias + per_channel).astype(np.float32), name))
            if has_bias:
                conv.input[2] = name
            else:
                conv.input.append(name)
            conv.output[0] = add.output[0]
            removed.add(id(add))
            break
    if not removed:
        return []
    replace_nodes(model, (n for n in graph.node if id(n) not in removed))
    drop_unused_initializers(model)
    return [f"folded {len(removed)} constant Add nodes into their Conv's bias"]


def matmul_add_to_gemm(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``MatMul(A, B) -> Add(c)`` as ``Gemm(A, B, c)``.

    For constant 2-D ``B`` (K, N) and constant ``c`` of shape (N,), (1, N) or a scalar. ``A`` of
    rank > 2 with static leading dims is reshaped to (M, K) around the Gemm and back.
    """
    graph = model.graph
    index = GraphIndex(model)
    names = NameAllocator(model)
    removed: set[int] = set()
    inserted: dict[int, tuple[onnx.NodeProto, onnx.NodeProto]] = {}
    replaced = 0
    for add in list(graph.node):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for data_pos in (0, 1):
            data, const = add.input[data_pos], add.input[1 - data_pos]
            mm = index.producer(data)
            if mm is None or mm.op_type != "MatMul" or id(mm) in removed or not index.is_constant(const):
                continue
            a_shape, b_shape = index.shape(mm.input[0]), index.shape(mm.input[1])
            if not index.is_constant(mm.input[1]) or a_shape is None or len(a_shape) < 2 or len(b_shape or ()) != 2:
                continue
            if len(a_shape) > 2 and not all(isinstance(d, int) and d > 0 for d in a_shape[:-1]):
                continue
            if len(index.uses(data)) != 1 or index.is_graph_output(data):
                continue
            n = int(b_shape[1])  # type: ignore[index]
            c = index.constant(const).astype(np.float32)
            if c.size == 1:
                c = np.full(n, float(c.reshape(())), np.float32)
            elif c.shape not in ((n,), (1, n)):
                continue
            bias = names.fresh(f"{mm.name}_bias")
            graph.initializer.append(numpy_helper.from_array(c.reshape(n), bias))
            if len(a_shape) == 2:
                mm.CopyFrom(helper.make_node("Gemm", [mm.input[0], mm.input[1], bias], [add.output[0]], name=mm.name))
            else:
                lead = [int(d) for d in a_shape[:-1]]  # type: ignore[arg-type]
                flat_shape = names.fresh(f"{mm.name}_2d_shape")
                out_shape = names.fresh(f"{mm.name}_nd_shape")
                graph.initializer.append(numpy_helper.from_array(np.array([-1, a_shape[-1]], np.int64), flat_shape))
                graph.initializer.append(numpy_helper.from_array(np.array([*lead, n], np.int64), out_shape))
                flat_in, flat_out = names.fresh(f"{mm.input[0]}_2d"), names.fresh(f"{add.output[0]}_2d")
                before = helper.make_node("Reshape", [mm.input[0], flat_shape], [flat_in], name=names.fresh(f"{mm.name}_to_2d"))
                after = helper.make_node("Reshape", [flat_out, out_shape], [add.output[0]], name=names.fresh(f"{mm.name}_to_nd"))
                mm.CopyFrom(helper.make_node("Gemm", [flat_in, mm.input[1], bias], [flat_out], name=mm.name))
                inserted[id(mm)] = (before, after)
            removed.add(id(add))
            replaced += 1
            break
    if not replaced:
        return []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in removed:
            continue
        before, after = inserted.get(id(node), (None, None))
        nodes.extend(n for n in (before, node, after) if n is not None)
    replace_nodes(model, nodes)
    drop_unused_initializers(model)
    return [f"rewrote {replaced} MatMul + bias Add pairs as Gemm"]


def _per_channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a (channels,) vector if it broadcasts per channel onto an NC... tensor of ``rank``."""
    value = value.astype(np.float32)
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), np.float32)
    shape = list(value.shape)
    while len(shape) < rank:
        shape.insert(0, 1)
    if len(shape) != rank or shape[0] != 1 or shape[1] != channels or any(d != 1 for d in shape[2:]):
        return None
    return value.reshape(channels)


# -- 10 -----------------------------------------------------------------------------------------
def infer_types(model: onnx.ModelProto) -> list[str]:
    """Infer shapes and types; ask onnxruntime for element types shape inference leaves unknown."""
    notes: list[str] = []
    if model_size(model) < EXTERNAL_DATA_THRESHOLD:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
            model.CopyFrom(inferred)
        except Exception as exc:  # inference raises InferenceError or RuntimeError with custom ops
            notes.append(f"shape inference failed ({_first_line(exc)}); element types come from onnxruntime")
    index = GraphIndex(model)
    unknown = [o for n in index.nodes for o in n.output if o and index.elem_type(o) is None]
    if unknown:
        notes += _types_from_onnxruntime(model, unknown)
    return notes


def _types_from_onnxruntime(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    from qnnlib.errors import RuntimeFailure
    from qnnlib.graph.model_io import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        session = make_session(probe, optimization="disable")
    except RuntimeFailure as exc:
        return [f"element types of {len(tensors)} tensors are unknown ({exc}); they stay float"]
    types = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
             "tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32,
             "tensor(bool)": TensorProto.BOOL, "tensor(uint8)": TensorProto.UINT8,
             "tensor(int8)": TensorProto.INT8, "tensor(double)": TensorProto.DOUBLE}
    wanted = set(tensors)
    added = 0
    for out in session.get_outputs():
        if out.name in wanted and out.type in types:
            model.graph.value_info.append(helper.make_tensor_value_info(out.name, types[out.type], None))
            added += 1
    return [f"onnxruntime supplied the element types of {added} tensors"] if added else []
