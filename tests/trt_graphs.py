"""What TensorRT's ONNX parser imports, and the check that an exported graph is one it parses:
``check_tensorrt_graph`` (used by the tensorrt tests on SD and SDXL models, on the CPU)."""

from __future__ import annotations

import shutil

import pytest
import torch

from pyinv.backends import trt as trt_backend
from pyinv.backends.export import GRAPH_FILE, OPSET

#: the ONNX operators TensorRT's ONNX parser imports: the "Y" rows of onnx-tensorrt's
#: docs/operators.md (TensorRT 10), which reads opsets 9 to 20
TRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
    Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor
    """.split()
)
TRT_OPSETS = range(9, 21)
#: graph input types the parser takes (DOUBLE becomes a FLOAT engine input)
TRT_INPUT_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8", "DOUBLE"}
#: inputs the parser needs as constants (initializers or Constant nodes): ``op → input index``
CONSTANT_INPUTS = {"Slice": 3, "ReduceSum": 1, "Unsqueeze": 1, "Squeeze": 1, "TopK": 1, "CumSum": 1}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
#: ONNX output type of a graph exported from a model of this dtype
OUTPUT_TYPES = {torch.float16: "FLOAT16", torch.float32: "FLOAT"}
#: relative error of the rewritten graph (ONNX Runtime, CPU) against eager, by dtype
TOLERANCE = {torch.float16: 2e-2, torch.float32: 1e-4}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_tensorrt_graph(flat, signature, tensors, entry, tmp_path, rewrites: bool, maps: bool) -> float:
    """Check the graph of a cache ``entry`` (exported from ``flat``, a
    :class:`~pyinv.backends.flat.FlatUNet`, on ``tensors`` of ``signature``) as
    ``build_engine`` hands it to TensorRT's parser: rewritten by ``tensorrt_graph`` (the
    parser refuses a ScatterND with a reduction, P2P's ``index_add``; ``rewrites``: the graph
    has one), valid, static, named as the signature (with a ``maps`` output, LocalBlend's
    word maps, when ``maps``), of operators the parser imports, and computing what ``flat``
    does (ONNX Runtime on the CPU, the rewritten graph saved in ``tmp_path``). Returns the
    largest relative error of its outputs."""
    onnx = pytest.importorskip("onnx")
    path = entry.file(GRAPH_FILE)
    onnx.checker.check_model(str(path))  # by path: the weights are external
    model = onnx.load(str(path), load_external_data=False)
    rewritten = trt_backend.tensorrt_graph(model)
    assert (rewritten > 0) == rewrites
    shutil.copy(entry.file(GRAPH_FILE + ".data"), tmp_path)  # beside it, as TensorRT reads it
    onnx.save(model, str(tmp_path / GRAPH_FILE))
    onnx.checker.check_model(str(tmp_path / GRAPH_FILE))
    graph = model.graph

    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx") == OPSET
    assert OPSET in TRT_OPSETS
    assert not model.functions  # no local functions: every node is a plain operator

    def shape(value):
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{value.name} has a dynamic dimension"
        return tuple(d.dim_value for d in dims)

    def kind(value):
        return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)

    assert [i.name for i in graph.input] == [spec.name for spec in signature.inputs]
    for value, spec in zip(graph.input, signature.inputs, strict=True):
        assert shape(value) == spec.shape, value.name
        assert kind(value) in TRT_INPUT_TYPES, (value.name, kind(value))
    with torch.no_grad():
        eager = flat(*tensors)
    dtype = eager[0].dtype
    assert [o.name for o in graph.output] == ["prediction", "maps"][: len(eager)]
    assert [shape(o) for o in graph.output] == [tuple(t.shape) for t in eager]
    assert kind(graph.output[0]) == OUTPUT_TYPES[dtype]  # the graph computes in the model's dtype

    ops = {node.op_type for node in graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)
    assert ops <= TRT_ONNX_OPS, sorted(ops - TRT_ONNX_OPS)
    constants = {i.name for i in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        where = CONSTANT_INPUTS.get(node.op_type)
        if where is not None and len(node.input) > where and node.input[where]:
            assert node.input[where] in constants, (node.op_type, node.name, "axes not constant")
        if node.op_type == "Resize":
            assert attrs.get("mode", "nearest") in RESIZE_MODES
            assert attrs.get("coordinate_transformation_mode", "half_pixel") in RESIZE_COORDINATES
            assert attrs.get("nearest_mode", "round_prefer_floor") in RESIZE_NEAREST
            assert not attrs.get("antialias", 0)
        if node.op_type == "ScatterND":
            assert attrs.get("reduction", "none") == "none"
        if node.op_type == "LayerNormalization":
            assert not any(out in used for out in node.output[1:] if out)  # only Y is supported
    assert ("maps" in [o.name for o in graph.output]) == maps

    # the rewritten graph computes what the eager UNet does (ONNX Runtime on the CPU)
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
    feed = {spec.name: t.numpy() for spec, t in zip(signature.inputs, tensors, strict=True)}
    errors = [rel(torch.from_numpy(got), want) for want, got in zip(eager, session.run(None, feed), strict=True)]
    assert max(errors) <= TOLERANCE[dtype], errors
    return max(errors)
