"""Exporting a checkpoint for use outside lmtrain: ONNX or safetensors (docs/export.md).

``onnx``: one graph from token ids and the initial states to log-probabilities and the final
states, so a caller can feed a stream window by window.  The recurrent layers are ONNX's own
LSTM, GRU and RNN operators, so any runtime's fused kernels run them; the softmax (full or
adaptive) is written out of plain operators.  Needs the ``onnx`` package, not torch.

``safetensors``: the weights under the names and layouts of a small PyTorch module (one
``nn.Embedding``, one ``nn.LSTM``/``nn.GRU``/``nn.RNN`` per layer, an ``nn.Linear`` decoder or an
``nn.AdaptiveLogSoftmaxWithLoss``), the architecture, vocabulary and config in the file's
metadata; docs/export.md holds the PyTorch code that rebuilds the model from it.

Both write in the checkpoint's dtype (or the one asked for), to a temporary file renamed into
place, and never replace an existing file unless asked to.
"""

import json
import os
from dataclasses import dataclass

import numpy as np

import lmtrain
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import from_dict
from lmtrain.data.vocab import Vocab
from lmtrain.errors import CheckpointError, LmtrainError

FORMATS = ("onnx", "safetensors")
DTYPES = ("float32", "float64")
INSTALL_HINT = "pip install 'lmtrain[export]'"
OPSET = 17
IR_VERSION = 8  # the IR version of opset 17: the oldest that carries it, so older runtimes read the file
PROTOBUF_LIMIT = 2**31 - 1  # one ONNX file is one protobuf message, which cannot exceed 2 GiB
SAFETENSORS_FORMAT = "lmtrain-safetensors"

# Where each of lmtrain's gate blocks (LSTM f,i,o,g; GRU r,z,n; the RNN's one) goes in another
# library's order: ONNX wants LSTM i,o,f,c and GRU z,r,h; PyTorch LSTM i,f,g,o and GRU r,z,n.
ONNX_GATES = {"lstm": [1, 2, 0, 3], "gru": [1, 0, 2], "rnn": [0]}
TORCH_GATES = {"lstm": [1, 0, 3, 2], "gru": [0, 1, 2], "rnn": [0]}
ONNX_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class ExportError(LmtrainError):
    """An export that cannot be done as asked: unknown format, bad output path, missing extra."""


