"""Small float models built with onnx's helpers, and their calibration data."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # onnxruntime 1.31 loads IR <= 10; onnx 1.23 would write 14 by default


class GraphBuilder:
    """Collects nodes and initializers; names come from a counter, so models are deterministic."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> str | list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, relu: bool = True, **attrs: object) -> str:
        w = self.rng.normal(0, (2.0 / (c_in * k * k)) ** 0.5, (c_out, c_in // attrs.get("group", 1), k, k))  # type: ignore[operator]
        b = self.rng.normal(0, 0.1, c_out)
        pads = attrs.pop("pads", [k // 2] * 4)
        y = self.op("Conv", [x, self.const(w.astype(np.float32), "w"), self.const(b.astype(np.float32), "b")],
                    pads=pads, **attrs)
        return self.op("Relu", [y]) if relu else y  # type: ignore[return-value]

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        w = self.rng.normal(0, d_in ** -0.5, (d_in, d_out)).astype(np.float32)
        b = self.rng.normal(0, 0.1, d_out).astype(np.float32)
        y = self.op("MatMul", [x, self.const(w, "w")])
        return self.op("Add", [y, self.const(b, "b")])  # type: ignore[arg-type, return-value]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int = 17,
              name: str = "test") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                                  producer_name="qnnlib-tests")
        onnx.checker.check_model(model)
        return model


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """Conv stem, two branches joined by Concat, MaxPool, a residual Add, pooling and a classifier."""
    b = GraphBuilder(seed)
    x = b.conv("input", 3, 8)
    left = b.conv(x, 8, 8, k=1)
    right = b.conv(x, 8, 8, k=3)
    cat = b.op("Concat", [left, right], axis=1)
    pooled = b.op("MaxPool", [cat], kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(pooled, 16, 16, relu=False)  # type: ignore[arg-type]
    res = b.op("Add", [y, pooled])
    act = b.op("Relu", [res])  # type: ignore[list-item]
    avg = b.op("AveragePool", [act], kernel_shape=[2, 2], strides=[2, 2])  # type: ignore[list-item]
    z = b.conv(avg, 16, 16, k=1)  # type: ignore[arg-type]
    gap = b.op("GlobalAveragePool", [z])
    flat = b.op("Flatten", [gap])  # type: ignore[list-item]
    w = b.rng.normal(0, 0.25, (10, 16)).astype(np.float32)
    logits = b.op("Gemm", [flat, b.const(w, "fc_w"), b.const(np.zeros(10, np.float32), "fc_b")], transB=1)  # type: ignore[list-item]
    b.nodes[-1].output[0] = "logits"
    del logits
    return b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], name="conv_net")


def mlp(seed: int = 0) -> onnx.ModelProto:
    """Three MatMul + bias layers with Relu, dynamic batch."""
    b = GraphBuilder(seed)
    h = b.op("Relu", [b.linear("x", 32, 64)])
    h = b.op("Relu", [b.linear(h, 64, 64)])  # type: ignore[arg-type]
    out = b.linear(h, 64, 8)  # type: ignore[arg-type]
    b.nodes[-1].output[0] = "y"
    del out
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], name="mlp")


def transformer_block(seed: int = 0, seq: int = 16, dim: int = 32, heads: int = 4) -> onnx.ModelProto:
    """Pre-norm self-attention and MLP block: LayerNorm, MatMul, Softmax, Gelu, residual Adds."""
    b = GraphBuilder(seed)
    hd = dim // heads

    def layer_norm(x: str) -> str:
        return b.op("LayerNormalization", [x, b.const(np.ones(dim, np.float32), "g"),  # type: ignore[return-value]
                                           b.const(np.zeros(dim, np.float32), "beta")], axis=-1)

    def split_heads(t: str) -> str:
        r = b.op("Reshape", [t, b.const(np.array([1, seq, heads, hd], np.int64), "shape")])
        return b.op("Transpose", [r], perm=[0, 2, 1, 3])  # type: ignore[list-item, return-value]

    h = layer_norm("x")
    q, k, v = (split_heads(b.linear(h, dim, dim)) for _ in range(3))
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, kt])  # type: ignore[list-item]
    scaled = b.op("Mul", [scores, b.const(np.array(hd ** -0.5, np.float32), "scale")])  # type: ignore[list-item]
    attn = b.op("Softmax", [scaled], axis=-1)  # type: ignore[list-item]
    ctx = b.op("MatMul", [attn, v])  # type: ignore[list-item]
    ctx = b.op("Transpose", [ctx], perm=[0, 2, 1, 3])  # type: ignore[list-item]
    ctx = b.op("Reshape", [ctx, b.const(np.array([1, seq, dim], np.int64), "shape")])  # type: ignore[list-item]
    x1 = b.op("Add", ["x", b.linear(ctx, dim, dim)])  # type: ignore[arg-type]
    h2 = layer_norm(x1)  # type: ignore[arg-type]
    up = b.op("Gelu", [b.linear(h2, dim, 4 * dim)])
    x2 = b.op("Add", [x1, b.linear(up, 4 * dim, dim)])  # type: ignore[list-item, arg-type]
    b.nodes[-1].output[0] = "y"
    del x2
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])], opset=20,
                   name="transformer_block")


def embedding_encoder(seed: int = 0, vocab: int = 500, dim: int = 32, seq: int = 16,
                      tied_head: bool = False) -> onnx.ModelProto:
    """Token ids -> embedding Gather + position table -> MLP; with ``tied_head``, logits from the same table."""
    b = GraphBuilder(seed)
    table = b.const(b.rng.normal(0, 0.5, (vocab, dim)).astype(np.float32), "table")
    tokens = b.op("Gather", [table, "ids"])
    x = b.op("Add", [tokens, b.const(b.rng.normal(0, 0.2, (seq, dim)).astype(np.float32), "positions")])
    h = b.op("Relu", [b.linear(x, dim, 2 * dim)])  # type: ignore[list-item]
    y = b.linear(h, 2 * dim, dim)  # type: ignore[arg-type]
    out = [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, seq, dim])]
    if tied_head:
        flat = b.op("Reshape", [y, b.const(np.array([seq, dim], np.int64), "shape")])
        logits = b.op("Gemm", [flat, table], transB=1)  # type: ignore[list-item]
        out.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, [seq, vocab]))  # type: ignore[arg-type]
    return b.model([helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])], out,
                   name="embedding_encoder")


def token_ids(model: onnx.ModelProto, n: int = 16, seed: int = 1, vocab: int = 500) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of uniform token ids below ``vocab`` for the model's one int64 input."""
    rng = np.random.default_rng(seed)
    vi = model.graph.input[0]
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return [{vi.name: rng.integers(0, vocab, dims).astype(np.int64)} for _ in range(n)]


def calibration(model: onnx.ModelProto, n: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """``n`` standard-normal feeds for every float input (dynamic dims become 2)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else 2 for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds
