"""Calibration statistics on Ray: ``--ray [ADDRESS]`` of merge and calibrate (docs/scale.md).

This process (the driver) reads and checks the models and the data and plans the captures as a
run in one process does; then it splits the calibration samples into shards of whole batches
(sample ranges), puts the canonical models into Ray's object store once and runs one task per
shard. Data read from files (one or several, ``--calib a.npz b.npz``) is sent as the files'
paths and each one's sample range (``files.Piece``): the task reads its samples itself,
memory-mapped, so the workers must see the files at the same paths (shared storage); arrays
given in memory are sent as the shard's rows. A task (``shard_statistics``) opens its own
onnxruntime session on its worker (``--provider`` as given, as many intra-op threads as the
CPUs the task holds) and streams its shard through ``collect_statistics``, the function a run
in one process calls; the shards' ``SpaceStats`` come back and are added in shard order
(``combine_stats``: counts, sums and outer products add). Since shards start at batch
boundaries, every batch is the one a run in one process feeds, and the result differs from
that run's only by the order of the float64 additions (about 1e-16 relative). For
``calibrate`` each task also measures REPAIR's source moments on its shard (``source_moments``,
as in one process), pooled in shard order as well.

Ray is imported here only, and only when asked (``pip install 'onnxmerge[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import onnx

from ..runtime import import_optional
from .. import weights
from ..errors import CalibrationError, MissingDependencyError, OnnxMergeError, RecipeError, UnsupportedGraphError
from ..progress import progress
from .capture import CaptureUnit, collect_statistics
from .sessions import first_line
from .channels import Tensors, source_moments
from .data import CalibrationSet
from .stats import SourceMoments, SpaceStats, combine_moments, combine_stats

if TYPE_CHECKING:
    from ..options import MergeOptions

log = logging.getLogger(__name__)

INSTALL = "pip install 'onnxmerge[ray]'"
LOCAL = "local"
"""The address that starts a Ray instance on this machine (and shuts it down after)."""

_holding = False  # inside held(): a Ray instance onnxmerge started stays until the block ends
_owned = False  # the Ray instance (or connection) of this process was started by onnxmerge


def import_ray() -> ModuleType:
    """The ray module.

    Raises:
        MissingDependencyError: Ray is not installed; the message names the extra.
    """
    return import_optional("ray", "--ray needs Ray, which is not installed", INSTALL)


def check(address: object, shards: int | None = None) -> str:
    """``address`` when it can be a Ray address: ``local``, ``auto``, ``host:port``,
    ``ray://host:port``, and ``shards`` when it is None or positive. A file's name is refused:
    ``--ray`` takes an optional value, so ``--ray A.onnx B.onnx`` would read the first model as
    the address.

    Raises:
        RecipeError: an empty address, the name of a file, or fewer than one shard.
    """
    if shards is not None and shards < 1:
        raise RecipeError(f"--ray-shards {shards}: use at least 1 shard")
    if not isinstance(address, str) or not address.strip():
        raise RecipeError(f"--ray {address!r}: give a Ray address (auto, host:6379, ray://host:10001) or local")
    if address.endswith((".onnx", ".npz", ".npy")) or os.path.isfile(address):
        raise RecipeError(f"--ray took {address!r} for the Ray cluster's address; put --ray after the models, "
                          "or give the address (--ray local starts Ray on this machine)")
    return address


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Within the block, a Ray instance that a statistics pass starts (or connects to) stays
    for the passes after it (``--zip-layers auto`` computes statistics at every cut) and is
    shut down when the block ends; outside one, each pass shuts down what it started. The
    CLI runs merge and calibrate in such a block."""
    global _holding
    outer, _holding = _holding, True
    try:
        yield
    finally:
        _holding = outer
        if not outer:
            _shutdown()


