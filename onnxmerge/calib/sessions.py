"""onnxruntime sessions as onnxmerge opens them: the provider that really runs, mapped weights
fed in place (``onnxmerge.weights``), and failed runs as one error line."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..choices import PROVIDERS
from ..errors import CalibrationError
from .. import weights
from ..io import model_file, too_big
from ..runtime import import_onnxruntime

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

_CUDA, _CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class Session:
    """An onnxruntime session whose ``run`` fails with one line (``CalibrationError``) instead
    of onnxruntime's own exceptions: a model that loads may still fail on data (a weight that
    does not fit its input, a shape the data breaks). ``fed``: mapped weights the graph takes
    as inputs, added to every run's feed and left out of ``get_inputs``. Everything else is the
    session's."""

    def __init__(self, session: onnxruntime.InferenceSession, fed: dict[str, np.ndarray] | None = None,
                 keep: list | None = None):
        self._session = session
        self._fed = fed or {}
        self._keep = keep  # values onnxruntime reads for as long as the session lives

    def run(self, names, feed, *args, **kwargs):
        with _run_errors():
            return self._session.run(names, {**feed, **self._fed}, *args, **kwargs)

    def run_bound(self, feed: dict[str, np.ndarray], inputs: dict[str, onnxruntime.OrtValue],
                  outputs: dict[str, onnxruntime.OrtValue]) -> None:
        """One run through an IOBinding: host arrays ``feed`` and OrtValues ``inputs`` (on
        any device) in, the results written into the OrtValues ``outputs``, which stay where
        they are (``calib.device``)."""
        binding = self._session.io_binding()
        for name, value in {**feed, **self._fed}.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        with _run_errors():
            self._session.run_with_iobinding(binding)

    def get_inputs(self):
        return [i for i in self._session.get_inputs() if i.name not in self._fed]

    def __getattr__(self, name: str):
        return getattr(self._session, name)


@contextmanager
def _run_errors():
    """A failed run as one line (``CalibrationError``)."""
    try:
        yield
    except Exception as error:  # onnxruntime's error classes share no base but Exception
        raise CalibrationError(f"onnxruntime failed running the model ({first_line(error)}); check that "
                               "the model runs in onnxruntime and that the data fits its inputs") from error


def open_session(model: onnx.ModelProto, provider: str, *,
                 threads: int | None = None) -> tuple[Session, str]:
    """An inference session and the provider that really runs it.

    ``auto`` uses CUDA when a session actually runs on it and falls back to CPU; ``cuda``
    raises when it does not. onnxruntime silently falls back to CPU when CUDA is requested
    without a usable GPU, so the answer comes from ``session.get_providers()``. ``threads``
    caps onnxruntime's intra-op threads (default: one per physical core), e.g. to the CPUs a
    Ray task holds. Mapped weights (``onnxmerge.weights``) are given as initializers, which
    onnxruntime copies (to the GPU, or on the CPU beside their memory maps); on the CPU, from
    ``weights.FEED_MIN_BYTES`` on, they are read in place instead, as inputs fed with every run.
    """
    if provider not in PROVIDERS:
        raise CalibrationError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    onnxruntime = import_onnxruntime()  # an extra: without it, one error line names what to install
    if too_big(model):  # past protobuf's limit: onnxruntime reads a file with external data
        with model_file(model) as path:
            return _session(onnxruntime, lambda _: (path, _options(onnxruntime, threads), None, None), provider)
    return _session(onnxruntime, lambda where: _source(onnxruntime, model, where, threads), provider)


def _options(onnxruntime, threads: int | None):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run raises, and its error line is ours
    # spinning worker threads would compete with numpy for the cores between runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def _source(onnxruntime, model: onnx.ModelProto, where: str, threads: int | None):
    """(serialized model, session options, weights to feed, values the session must keep) of
    ``model`` for a session on ``where`` (cpu or cuda), its mapped weights as ``open_session`` says."""
    options = _options(onnxruntime, threads)
    if not weights.has_mapped(model):
        return model.SerializeToString(), options, None, None
    if where == "cuda" or weights.mapped_bytes(model) < weights.FEED_MIN_BYTES:
        shell, names, arrays = weights.session_parts(model)
        values = [onnxruntime.OrtValue.ortvalue_from_numpy(array) for array in arrays]
        options.add_external_initializers(names, values)
        return shell.SerializeToString(), options, None, values
    shell, fed = weights.as_inputs(model)
    # models this large: memory over allocation speed (the arena keeps a run's peak of buffers)
    options.enable_cpu_mem_arena = False
    return shell.SerializeToString(), options, fed, None


def _session(onnxruntime, source, provider: str) -> tuple[Session, str]:
    """open_session's session: ``source(where)`` gives (serialized model or path, options,
    weights to feed, values to keep) for a session on ``where``, cuda or cpu."""
    if cuda_asked(provider):
        data, options, fed, keep = source("cuda")
        try:
            session = onnxruntime.InferenceSession(data, options, providers=[_CUDA, _CPU])
        except Exception as error:  # onnxruntime's error classes share no base but Exception
            if provider == "cuda":
                raise CalibrationError(f"onnxruntime cannot run the model on CUDA ({first_line(error)}); "
                                       "use --provider cpu or auto") from error
            log.warning("onnxruntime cannot run the model on CUDA (%s); running on CPU", first_line(error))
        else:
            if session.get_providers()[0] == _CUDA:
                return Session(session, fed, keep), "cuda"
    if provider == "cuda":
        raise CalibrationError("the CUDA provider is not usable here (onnxruntime-gpu and a GPU are needed); "
                               "use --provider cpu or auto")
    data, options, fed, keep = source("cpu")
    try:
        return Session(onnxruntime.InferenceSession(data, options, providers=[_CPU]), fed, keep), "cpu"
    except Exception as error:
        raise CalibrationError(f"onnxruntime cannot run the model ({first_line(error)}); "
                               "check it with onnx.checker and onnxruntime") from error


def require_finite(values: dict[str, np.ndarray], model: int | None = None) -> None:
    """Refuse NaN or infinite activations: statistics, correlations and CKA of them are NaN.
    ``model`` is the model's position (None: tensor names carry it, ``m<i>_``)."""
    for name, value in values.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            where = f"model {model} (in command-line order from 0)" if model is not None else "a model"
            raise CalibrationError(f"tensor {name!r} of {where} holds NaN or infinite values on the calibration "
                                   "data (the data holds them, or huge weights overflow); check the data and "
                                   "the model's weights")


def first_line(error: BaseException) -> str:
    """An error's first line of text, or its type's name (what a one-line message quotes)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def cuda_asked(provider: str) -> bool:
    """Whether ``provider`` asks for CUDA where onnxruntime has it."""
    return provider in ("auto", "cuda") and _CUDA in import_onnxruntime().get_available_providers()
