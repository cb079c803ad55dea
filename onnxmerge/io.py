"""Reading and writing ONNX model files.
(Long because untrusted files need many checks: each is a few lines, and they belong together.)

``load_model`` treats every file as untrusted: it refuses anything that is not a complete,
checkable ONNX model, external data that points outside the model's folder or past the end
of its file, and IR or opset versions the installed onnx cannot handle. The model it returns
is self-contained in memory. ``save_model`` writes atomically: a failed save leaves nothing
at or beside the target. Neither function modifies its input (file or ``ModelProto``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper, numpy_helper

from . import weights
from .errors import InvalidModelError, OnnxMergeError, UnsupportedGraphError

# Protobuf cannot serialize (or parse) a message of 2 GiB or more; bigger models need external data.
# Read at each use (too_big), so that tests can lower it to send small models down the large path.
PROTOBUF_LIMIT = 2**31 - 1
# Per entry of a repeated or length-delimited field: its tag and length varints at most.
_FIELD_OVERHEAD = 16
# Tensors smaller than this stay inside the model file when saving with external data
# (onnx's own default threshold): moving tiny tensors out saves nothing.
EXTERNAL_DATA_THRESHOLD = 1024
# Tensors of at least ALIGN_THRESHOLD bytes start at an ALIGNMENT-byte offset in the sidecar so
# onnxruntime can memory-map them (64 KiB is the largest common allocation granularity).
ALIGN_THRESHOLD = 1 << 20
ALIGNMENT = 1 << 16
# Oldest default-domain opset accepted: older ones predate the op semantics graph/rules.py knows.
MIN_OPSET = 7
_DEFAULT_DOMAINS = ("", "ai.onnx")
_HASH_CHUNK = 1 << 20
_MESSAGE_DETAIL = 200


def _current_umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, not per save.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _detail(error: BaseException) -> str:
    """An exception as one short line: error messages here must stay single-line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _MESSAGE_DETAIL else text[: _MESSAGE_DETAIL - 3] + "..."


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto a graph holds: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _iter_node_tensors(graph.node)


def _iter_node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    """Tensors in node attributes (Constant values and the like), recursing into subgraphs."""
    for node in nodes:
        for attribute in node.attribute:
            tensors = list(attribute.tensors) + [attribute.t] * attribute.HasField("t")
            sparse = list(attribute.sparse_tensors) + [attribute.sparse_tensor] * attribute.HasField(
                "sparse_tensor")
            subgraphs = list(attribute.graphs) + [attribute.g] * attribute.HasField("g")
            yield from tensors
            for tensor in sparse:
                yield from (tensor.values, tensor.indices)
            for subgraph in subgraphs:
                yield from _iter_graph_tensors(subgraph)