def collect_on_ray(models: list[onnx.ModelProto], units: list[list[CaptureUnit]], calib: CalibrationSet,
                   widths: list[list[int]], options: MergeOptions,
                   tensors: Tensors | None = None) -> tuple[list[SpaceStats], SourceMoments | None, str]:
    """``collect_statistics`` of ``calib`` in shards on Ray workers (the module docstring):
    one ``SpaceStats`` per unit, the ``source_moments`` of ``tensors`` (None without), computed
    by the same tasks and pooled in shard order, and the provider(s) that ran.

    Args:
        models: canonical models.
        units: for each model, its capture units (same order across models).
        calib: the checked calibration set; each task gets its shard (``CalibrationSet.shard``:
            file paths and sample ranges, or the rows of arrays given in memory).
        widths: for each unit, each model's feature width there.
        tensors: per model, the tensors whose per-channel moments ``calibrate`` stores.
        options: a ``MergeOptions``: ``ray`` (the address, or ``local``), ``ray_shards``
            (default: one per CPU of the cluster, per GPU with ``provider="cuda"``),
            ``batch_size`` and ``provider``.

    Raises:
        MissingDependencyError: Ray is not installed (or a worker lacks what it needs).
        CalibrationError: no Ray cluster at the address, or a worker failed.
        OnnxMergeError: what a run in one process raises for these data, from the worker.
    """
    address = check(options.ray, options.ray_shards)
    if not widths and tensors is None:  # nothing is merged (--zip-layers 0)
        return [], None, "none"
    gpu = options.provider == "cuda"
    with _connected(address) as ray:
        slots = _slots(ray, gpu)
        ranges = shard_ranges(calib, options.batch_size, options.ray_shards or slots)
        log.info("statistics on Ray: %d shards of %s samples, %d %s in the cluster", len(ranges),
                 "/".join(str(stop - start) for start, stop in ranges), slots, "GPUs" if gpu else "CPUs")
        try:
            payload = ray.put([model.SerializeToString() for model in models])  # once, for every task
        except ValueError as error:  # protobuf refuses messages over 2 GB
            raise UnsupportedGraphError(f"--ray sends the models serialized and they are too large ({error}); "
                                        "compute the statistics without --ray") from None
        task = ray.remote(shard_statistics).options(num_cpus=1, num_gpus=1 if gpu else 0)
        refs = [task.remote(payload, units, widths, calib.shard(start, stop), options.batch_size, options.provider,
                            None if gpu else 1, tensors) for start, stop in ranges]
        try:
            total, moments, providers = _reduce(ray, refs, ranges)
        except BaseException:  # a failure or an interrupt: what still runs is not wanted
            _cancel(ray, refs)
            raise
    return total, moments, "+".join(sorted(providers))


def shard_statistics(models: list[bytes], units: list[list[CaptureUnit]], widths: list[list[int]],
                     shard: CalibrationSet, batch_size: int, provider: str, threads: int | None,
                     tensors: Tensors | None = None) -> tuple[list[SpaceStats], SourceMoments | None, str]:
    """One Ray task: the statistics of one shard and the moments of ``tensors`` (None without),
    computed as a run in one process computes them (its own onnxruntime sessions, ``threads``
    intra-op threads)."""
    loaded = [onnx.load_model_from_string(data) for data in models]
    check_weight_files(loaded)
    batches = zip(*(shard.batches(index, batch_size) for index in range(len(loaded))))
    stats, ran = collect_statistics(loaded, units, batches, widths, provider, threads=threads)
    moments = None if tensors is None else source_moments(
        loaded, tensors, lambda index: shard.batches(index, batch_size), provider, threads=threads)
    return stats, moments, ran


def check_weight_files(models: list[onnx.ModelProto]) -> None:
    """Refuse, on a worker, models whose mapped weights (``onnxmerge.weights``) it cannot read.

    Raises:
        CalibrationError: names the first file and where the models must be.
    """
    missing = next(filter(None, map(weights.unreadable, models)), None)
    if missing:
        raise CalibrationError(f"a Ray worker cannot read {missing}: the weights of models saved with external data "
                               "are read from their files, so keep the models on storage every node mounts at the "
                               "same path (as the calibration files), or compute without --ray")


def shard_ranges(calib: CalibrationSet, batch_size: int, count: int) -> list[tuple[int, int]]:
    """``count`` sample ranges (fewer when there are fewer batches) that cover the set in whole
    batches of ``calib.batch_size(batch_size)``, the first ones a batch longer when the batches
    do not divide evenly; the last range ends at the last sample (a fixed batch size drops the
    samples after the last whole batch there, as a run in one process does)."""
    size = calib.batch_size(batch_size)
    steps = calib.num_samples // size if calib.fixed_batch else -(-calib.num_samples // size)
    count = max(1, min(count, steps))
    base, extra = divmod(steps, count)
    ranges, start = [], 0
    for index in range(count):
        stop = start + (base + (index < extra)) * size
        ranges.append((start, stop))
        start = stop
    ranges[-1] = (ranges[-1][0], calib.num_samples)
    return ranges


def _reduce(ray: ModuleType, refs: list,
            ranges: list[tuple[int, int]]) -> tuple[list[SpaceStats], SourceMoments | None, set[str]]:
    """The shards' statistics added in shard order as the tasks finish (the sums of
    ``combine_stats`` over all shards, in its order), holding only the running total and the
    shards that finished before their turn; their source moments pooled in the same order; and
    the providers that ran. A progress bar counts the finished shards."""
    position = {ref: index for index, ref in enumerate(refs)}

    def finished() -> Iterator:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield from done

    total, moments, providers, early, turn = None, None, set(), {}, 0
    for ref in progress(finished(), "statistics on Ray", len(refs), "shard"):
        index = position[ref]
        early[index] = _result(ray, ref, ranges[index])
        while turn in early:
            stats, shard_moments, ran = early.pop(turn)
            providers.add(ran)
            if total is not None:
                added = combine_stats([(dict(enumerate(total)), {}), (dict(enumerate(stats)), {})])
                stats = [added[k] for k in range(len(total))]
            if shard_moments is not None:
                shard_moments = combine_moments([moments, shard_moments]) if moments is not None else shard_moments
            total, moments, turn = stats, shard_moments, turn + 1
    return total, moments, providers


