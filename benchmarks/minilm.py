"""A transformer encoder the size of all-MiniLM-L6-v2, built in ONNX with random weights.

Hubs are unreachable, so the model is built as an exporter writes BERT at opset 17: a token
embedding Gather plus position embeddings, then per layer Q/K/V MatMul + Add, Reshape/Transpose into
heads, a scaled Softmax attention, an output projection, residual Adds with LayerNormalization
(post-norm), and an FFN whose GELU is the Erf formula ``0.5 x (1 + erf(x / sqrt 2))``. Sizes are
MiniLM-L6's: 6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522 (22.7M parameters).
Weights are ``N(0, 0.05)``, LayerNorm gains ``U(0.8, 1.2)``: random, but activations keep the
spread of a trained encoder (no layer collapses to zero or saturates Softmax).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 6, 384, 12, 1536, 30522


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{name}_{op_type}", **attrs))
        return name

    def linear(self, x: str, d_in: int, d_out: int, name: str) -> str:
        w = self.const(f"{name}.weight", self.rng.normal(0, 0.05, (d_in, d_out)).astype(np.float32))
        b = self.const(f"{name}.bias", self.rng.normal(0, 0.02, d_out).astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.mm"), b], f"{name}.out")

    def layer_norm(self, x: str, name: str) -> str:
        gain = self.const(f"{name}.gain", self.rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
        bias = self.const(f"{name}.beta", self.rng.normal(0, 0.02, HIDDEN).astype(np.float32))
        return self.op("LayerNormalization", [x, gain, bias], name, axis=-1, epsilon=1e-12)


def build(path: Path, *, seq: int = 128, seed: int = 0) -> Path:
    """Write the encoder to ``path`` (input ``input_ids`` int64 [1, seq], output [1, seq, 384])."""
    b = _Builder(seed)
    head_dim = HIDDEN // HEADS
    table = b.const("embeddings.word", b.rng.normal(0, 0.05, (VOCAB, HIDDEN)).astype(np.float32))
    positions = b.const("embeddings.position", b.rng.normal(0, 0.05, (1, seq, HIDDEN)).astype(np.float32))
    x = b.op("Add", [b.op("Gather", [table, "input_ids"], "tokens"), positions], "embedded")
    x = b.layer_norm(x, "embeddings.norm")
    to_heads = b.const("shape.heads", np.array([1, seq, HEADS, head_dim], np.int64))
    to_hidden = b.const("shape.hidden", np.array([1, seq, HIDDEN], np.int64))
    scale = b.const("attention.scale", np.array(head_dim ** -0.5, np.float32))
    half, one = b.const("gelu.half", np.array(0.5, np.float32)), b.const("gelu.one", np.array(1.0, np.float32))
    root2 = b.const("gelu.sqrt2", np.array(np.sqrt(2.0), np.float32))
    for i in range(LAYERS):
        p = f"layer{i}"
        heads = {}
        for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            proj = b.linear(x, HIDDEN, HIDDEN, f"{p}.{part}")
            heads[part] = b.op("Transpose", [b.op("Reshape", [proj, to_heads], f"{p}.{part}.split")],
                               f"{p}.{part}.heads", perm=perm)
        scores = b.op("Mul", [b.op("MatMul", [heads["q"], heads["k"]], f"{p}.scores"), scale], f"{p}.scaled")
        attention = b.op("Softmax", [scores], f"{p}.attention", axis=-1)
        context = b.op("Transpose", [b.op("MatMul", [attention, heads["v"]], f"{p}.context")], f"{p}.merge",
                       perm=[0, 2, 1, 3])
        context = b.op("Reshape", [context, to_hidden], f"{p}.context.flat")
        x = b.layer_norm(b.op("Add", [x, b.linear(context, HIDDEN, HIDDEN, f"{p}.o")], f"{p}.res1"), f"{p}.norm1")
        up = b.linear(x, HIDDEN, FFN, f"{p}.up")
        erf = b.op("Erf", [b.op("Div", [up, root2], f"{p}.gelu.div")], f"{p}.gelu.erf")
        gelu = b.op("Mul", [b.op("Mul", [up, b.op("Add", [erf, one], f"{p}.gelu.add")], f"{p}.gelu.mul"), half],
                    f"{p}.gelu")
        down = b.linear(gelu, FFN, HIDDEN, f"{p}.down")
        x = b.layer_norm(b.op("Add", [x, down], f"{p}.res2"), f"{p}.norm2")
    b.nodes[-1].output[0] = "last_hidden_state"
    graph = helper.make_graph(b.nodes, "minilm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                [1, seq])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                             [1, seq, HIDDEN])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="qnnlib-benchmarks")
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def token_ids(n: int, seed: int, seq: int = 128) -> list[np.ndarray]:
    """``n`` sequences of token ids: [CLS], Zipf-distributed word ids as in text, [SEP]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.minimum(rng.zipf(1.3, seq) + 1000, VOCAB - 1).astype(np.int64)
        ids[0], ids[-1] = 101, 102
        out.append(ids.reshape(1, seq))
    return out


def embedding_cosine(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
    """Mean cosine similarity of mean-pooled sentence embeddings (the sentence-transformers pooling)."""
    sims = []
    for r, t in zip(ref, test, strict=True):
        a, c = r[0].mean(axis=1).ravel(), t[0].mean(axis=1).ravel()
        sims.append(float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c))))
    return float(np.mean(sims))