def _iter_model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model, including those inside local functions."""
    yield from _iter_graph_tensors(model.graph)
    for function in model.functions:
        yield from _iter_node_tensors(function.node)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _read_model_proto(name: str) -> onnx.ModelProto:
    """Parse the file at ``name`` without touching any external data."""
    if not os.path.exists(name):
        raise InvalidModelError(f"{name}: file not found; check the path")
    if not os.path.isfile(name):
        raise InvalidModelError(f"{name}: not a regular file; pass the path of an .onnx file")
    size = os.path.getsize(name)
    if size > PROTOBUF_LIMIT:
        raise InvalidModelError(f"{name}: the file is {size} bytes, over protobuf's {PROTOBUF_LIMIT}-byte "
                                "limit; re-export the model with its weights in external data")
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as error:
        raise InvalidModelError(f"{name}: cannot read the file ({_detail(error)}); "
                                "check its permissions") from error
    if not data:
        raise InvalidModelError(f"{name}: the file is empty; check the file is a complete .onnx export")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise InvalidModelError(f"{name}: not an ONNX model (protobuf parse failed: {_detail(error)}); "
                                "check the file is a complete .onnx export") from error
    # Random bytes and cut files can still parse as protobuf; a real model has both of these.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InvalidModelError(f"{name}: not an ONNX model (no IR version or no graph); "
                                "check the file is a complete .onnx export")
    where = _not_utf8(model)
    if where is not None:
        raise InvalidModelError(f"{name}: not an ONNX model (the string field {where} is not UTF-8 text); "
                                "check the file is a complete, uncorrupted .onnx export")
    return model


def _not_utf8(message) -> str | None:
    """The first string field of a parsed message that is not UTF-8 text (``NodeProto.name``),
    or None. Protobuf decodes strings only when read (as bytes, or raising, when they are not
    text), so a corrupt byte would otherwise surface anywhere later; bytes fields (tensor data)
    are not read."""
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            try:
                value = getattr(message, field.name)
                values = list(value) if _repeated(field) else [value]
            except UnicodeDecodeError:
                values = [b""]
            if any(isinstance(v, bytes) for v in values):
                return f"{message.DESCRIPTOR.name}.{field.name}"
        elif field.type == field.TYPE_MESSAGE:
            children = getattr(message, field.name) if _repeated(field) else (
                [getattr(message, field.name)] if message.HasField(field.name) else [])
            for child in children:
                where = _not_utf8(child)
                if where is not None:
                    return where
    return None


def _repeated(field) -> bool:
    # protobuf 6 has is_repeated and dropped label; older versions have only label
    repeated = getattr(field, "is_repeated", None)
    return field.label == field.LABEL_REPEATED if repeated is None else bool(repeated)


def _check_versions(name: str, model: onnx.ModelProto) -> None:
    """Refuse IR and default-domain opset versions outside what the installed onnx supports."""
    if model.ir_version > onnx.IR_VERSION:
        raise UnsupportedGraphError(
            f"{name}: IR version {model.ir_version} is newer than this onnx {onnx.__version__} supports "
            f"(IR versions up to {onnx.IR_VERSION}); upgrade onnx or re-export with an older IR version")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS and not MIN_OPSET <= opset.version <= newest:
            raise UnsupportedGraphError(
                f"{name}: default-domain opset {opset.version} is outside the supported range "
                f"{MIN_OPSET}..{newest}; re-export the model with an opset in that range")


def _external_info(name: str, tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length) of an external tensor, or InvalidModelError when malformed."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError as error:
        raise InvalidModelError(f"{name}: tensor {tensor.name!r} has a non-integer external offset or "
                                "length; re-export the model with onnx.save_model") from error
    if not location or offset < 0 or (length is not None and length < 0):
        raise InvalidModelError(f"{name}: tensor {tensor.name!r} has an invalid external data entry "
                                f"(location {location!r}, offset {offset}, length {length}); "
                                "re-export the model with onnx.save_model")
    return location, offset, length


def _resolve_inside(folder: str, location: str) -> str | None:
    """The real path of ``location`` under ``folder``, or None if it leaves the folder."""
    # A model must not make us read arbitrary files: only relative paths that, after resolving
    # symlinks and "..", stay inside the folder of the model file.
    if os.path.isabs(location):
        return None
    try:
        real_folder = os.path.realpath(folder)
        target = os.path.realpath(os.path.join(real_folder, location))
        return target if os.path.commonpath([real_folder, target]) == real_folder else None
    except ValueError:  # a NUL byte in the location, or (Windows) another drive
        return None


def _check_external(name: str, tensor: onnx.TensorProto, folder: str) -> None:
    """Refuse external data outside the model's folder, missing, or past the end of its file."""
    location, offset, length = _external_info(name, tensor)
    where = f"{name}: tensor {tensor.name!r} external data {location!r}"
    target = _resolve_inside(folder, location)
    if target is None:
        raise InvalidModelError(f"{where} is outside the model's folder; refusing to read it, "
                                "keep external data files beside the model")
    if not os.path.isfile(target):
        raise InvalidModelError(f"{where} not found; copy the data file beside the model")
    size = os.path.getsize(target)
    end = offset + (length if length is not None else 0)
    if offset > size or end > size:
        raise InvalidModelError(f"{where}: offset {offset} + length {length or 0} is past the end of "
                                f"the {size}-byte file; the data file is truncated or belongs to "
                                "another model")


def _load_external(name: str, model: onnx.ModelProto) -> None:
    """Check every external tensor of ``model``, then read the small ones and the subgraphs'
    into memory; the main graph's large initializers stay in their files (``weights``)."""
    folder = os.path.dirname(os.path.abspath(name))
    external = [tensor for tensor in _iter_model_tensors(model) if _is_external(tensor)]
    for tensor in external:
        _check_external(name, tensor, folder)
    main = {id(init) for init in model.graph.initializer}
    for tensor in external:
        if id(tensor) in main and weights.stays_mapped(tensor):
            _check_mapped_size(name, tensor)
            weights.map_external(tensor, folder)
            continue
        try:
            external_data_helper.load_external_data_for_tensor(tensor, folder)
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise InvalidModelError(f"{name}: cannot read external data of tensor {tensor.name!r} "
                                    f"({_detail(error)}); keep the data file beside the model as a "
                                    "regular file") from error