def _cancel(ray: ModuleType, refs: list) -> None:
    """Cancel the tasks that have not finished (never a finished one: Ray may abort then)."""
    with contextlib.suppress(Exception):
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in pending:
            ray.cancel(ref)


def _result(ray: ModuleType, ref, samples: tuple[int, int]):
    """A task's result; its error as this process would raise it."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, OnnxMergeError):
            raise cause from None
        failure = _import_failure(cause)
        if failure:
            raise MissingDependencyError(f"a Ray worker cannot import what calibration needs ({failure}); every "
                                         "worker needs the onnxmerge and onnxruntime of this machine "
                                         "(docs/scale.md)") from None
        raise cause from None  # anything else is a bug, as in one process
    except ray.exceptions.RayError as error:  # a worker died, an object was lost, ...
        raise CalibrationError(f"Ray shard of samples {samples[0]}:{samples[1]} failed ({first_line(error)}); "
                               "check the Ray cluster (ray status) and its workers' logs") from None


def _import_failure(cause: BaseException) -> str | None:
    """What a worker could not import: the ImportError of the task, or the last error line of
    Ray's report that the task's function failed to import there (onnxmerge missing, or a
    version without this module); None for any other error."""
    if isinstance(cause, ImportError):
        return first_line(cause)
    text = str(cause)
    if not isinstance(cause, RuntimeError) or "failed to import on the worker" not in text:
        return None
    errors = [line.strip() for line in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", line)]
    return errors[-1] if errors else first_line(cause)


@contextlib.contextmanager
def _connected(address: str) -> Iterator[ModuleType]:
    """Ray, connected: to the instance this process already has (``ray.init()`` by the caller:
    used as it is and left running), else to a new local instance (``local``) or the cluster
    at ``address``, shut down after (at the end of a ``held`` block when inside one)."""
    global _owned
    ray = import_ray()
    if not ray.is_initialized():
        _init(ray, address)
        _owned = True
    elif not _owned and address not in (LOCAL, "auto"):
        log.warning("Ray is already running in this process (ray.init()); the statistics are computed there, "
                    "not at --ray %s", address)
    try:
        yield ray
    finally:
        if not _holding:
            _shutdown()


def _init(ray: ModuleType, address: str) -> None:
    """Start a local Ray instance (one CPU slot per core, no dashboard) or connect to one,
    quietly (Ray's warnings with -v). Ray sets its own SIGTERM handler; onnxmerge's (exit 143,
    temporary files removed) is put back."""
    level = logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if address != LOCAL:
        _check_reachable(address)
    try:
        if address == LOCAL:
            ray.init(address=LOCAL, num_cpus=_local_cpus(), include_dashboard=False, logging_level=level)
        else:
            ray.init(address=address, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        if address == LOCAL:
            raise CalibrationError(f"--ray local: cannot start a local Ray instance ({first_line(error)}); "
                                   "check Ray with `ray start --head`, or run without --ray") from None
        token = "" if os.environ.get("RAY_AUTH_MODE") else (
            " (a cluster with token authentication, Ray's default, needs RAY_AUTH_MODE=token here too)")
        raise CalibrationError(f"--ray {address}: cannot connect to a Ray cluster there ({first_line(error)}); "
                               f"start one with `ray start --head` and give its address or auto{token}, "
                               "or use --ray local") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log.info("Ray: %s, %s", "started a local instance" if address == LOCAL else f"connected to {address}",
             {key: value for key, value in ray.cluster_resources().items() if key in ("CPU", "GPU")})


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse at once an address ``host:port`` (or ``ray://host:port``) where nothing listens:
    Ray itself would retry for minutes.

    Raises:
        CalibrationError: the port does not accept a connection.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # auto, or an address Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise CalibrationError(f"--ray {address}: nothing answers at {host}:{port} ({error.strerror or error}); "
                               "start the cluster there (ray start --head) or give its address, "
                               "or use --ray local") from None


def _shutdown() -> None:
    """Shut down (disconnect from) the Ray instance onnxmerge started, if any."""
    global _owned
    if _owned:
        _owned = False
        import ray
        ray.shutdown()


def _slots(ray: ModuleType, gpu: bool) -> int:
    """How many tasks the cluster runs at once: its CPUs, or its GPUs for ``--provider cuda``.

    Raises:
        CalibrationError: ``cuda`` on a cluster without GPUs (its tasks would wait forever).
    """
    resources = ray.cluster_resources()
    if not gpu:
        return max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    if gpus < 1:
        raise CalibrationError("--provider cuda with --ray runs one task per GPU and the Ray cluster has no GPU; "
                               "use --provider auto or cpu, or a cluster with GPUs")
    return gpus


def _local_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