@dataclass
class Source:
    """What an exporter reads: the checkpoint's parameters (numpy, one dtype) and the model's shape."""

    params: dict
    model: object  # the checkpoint's ModelConfig
    sizes: list  # units of each recurrent layer
    vocab: object  # lmtrain.data.vocab.Vocab
    config: dict  # the checkpoint's whole resolved config

    @property
    def dtype(self):
        return self.params["embedding.weight"].dtype

    @property
    def tails(self):
        """[(projection units d_i, or None for a tied tail; words n_i)] of each adaptive tail cluster, with
        d_i = max(1, H // div^(i+1)) as docs/checkpoint-format.md gives it."""
        m, H, edges = self.model, self.sizes[-1], self.edges
        return [
            (None if m.adaptive_tie_tails else max(1, int(H // m.adaptive_div ** (i + 1))), edges[i + 1] - edges[i])
            for i in range(len(m.adaptive_cutoffs))
        ]

    @property
    def edges(self):
        """Tail cluster i holds the words [edges[i], edges[i + 1])."""
        return list(self.model.adaptive_cutoffs) + [len(self.vocab)]


def export(ckpt_path, fmt, out_path, overwrite=False, dtype=None):
    """Write the model of checkpoint ``ckpt_path`` to ``out_path`` as ``fmt`` ("onnx" or "safetensors").

    ``dtype`` ("float32" or "float64"; None: the checkpoint's) is the type of the weights written:
    onnxruntime's CPU LSTM, GRU and RNN kernels run float32 only.  Returns the path written.  Bad
    input raises an LmtrainError subclass with a one-line message.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in (None, *DTYPES):
        raise ExportError(f"unknown export dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out_path = check_output(out_path, overwrite)
    source = read_checkpoint(ckpt_path, dtype)
    require_extra(fmt)
    build = {"onnx": onnx_bytes, "safetensors": safetensors_bytes}[fmt]
    write_new(out_path, build(source), overwrite)
    return out_path


# -- reading -------------------------------------------------------------------------------------------------
# The exporter reads the checkpoint as docs/checkpoint-format.md describes it, not through the model's
# classes: the file format is the stable contract, and an export needs no model to be built.
def read_checkpoint(path, dtype=None):
    """The Source of checkpoint ``path``, its parameters in ``dtype`` (None: as stored), every shape checked."""
    ckpt = load_checkpoint(path)
    try:
        cfg = from_dict(ckpt.meta["config"])
        vocab = Vocab.from_dict(ckpt.meta["vocab"])
    except (KeyError, TypeError, ValueError, LmtrainError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{ckpt.path} has an invalid config or vocabulary: {reason}") from None
    source = make_source(cfg, vocab, dict(ckpt.params))
    check_shapes(ckpt.path, source)
    dtype = np.dtype(dtype or source.dtype)
    source.params = {name: np.asarray(value, dtype) for name, value in source.params.items()}
    return source


def make_source(cfg, vocab, params):
    """The Source of a resolved config, a Vocab and the parameters by name."""
    m = cfg.model
    sizes = [m.hidden_size] * (m.num_layers - 1) + [m.last_hidden_size or m.hidden_size]
    return Source(params, m, sizes, vocab, cfg.to_dict())


def check_shapes(path, src):
    """A one-line CheckpointError unless ``src`` has exactly the parameters its config describes."""
    m, V = src.model, len(src.vocab)
    if m.softmax == "adaptive" and m.adaptive_cutoffs[-1] >= V:
        raise CheckpointError(
            f"{path}: model.adaptive_cutoffs {m.adaptive_cutoffs} must all be below the vocabulary size, {V} words"
        )
    expected, params = parameter_shapes(src), src.params
    for name in sorted(set(expected) | set(params)):
        if name not in params:
            raise CheckpointError(f"{path} lacks parameter '{name}'")
        if name not in expected:
            raise CheckpointError(f"{path} has parameter '{name}', which its config does not describe")
        if params[name].shape != expected[name]:
            raise CheckpointError(
                f"{path}: parameter '{name}' has shape {params[name].shape}, expected "
                f"{expected[name]} (vocabulary of {V} words)"
            )


def parameter_shapes(src):
    """name -> shape of every parameter docs/checkpoint-format.md lists for ``src``'s config."""
    m, V, E, G = src.model, len(src.vocab), src.model.emb_size, GATES[src.model.cell]
    shapes = {"embedding.weight": (V, E)}
    for layer, H in enumerate(src.sizes):
        p = f"rnn.{layer}."
        D = [E, *src.sizes][layer]  # the layer's input: the embedding, then the layer below
        shapes.update({p + "weight_x": (D, G * H), p + "weight_h": (H, G * H), p + "bias": (G * H,)})
        if m.cell == "gru":
            shapes[p + "bias_h"] = (H,)
    H = src.sizes[-1]
    if m.softmax != "adaptive":
        if not m.tie_weights:
            shapes["decoder.weight"] = (H, V)
        shapes["decoder.bias"] = (V,)
        return shapes
    K, c0 = len(m.adaptive_cutoffs), m.adaptive_cutoffs[0]
    if m.tie_weights:
        shapes["adaptive.head.cluster_weight"] = (K, E)
    else:
        shapes["adaptive.head.weight"] = (H, K + c0)
    shapes["adaptive.head.bias"] = (K + c0,)
    for i, (d, n) in enumerate(src.tails):
        t = f"adaptive.tail.{i}."
        if d is not None:
            shapes.update({t + "proj": (H, d), t + "weight": (d, n)})
        shapes[t + "bias"] = (n,)
    return shapes


# -- checks and writing --------------------------------------------------------------------------------------
def check_output(path, overwrite):
    """``path`` as a string, once it is known to be writable as asked (checked again when renaming)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ExportError(f"output directory does not exist: {directory}")
    if os.path.isdir(path):
        raise ExportError(f"output is a directory, not a file: {path}")
    if os.path.exists(path) and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite to replace it")
    return path


def require_extra(fmt):
    """Import the packages ``fmt`` needs, or say how to install them."""
    module = {"onnx": "onnx", "safetensors": "safetensors.numpy"}[fmt]
    try:
        __import__(module)
    except ImportError:
        raise ExportError(f"exporting to {fmt} needs the {module.split('.')[0]} package: {INSTALL_HINT}") from None


def write_new(path, data, overwrite):
    """Write ``data`` to a temporary file in ``path``'s directory, then move it to ``path``: a crash or a
    full disk leaves no partial file under the name."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            move_unless_taken(tmp, path)
    except FileExistsError:
        raise ExportError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError as err:
        raise ExportError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def move_unless_taken(tmp, path):
    """Give ``tmp``'s file the name ``path`` unless that name exists (FileExistsError).  A hard link
    refuses an existing name atomically, so a file that appeared since ``check_output`` looked is never
    replaced; where the file system has no hard links, check, then rename."""
    try:
        os.link(tmp, path)  # ``tmp`` itself is removed by the caller
    except FileExistsError:
        raise
    except OSError:
        if os.path.exists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)


# -- shared by both formats ----------------------------------------------------------------------------------
def gate_rows(w, order):
    """lmtrain's (D, G*H) weight, or (G*H,) bias, as (G*H, D) rows (or (G*H,)) with the gate blocks in
    ``order``: lmtrain multiplies x @ W, ONNX and PyTorch W @ x."""
    H = w.shape[-1] // len(order)
    return np.concatenate([w[..., k * H : (k + 1) * H] for k in order], axis=-1).T


def recurrent_bias(src, layer):
    """The second bias ONNX and PyTorch add to the recurrent product: zero, as lmtrain has one bias,
    except the GRU's b_hn, which sits inside the reset product (its n block, last in both orders)."""
    H = src.sizes[layer]
    bias = np.zeros(src.params[f"rnn.{layer}.bias"].shape, src.dtype)
    if src.model.cell == "gru":
        bias[2 * H :] = src.params[f"rnn.{layer}.bias_h"]
    return bias


def head_rows(src):
    """The adaptive head as (K + c_0, H) rows, lmtrain's order: the K cluster rows, then the c_0 words."""
    p, c0 = src.params, src.model.adaptive_cutoffs[0]
    if src.model.tie_weights:
        return np.concatenate([p["adaptive.head.cluster_weight"], p["embedding.weight"][:c0]])
    return p["adaptive.head.weight"].T


def architecture(src):
    """What rebuilding the model needs, beyond the weights' shapes (the safetensors metadata)."""
    m = src.model
    adaptive = m.softmax == "adaptive"
    return {
        "cell": m.cell,
        "vocab_size": len(src.vocab),
        "emb_size": m.emb_size,
        "layer_sizes": src.sizes,
        "tie_weights": m.tie_weights,
        "softmax": m.softmax,
        "adaptive_cutoffs": list(m.adaptive_cutoffs) if adaptive else None,
        "adaptive_div": m.adaptive_div if adaptive else None,
        "tails": [list(t) for t in src.tails] if adaptive else None,
    }


# -- ONNX ----------------------------------------------------------------------------------------------------
class _Graph:
    """Nodes and initializers of an ONNX graph under construction, with generated names for the
    intermediate values."""

    def __init__(self, dtype):
        import onnx.helper
        import onnx.numpy_helper

        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.dtype = dtype
        self.nodes, self.initializers = [], []
        self.count = 0

    def const(self, name, value, dtype=None):
        """An initializer (in the model's dtype unless ``dtype`` says otherwise); returns its name."""
        value = np.ascontiguousarray(value, dtype or self.dtype)
        self.initializers.append(self.numpy_helper.from_array(value, name))
        return name

    def ints(self, name, values):
        return self.const(name, np.array(values, np.int64), np.int64)

    def op(self, op_type, inputs, outputs=1, **attrs):
        """Add a node; ``outputs`` is a count (names are generated) or a list of names.  Returns the
        output name, or the list of them when there are several."""
        if isinstance(outputs, int):
            self.count += 1
            outputs = [f"{op_type.lower()}_{self.count}_{k}" for k in range(outputs)]
        name = f"{op_type}_{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def slice(self, x, start, stop, axis):
        """x[start:stop] along ``axis``; the bounds are initializers, shared by the slices that repeat them."""
        key = f"{start}_{stop}_{axis}"
        names = [f"slice.{key}.{k}" for k in ("starts", "ends", "axes")]
        if names[0] not in {t.name for t in self.initializers}:
            for name, v in zip(names, (start, stop, axis)):
                self.ints(name, [v])
        return self.op("Slice", [x, *names])


def state_names(src, layer, final=False):
    """Graph names of a layer's state: h0_<l> (and c0_<l>) in, hn_<l> (and cn_<l>) out."""
    kinds = ("h", "c") if src.model.cell == "lstm" else ("h",)
    return [f"{k}{'n' if final else '0'}_{layer}" for k in kinds]


def onnx_layer(g, src, layer, x):
    """Recurrent layer ``layer`` on x (T, B, D) as one ONNX LSTM/GRU/RNN node; returns its (T, B, H) output."""
    cell, H = src.model.cell, src.sizes[layer]
    order, p = ONNX_GATES[cell], f"rnn.{layer}."
    W = g.const(p + "W", gate_rows(src.params[p + "weight_x"], order)[None])  # (1, G*H, D): one direction
    R = g.const(p + "R", gate_rows(src.params[p + "weight_h"], order)[None])
    B = g.const(
        p + "B",
        np.concatenate([gate_rows(src.params[p + "bias"], order), gate_rows(recurrent_bias(src, layer), order)])[None],
    )
    # linear_before_reset=1: the reset gate multiplies (h W_hn + b_hn), as in lmtrain, cuDNN and PyTorch
    attrs = {"linear_before_reset": 1} if cell == "gru" else {}
    y = g.op(
        ONNX_OPS[cell],
        [x, W, R, B, "", *state_names(src, layer)],
        [f"rnn_{layer}_y", *state_names(src, layer, final=True)],
        hidden_size=H,
        **attrs,
    )[0]
    return g.op("Squeeze", [y, g.ints(p + "squeeze_axes", [1])])  # Y is (T, directions, B, H)


def onnx_full_softmax(g, src, rows):
    """(N, H) rows -> (N, V) log-probabilities of the full softmax; tied, the decoder is the embedding,
    read transposed by Gemm rather than stored twice."""
    tied = src.model.tie_weights
    weight = "embedding.weight" if tied else g.const("decoder.weight", src.params["decoder.weight"])
    logits = g.op("Gemm", [rows, weight, g.const("decoder.bias", src.params["decoder.bias"])], transB=int(tied))
    return g.op("LogSoftmax", [logits], axis=1)


def onnx_adaptive_softmax(g, src, rows):
    """(N, H) rows -> (N, V) exact log-probabilities of the adaptive softmax (lmtrain/nn/adaptive.py):
    the head words' entries of the head, then each tail cluster's log-softmax plus its head entry."""
    m, p = src.model, src.params
    K, c0 = len(m.adaptive_cutoffs), m.adaptive_cutoffs[0]
    if m.tie_weights:  # the head's word rows are embedding rows: sliced from it in the graph, not copied
        cluster = g.const("adaptive.head.cluster_weight", p["adaptive.head.cluster_weight"])
        A, trans = g.op("Concat", [cluster, g.slice("embedding.weight", 0, c0, 0)], axis=0), 1
    else:
        A, trans = g.const("adaptive.head.weight", p["adaptive.head.weight"]), 0
    head = g.op("Gemm", [rows, A, g.const("adaptive.head.bias", p["adaptive.head.bias"])], transB=trans)
    head = g.op("LogSoftmax", [head], axis=1)
    parts = [g.slice(head, K, K + c0, 1)]
    for i, lo, hi in zip(range(K), src.edges[:-1], src.edges[1:]):
        t = f"adaptive.tail.{i}."
        bias = g.const(t + "bias", p[t + "bias"])
        if m.adaptive_tie_tails:  # no projection; the cluster's words are scored by their embedding rows
            z = g.op("Gemm", [rows, g.slice("embedding.weight", lo, hi, 0), bias], transB=1)
        else:
            u = g.op("MatMul", [rows, g.const(t + "proj", p[t + "proj"])])
            z = g.op("Gemm", [u, g.const(t + "weight", p[t + "weight"]), bias])
        parts.append(g.op("Add", [g.op("LogSoftmax", [z], axis=1), g.slice(head, i, i + 1, 1)]))
    return g.op("Concat", parts, axis=1)


def onnx_io(src, onnx, elem):
    """The graph's inputs and outputs (value infos), with T and B left symbolic."""
    info = onnx.helper.make_tensor_value_info
    states_in, states_out = [], []
    for layer, H in enumerate(src.sizes):
        states_in += [info(n, elem, [1, "B", H]) for n in state_names(src, layer)]
        states_out += [info(n, elem, [1, "B", H]) for n in state_names(src, layer, final=True)]
    inputs = [info("ids", onnx.TensorProto.INT64, ["T", "B"]), *states_in]
    outputs = [info("log_probs", elem, ["T", "B", len(src.vocab)]), *states_out]
    return inputs, outputs


def onnx_model(src):
    """The ONNX ModelProto of ``src``: ids (T, B) and states -> log_probs (T, B, V) and final states."""
    import onnx

    g = _Graph(src.dtype)
    x = g.op("Gather", [g.const("embedding.weight", src.params["embedding.weight"]), "ids"])  # (T, B, E)
    for layer in range(len(src.sizes)):
        x = onnx_layer(g, src, layer, x)
    rows = g.op("Reshape", [x, g.ints("rows_shape", [-1, src.sizes[-1]])])  # (T*B, H): Gemm is 2-D
    softmax = onnx_adaptive_softmax if src.model.softmax == "adaptive" else onnx_full_softmax
    logp = softmax(g, src, rows)
    out_shape = g.op("Concat", [g.op("Shape", ["ids"]), g.ints("vocab_size", [len(src.vocab)])], axis=0)
    g.op("Reshape", [logp, out_shape], ["log_probs"])
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(src.dtype))
    inputs, outputs = onnx_io(src, onnx, elem)
    graph = onnx.helper.make_graph(g.nodes, "lmtrain", inputs, outputs, g.initializers)
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="lmtrain",
        producer_version=lmtrain.__version__,
        doc_string="lmtrain language model: ids (T, B) and states -> log_probs "
        "(T, B, V) and final states; see lmtrain's docs/export.md",
    )
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(
        model,
        {
            "lmtrain.vocab": json.dumps(src.vocab.to_dict()),
            "lmtrain.architecture": json.dumps(architecture(src)),
            "lmtrain.config": json.dumps(src.config),
        },
    )
    return model