def _check_mapped_size(name: str, tensor: onnx.TensorProto) -> None:
    """Refuse an external tensor whose byte length is not what its type and dims take."""
    length = _external_info(name, tensor)[2]
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize \
        if tensor.data_type in weights.RAW_LAYOUT else None
    whole = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if itemsize is not None and length != whole * itemsize:
        raise InvalidModelError(f"{name}: tensor {tensor.name!r} ({_type_text(tensor.data_type)}, dims "
                                f"{list(tensor.dims)}) has {length} bytes of external data, not {whole * itemsize}; "
                                "the data file is corrupt or belongs to another model, re-export the model")


def _check_tensors(name: str, model: onnx.ModelProto) -> None:
    """Refuse a tensor whose data does not decode as its type and dims say (onnx.checker does
    not compare them): a wrong count of values, an unknown data type. Mapped tensors were
    checked by their byte length at load."""
    for tensor in _iter_model_tensors(model):
        if weights.is_mapped(tensor):
            continue
        try:
            array = numpy_helper.to_array(tensor)
            whole = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
            fits = array.size == whole
        except Exception as error:  # numpy and onnx raise several types for bad data
            fits, array = False, error
        if not fits:
            shape = list(tensor.dims)
            got = f"{array.size} values" if isinstance(array, np.ndarray) else _detail(array)
            raise InvalidModelError(f"{name}: tensor {tensor.name!r} ({_type_text(tensor.data_type)}, dims {shape}) "
                                    f"does not hold its data ({got}); the file is corrupt, re-export the model")


def _type_text(data_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()
    except (KeyError, ValueError):
        return f"unknown data type {data_type}"


def _check_model(name: str, model: onnx.ModelProto, path: str | None = None) -> None:
    """onnx.checker's full check (strict shape and type inference) on the self-contained model,
    then what the checker lets through but onnxruntime refuses or nothing can use: a graph with
    no outputs, two nodes of one name, a tensor whose data does not fit its dims. ``path``: the
    file the model was read from, which the checker re-reads when the model is too big for it."""
    try:
        check_model(model, path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        raise InvalidModelError(f"{name}: not a valid ONNX model (onnx.checker: {_detail(error)}); "
                                "check the file is a complete, valid .onnx export") from error
    if not model.graph.output:
        raise InvalidModelError(f"{name}: the graph has no outputs, so it computes nothing; "
                                "export the model with its outputs")
    seen: dict[str, str] = {}
    for node in model.graph.node:
        if node.name and node.name in seen:
            raise InvalidModelError(f"{name}: two nodes are named {node.name!r} ({seen[node.name]} and "
                                    f"{node.op_type}), which onnxruntime refuses; give every node its own name")
        seen.setdefault(node.name, node.op_type)
    _check_tensors(name, model)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put the graph's nodes in topological order, keeping the file's order where it is one.

    Some writers append nodes after their consumers (onnxconverter-common's float16 conversion
    adds its input and output Casts at the end): onnxruntime runs such files, onnx.checker
    refuses them. A cycle is left as it is, for the checker to report.
    """
    nodes = list(graph.node)
    producers = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    needs = [{producers[name] for name in _reads(node) if name in producers} - {index}
             for index, node in enumerate(nodes)]
    if all(index > need for index, node_needs in enumerate(needs) for need in node_needs):
        return
    waiting = [len(node_needs) for node_needs in needs]
    users: list[list[int]] = [[] for _ in nodes]
    for index, node_needs in enumerate(needs):
        for need in node_needs:
            users[need].append(index)
    ready = [index for index, count in enumerate(waiting) if not count]
    order = []
    while ready:  # Kahn's algorithm, always taking the earliest ready node
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) == len(nodes):
        ordered = [onnx.NodeProto() for _ in order]
        for copy, index in zip(ordered, order):
            copy.CopyFrom(nodes[index])  # copied before the field they live in is cleared
        del graph.node[:]
        graph.node.extend(ordered)


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The names a node reads, including those its subgraphs read from the enclosing graph."""
    yield from node.input
    for attribute in node.attribute:
        for subgraph in list(attribute.graphs) + [attribute.g] * attribute.HasField("g"):
            for inner in subgraph.node:
                yield from _reads(inner)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version; 1 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an untrusted ONNX file into a self-contained, checked ``ModelProto``.

    External data is only read from files inside the model's folder and within their size;
    it is loaded into memory, so the returned model has no external references.
    The file is never modified.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The model, with all tensor data in memory.

    Raises:
        InvalidModelError: the file is missing, unreadable, not a (complete) ONNX model, fails
            ``onnx.checker``'s full check (strict shape and type inference), has no outputs,
            two nodes of one name or a tensor whose data does not fit its dims, or has
            unsafe, missing or truncated external data.
        UnsupportedGraphError: the IR version or the default-domain opset is outside what the
            installed onnx supports (opsets ``MIN_OPSET`` up to ``onnx.defs.onnx_opset_version()``).
    """
    name = os.fspath(path)
    model = _read_model_proto(name)
    _check_versions(name, model)
    _load_external(name, model)
    _sort_nodes(model.graph)
    # Checked only now: the checker resolves external locations against the working directory.
    _check_model(name, model, name)
    return model


def check_loaded_model(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
    """The checks of ``load_model`` on a copy of a model already in memory (the Python API's
    input); the copy, sorted (the caller's model stays as it is).

    Raises:
        InvalidModelError: tensors refer to external data that is not loaded, or the model
            fails ``onnx.checker``.
        UnsupportedGraphError: the IR version or the default-domain opset is not supported.
    """
    _check_in_memory(name, model)
    where = _not_utf8(model)
    if where is not None:
        raise InvalidModelError(f"{name}: the string field {where} is not UTF-8 text; give names as text")
    _check_versions(name, model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _sort_nodes(copy.graph)
    _check_model(name, copy)
    return copy


def model_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the model file at ``path`` followed by its external-data files (in order
    of their paths), streamed: a changed weights file changes it as a changed model file does.
    A model without external data gets its file's sha256.

    Raises:
        InvalidModelError: a file cannot be read.
    """
    digest = hashlib.sha256()
    for name in (os.fspath(path), *sorted(_external_files(path))):
        try:
            with open(name, "rb") as file:
                for chunk in iter(lambda: file.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
        except OSError as error:
            raise InvalidModelError(f"{name}: cannot read the file ({_detail(error)}); "
                                    "check the path and its permissions") from error
    return digest.hexdigest()


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes | None:
    """The tensor's data as raw bytes, or None if it cannot be stored externally (strings)."""
    if weights.is_mapped(tensor):
        return weights.raw_bytes(tensor)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    # Typed fields (float_data, int32_data, ...) have no raw form; numpy_helper converts them.
    array = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(np.ascontiguousarray(array), tensor.name).raw_data


def _iter_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of a graph and of its subgraphs: the tensors external data is for."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] * attribute.HasField("g") + list(attribute.graphs)
            for subgraph in subgraphs:
                yield from _iter_initializers(subgraph)


def _write_sidecar(model: onnx.ModelProto, file: BinaryIO, location: str) -> onnx.ModelProto:
    """Write the large initializers of ``model`` into the open binary ``file``; the model to
    save beside it, whose moved tensors refer to ``location`` with their offset and length.

    ``model`` is not modified and never copied whole: the result is built from its weightless
    shell and one initializer at a time, so saving needs memory for one tensor, not a model.
    """
    offset = 0

    def place(tensor: onnx.TensorProto, target: onnx.TensorProto) -> None:
        """``tensor`` into ``target``, its data moved to the sidecar when large."""
        nonlocal offset
        data = _tensor_bytes(tensor)
        if data is None or len(data) < EXTERNAL_DATA_THRESHOLD:
            if target is not tensor:
                target.CopyFrom(tensor)
            return
        if len(data) >= ALIGN_THRESHOLD:
            padding = -offset % ALIGNMENT
            file.write(b"\0" * padding)
            offset += padding
        file.write(data)
        if target is not tensor:
            _copy_fields(tensor, target, _DATA_FIELDS)
        for field in _DATA_FIELDS:
            target.ClearField(field)
        for key, value in (("location", location), ("offset", offset), ("length", len(data))):
            target.external_data.add(key=key, value=str(value))
        target.data_location = onnx.TensorProto.EXTERNAL
        offset += len(data)

    copy = onnx.ModelProto()
    _copy_fields(model, copy, ("graph",))
    _copy_fields(model.graph, copy.graph, ("initializer",))  # everything but the main graph's weights
    for tensor in model.graph.initializer:
        place(tensor, copy.graph.initializer.add())
    for node in copy.graph.node:  # subgraphs' initializers: in the copy already, moved in place
        for attribute in node.attribute:
            for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                for tensor in _iter_initializers(subgraph):
                    place(tensor, tensor)
    return copy


def _copy_fields(source, target, skip: tuple[str, ...]) -> None:
    """Copy the set fields of protobuf message ``source`` into ``target``, except ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if _repeated(field):
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                "external_data", "data_location")


def _write_temp(target: str, write: Callable[[BinaryIO], object], temps: list[str]) -> str:
    """Call ``write(file)`` on a new temporary file beside ``target``, flushed to disk; its path.

    The file is in the target's folder so that ``os.replace`` is an atomic rename; its path is
    added to ``temps`` before anything can fail, for the caller to clean up.
    """
    folder, base = os.path.split(target)
    fd, temp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder or ".")
    temps.append(temp)
    with os.fdopen(fd, "wb") as file:
        os.chmod(temp, _FILE_MODE)  # mkstemp makes it owner-only; give it an ordinary file's mode
        write(file)
        file.flush()
        os.fsync(file.fileno())
    return temp


def _check_in_memory(name: str, model: onnx.ModelProto) -> None:
    """Refuse a model whose tensors still point at external files: saving would lose their data."""
    for tensor in _iter_model_tensors(model):
        if _is_external(tensor) and not weights.is_mapped(tensor):
            raise InvalidModelError(f"{name}: tensor {tensor.name!r} still refers to external data "
                                    "that is not loaded; load the model with onnxmerge.io.load_model")


def _plan(name: str, model: onnx.ModelProto, external_data: bool | None) -> bool:
    """Whether to save with external data; refuses a single file protobuf cannot hold. A model
    with mapped tensors (``weights``) is saved with external data unless told otherwise."""
    mapped = [tensor for tensor in model.graph.initializer if weights.is_mapped(tensor)]
    size = serialized_size(model) + sum(weights.length(tensor) + _FIELD_OVERHEAD for tensor in mapped)
    if external_data is None:
        return size > PROTOBUF_LIMIT or bool(mapped)
    if not external_data and size > PROTOBUF_LIMIT:
        raise OnnxMergeError(f"{name}: the model is {size} bytes, over protobuf's {PROTOBUF_LIMIT}-byte "
                             "limit for one file; save with external_data=True or None")
    return external_data


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically; ``model`` is not modified.

    Everything is written to temporary files beside the target first and moved into place
    with ``os.replace``: after a failure nothing is left at or beside the target (an older
    file there stays as it was, except that its sidecar may be gone).

    Args:
        model: a self-contained model (no tensor referring to unloaded external data).
        path: the output ``.onnx`` file; its folder must exist.
        external_data: True puts initializers of at least ``EXTERNAL_DATA_THRESHOLD`` bytes into
            one sidecar ``<file name>.data`` beside the output, which the model names by that
            relative name; False writes one file; None (default) uses external data only when
            one file would exceed ``PROTOBUF_LIMIT``.

    Raises:
        InvalidModelError: a tensor still refers to unloaded external data.
        OnnxMergeError: the file cannot be written, or is too large for protobuf.
    """
    name = os.fspath(path)
    _check_in_memory(name, model)
    temps: list[str] = []
    placed: list[str] = []
    try:
        if _plan(name, model, external_data):
            sidecar = name + ".data"
            location = os.path.basename(sidecar)
            written: list[onnx.ModelProto] = []
            sidecar_temp = _write_temp(sidecar, lambda file: written.append(_write_sidecar(model, file, location)),
                                       temps)
            copy = written[0]
            _check_fits(name, copy)
            model_temp = _write_temp(name, lambda file: file.write(copy.SerializeToString()), temps)
            os.replace(sidecar_temp, sidecar)
            placed.append(sidecar)
        else:
            whole = weights.self_contained(model)
            model_temp = _write_temp(name, lambda file: file.write(whole.SerializeToString()), temps)
        os.replace(model_temp, name)
        placed.clear()
    except OSError as error:
        raise OnnxMergeError(f"{name}: cannot write the model ({_detail(error)}); "
                             "check the folder exists, is writable and has free space") from error
    finally:
        # Whatever did not reach its final place (and a sidecar without its model) is removed.
        for leftover in temps + placed:
            _remove_quietly(leftover)


def _check_fits(name: str, model: onnx.ModelProto) -> None:
    """Refuse a model that exceeds protobuf's limit even with its large tensors moved out."""
    size = serialized_size(model)
    if size > PROTOBUF_LIMIT:
        raise OnnxMergeError(f"{name}: even with external data the model is {size} bytes, over "
                             f"protobuf's {PROTOBUF_LIMIT}-byte limit (too many small tensors or "
                             "nodes); lower onnxmerge.io.EXTERNAL_DATA_THRESHOLD or split the model")


def _remove_quietly(path: str) -> None:
    """Best-effort cleanup: a file that cannot be removed must not hide the original error."""
    try:
        os.remove(path)
    except OSError:
        pass


def check_writable(path: str | os.PathLike, what: str, taken: Sequence[str | os.PathLike | None] = ()) -> None:
    """Raise unless ``path``'s folder exists and is writable, ``path`` is no folder and no other
    non-regular file (``/dev/null``, a FIFO), and it is none of the files in ``taken`` (the
    command's inputs and other outputs, compared by real path and by inode, so links count):
    checked before a command works, so that it fails at once, never overwrites an input and
    never leaves some of its outputs written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OnnxMergeError(f"{path}: cannot write the {what}: the folder {folder} does not exist or is not "
                             "writable; create it or choose another path")
    if os.path.isdir(path):
        raise OnnxMergeError(f"{path}: cannot write the {what}: it is a folder; give a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        # a device, FIFO or socket: the atomic save would replace it with a regular file
        raise OnnxMergeError(f"{path}: cannot write the {what}: it exists and is not a regular file (a device, "
                             "pipe or socket); give the path of a regular file")
    for other in (t for t in taken if t is not None):
        for read in (other, *_external_files(other)):
            if _same_file(path, read):
                raise OnnxMergeError(f"{path}: the {what} would overwrite {read}, which the command reads or "
                                     "writes; choose another output path")


def _external_files(path: str | os.PathLike) -> tuple[str, ...]:
    """The external-data files an ``.onnx`` input reads (inside its folder), so that no output
    replaces them; none for other files, or for a model that cannot be parsed (its load
    reports that). A command checks each output against each input: the file is parsed once
    while it stays unchanged."""
    name = os.fspath(path)
    if not name.endswith(".onnx") or not os.path.isfile(name) or os.path.getsize(name) > PROTOBUF_LIMIT:
        return ()
    status = os.stat(name)
    return _external_files_of(os.path.realpath(name), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=64)
def _external_files_of(name: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """``_external_files`` of the file ``name`` as it is at ``mtime_ns`` and ``size`` (the key)."""
    try:
        model = _read_model_proto(name)
    except OnnxMergeError:
        return ()
    folder = os.path.dirname(name)
    locations = {entry.value for tensor in _iter_model_tensors(model) if _is_external(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    return tuple(target for target in (_resolve_inside(folder, location) for location in locations) if target)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def write_atomically(path: str | os.PathLike, write: Callable[[str], object], what: str) -> None:
    """Call ``write`` on a temporary file beside ``path`` (``.<name>.XXXX.tmp``, as models are
    written), then move it into place: the file appears complete or not at all, with the mode
    of any file the user creates (0666 less the umask), and the temporary file is removed
    whatever goes wrong, an interrupt included."""
    folder, base = os.path.split(os.path.abspath(path))
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
        os.close(handle)
        os.chmod(temporary, _FILE_MODE)  # mkstemp makes it owner-only; give it an ordinary file's mode
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise OnnxMergeError(f"{path}: cannot write the {what} ({_detail(error)}); check the folder exists, "
                             "is writable and has free space") from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def serialized_size(model: onnx.ModelProto) -> int:
    """An upper bound, within a few bytes per tensor and node, of the size of ``model``
    serialized, computed piece by piece: protobuf's own ``ByteSize`` serializes the whole
    message (a copy of the model) and raises past ``PROTOBUF_LIMIT``."""
    return _size_of(model, 2)


def _size_of(message, depth: int) -> int:
    """The model and its graph field by field (``depth`` levels), anything below as a whole."""
    if depth == 0:
        try:
            return message.ByteSize()
        except EncodeError:  # one tensor or node over the limit
            return PROTOBUF_LIMIT + 1
    total = 0
    for field, value in message.ListFields():
        items = list(value) if _repeated(field) else [value]
        for item in items:
            if field.type == field.TYPE_MESSAGE:
                size = _size_of(item, depth - 1 if isinstance(item, (onnx.ModelProto, onnx.GraphProto)) else 0)
            elif isinstance(item, (bytes, str)):
                size = len(item.encode() if isinstance(item, str) else item)
            else:
                size = 0
            total += size + _FIELD_OVERHEAD
    return total


def too_big(model: onnx.ModelProto) -> bool:
    """Whether ``model`` cannot be one protobuf message (over ``PROTOBUF_LIMIT``): then it cannot
    be serialized to bytes, parsed, handed to onnxruntime as bytes or to onnx.checker and shape
    inference in memory; ``model_file`` gives a path they can read instead."""
    return serialized_size(model) > PROTOBUF_LIMIT


@contextlib.contextmanager
def model_file(model: onnx.ModelProto) -> Iterator[str]:
    """The path of ``model`` saved with external data in a private temporary folder, removed
    on exit: what onnxruntime, onnx.checker and shape inference read when the model is
    ``too_big`` for one protobuf message. ``model`` is not modified."""
    with tempfile.TemporaryDirectory(prefix="onnxmerge-") as folder:
        path = os.path.join(folder, "model.onnx")
        save_model(model, path, external_data=True)
        yield path


def check_model(model: onnx.ModelProto, path: str | None = None) -> None:
    """``onnx.checker.check_model(model, full_check=True)`` for a model of any size: in memory
    when it fits one protobuf message, else by path: ``path`` when the model was just read from
    it unchanged, a temporary copy (``model_file``) otherwise.

    Raises:
        onnx.checker.ValidationError, onnx.shape_inference.InferenceError: as the checker does.
    """
    mapped = weights.has_mapped(model)
    if not too_big(model) and not mapped:
        onnx.checker.check_model(model, full_check=True)
    elif path is not None:
        onnx.checker.check_model(path, full_check=True)
    elif mapped and not too_big(model):
        with _checkable(model) as temporary:
            onnx.checker.check_model(temporary, full_check=True)
    else:
        with model_file(model) as temporary:
            onnx.checker.check_model(temporary, full_check=True)


@contextlib.contextmanager
def _checkable(model: onnx.ModelProto) -> Iterator[str]:
    """The path of a copy of ``model`` for onnx.checker, whose mapped tensors refer to sparse
    files of their files' sizes in a private temporary folder: the checker reads the graph,
    and checks each external tensor's file and range, but not its values (which were checked
    when read or computed), so nothing is copied."""
    with tempfile.TemporaryDirectory(prefix="onnxmerge-") as folder:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # mapped tensors hold no data
        names: dict[str, str] = {}
        for init in copy.graph.initializer:
            if not weights.is_mapped(init):
                continue
            for entry in init.external_data:
                if entry.key == "location":
                    if entry.value not in names:
                        names[entry.value] = f"data{len(names)}"
                        with open(os.path.join(folder, names[entry.value]), "wb") as file:
                            file.truncate(os.path.getsize(entry.value))
                    entry.value = names[entry.value]
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as file:
            file.write(copy.SerializeToString())
        yield path


def model_sha256_in_memory(model: onnx.ModelProto) -> str:
    """Hex sha256 of ``model`` serialized; of its model file and sidecar (``model_file``) when
    it is ``too_big`` to serialize or has mapped tensors (``weights``)."""
    if not too_big(model) and not weights.has_mapped(model):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    digest = hashlib.sha256()
    with model_file(model) as path:
        for name in (path, path + ".data"):
            with open(name, "rb") as file:
                for chunk in iter(lambda: file.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
    return digest.hexdigest()