def onnx_bytes(src):
    """The serialized ONNX model of ``src``, checked by the onnx package."""
    import onnx

    size = sum(a.nbytes for a in src.params.values())
    if size > PROTOBUF_LIMIT - (64 << 20):  # leave room for the graph and the metadata
        raise ExportError(
            f"the model's {size / 2**30:.1f} GiB of weights do not fit one ONNX file "
            f"(a protobuf message stops at 2 GiB); export it as safetensors"
        )
    model = onnx_model(src)
    onnx.checker.check_model(model, full_check=True)  # also runs shape inference over the whole graph
    return model.SerializeToString()


# -- safetensors ---------------------------------------------------------------------------------------------
def torch_rnn_tensors(src):
    """Each layer as its own one-layer nn.LSTM/GRU/RNN (layers may differ in size), module ``rnns.<l>``."""
    order, out = TORCH_GATES[src.model.cell], {}
    for layer in range(len(src.sizes)):
        p, t = f"rnn.{layer}.", f"rnns.{layer}."
        out[t + "weight_ih_l0"] = gate_rows(src.params[p + "weight_x"], order)
        out[t + "weight_hh_l0"] = gate_rows(src.params[p + "weight_h"], order)
        out[t + "bias_ih_l0"] = gate_rows(src.params[p + "bias"], order)
        out[t + "bias_hh_l0"] = gate_rows(recurrent_bias(src, layer), order)
    return out


def torch_adaptive_tensors(src):
    """nn.AdaptiveLogSoftmaxWithLoss's state, module ``adaptive``, with its tails rebuilt as
    docs/export.md does: tail i is Sequential(projection or Identity, Linear with a bias).  Its head
    lists the c_0 words first, then the clusters (lmtrain: clusters first).  Tied rows are copies:
    PyTorch's head and tails are matrices of their own."""
    p, K = src.params, len(src.model.adaptive_cutoffs)

    def torch_order(a):
        return np.concatenate([a[K:], a[:K]])

    out = {
        "adaptive.head.weight": torch_order(head_rows(src)),
        "adaptive.head.bias": torch_order(p["adaptive.head.bias"]),
    }
    for i, lo, hi in zip(range(K), src.edges[:-1], src.edges[1:]):
        t = f"adaptive.tail.{i}."  # lmtrain's names and PyTorch's share this prefix
        if src.model.adaptive_tie_tails:
            out[t + "1.weight"] = p["embedding.weight"][lo:hi]
        else:
            out[t + "0.weight"] = p[t + "proj"].T
            out[t + "1.weight"] = p[t + "weight"].T
        out[t + "1.bias"] = p[t + "bias"]
    return out


def torch_tensors(src):
    """Every tensor of the PyTorch module of docs/export.md, by its state_dict name.  A tied full
    decoder is not stored: the module ties ``decoder.weight`` to ``embedding.weight`` itself."""
    p = src.params
    out = {"embedding.weight": p["embedding.weight"], **torch_rnn_tensors(src)}
    if src.model.softmax == "adaptive":
        out.update(torch_adaptive_tensors(src))
    else:
        if not src.model.tie_weights:
            out["decoder.weight"] = p["decoder.weight"].T
        out["decoder.bias"] = p["decoder.bias"]
    return {name: np.ascontiguousarray(a, src.dtype) for name, a in out.items()}


def safetensors_bytes(src):
    """The safetensors file of ``src``: the tensors of torch_tensors, everything else as string metadata."""
    from safetensors.numpy import save

    metadata = {
        "format": SAFETENSORS_FORMAT,
        "format_version": "1",
        "lmtrain_version": lmtrain.__version__,
        "architecture": json.dumps(architecture(src)),
        "vocab": json.dumps(src.vocab.to_dict()),
        "config": json.dumps(src.config),
    }
    return save(torch_tensors(src), metadata=metadata)
