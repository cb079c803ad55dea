"""The options of a merge (``onnxmerge merge`` flags, API keywords, recipe keys), with defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .choices import default
from .errors import RecipeError


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge, with its default (the CLI flag is ``--`` + the name with dashes).

    Attributes:
        method: a name of the method registry (match/__init__.py): zip, permute, weight,
            average, or a same-base method (task-arithmetic, ties, dare, slerp, linear,
            regmean); None: task-arithmetic with a base model, else zip with calibration data
            or statistics, else weight.
        alpha: zip: correlation decay of joined clusters (ZipIt!, Stoica et al. 2023);
            regmean: scale of the Gram matrices' off-diagonal entries (Jin et al. 2023).
        beta: zip: scale of the within-model merge budgets.
        width: zip: merged width of every space as a multiple of the widest model's width,
            or ``"min"`` for the narrowest model's; None is 1x.
        heads: ``separate`` (one head per model, outputs suffixed ``_m<i>``) or ``shared``.
        zip_layers: merge only the first N weight layers; ``"auto"`` chooses N within
            ``max_loss`` on held-back calibration samples; None merges every layer.
        max_loss: ``zip_layers="auto"``: largest share (0-1) of joint predictions that may
            differ from the source models' ensemble.
        scale: task-arithmetic, ties, dare: lambda, the scale of the (summed or merged) task
            vectors added to the base.
        density: ties: share of each task vector's entries kept (largest magnitudes), (0, 1].
        drop_rate: dare: share of each task vector's entries dropped at random, [0, 1).
        dare_then: dare: ``task-arithmetic`` or ``ties`` (sign election, disjoint mean).
        t: slerp: position between model 0 (0) and model 1 (1).
        weights: linear: one weight per model (None: equal).
        align_first: same-base methods: first align every model's features to model 0's
            (activation matching on the calibration data, else weight matching), then combine.
        repair: auto, none, reset (BatchNorm statistics) or repair (REPAIR, Jordan et al. 2023).
        bn: keep BatchNormalization nodes, or fold them into the convolutions.
        input_layout: (model file name, layout such as ``NHWC``) pairs of channels-last models.
        batch_size: samples per onnxruntime run.
        max_samples: use at most this many calibration samples (None: all).
        repair_samples: measure BN reset / REPAIR on this many samples (None: all).
        provider: onnxruntime provider: auto, cpu or cuda.
        seed: random seed of every random choice.
        align: depth alignment: auto (sma when depths differ), sma, lma, uniform, head-tail, none.
        allow_few_samples: accept fewer than 16 calibration samples.
        strict: refuse a full merge that leaves most weight layers per model.
        ray: compute the calibration statistics on Ray (docs/scale.md): ``"local"`` starts a
            local Ray instance, anything else is the address of a running cluster (``auto``,
            ``host:6379``, ``ray://host:10001``); None computes them in this process. An
            instance already started in this process (``ray.init()``) is used as it is.
        ray_shards: with ``ray``, the number of shards (Ray tasks) the calibration samples are
            split into; None: one per CPU of the Ray cluster (per GPU with ``provider="cuda"``).
    """

    method: str | None = None
    alpha: float = default("alpha")
    beta: float = default("beta")
    width: float | str | None = None
    heads: str = "separate"
    zip_layers: int | str | None = None
    max_loss: float = 0.05
    scale: float = default("scale")
    density: float = default("density")
    drop_rate: float = default("drop_rate")
    dare_then: str = default("dare_then")
    t: float = default("t")
    weights: tuple[float, ...] | None = default("weights")
    align_first: bool = False
    repair: str = "auto"
    bn: str = "keep"
    input_layout: tuple[tuple[str, str], ...] = ()
    batch_size: int = 64
    max_samples: int | None = None
    repair_samples: int | None = None
    provider: str = "auto"
    seed: int = 0
    align: str = "auto"
    allow_few_samples: bool = False
    strict: bool = False
    ray: str | None = None
    ray_shards: int | None = None


OPTION_NAMES = tuple(f.name for f in fields(MergeOptions))
EXECUTION = ("ray", "ray_shards")
"""Options that say where the work runs, not what is computed: a merge gives the same model
with or without them, so the merged model's metadata and its recipe do not record them."""


def recorded(options: MergeOptions) -> dict:
    """The options as the merged model's metadata and recipe record them: every field but the
    ``EXECUTION`` ones."""
    return {name: value for name, value in asdict(options).items() if name not in EXECUTION}


def merge_options(base: MergeOptions | None = None, **settings) -> MergeOptions:
    """``base`` (default: every default) with ``settings`` replacing its fields.

    Raises:
        RecipeError: a name that is no option (the message lists the options).
    """
    unknown = sorted(set(settings) - set(OPTION_NAMES))
    if unknown:
        raise RecipeError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}")
    if "input_layout" in settings:
        settings["input_layout"] = _layouts(settings["input_layout"])
    if settings.get("weights") is not None:
        settings["weights"] = tuple(float(w) for w in settings["weights"])
    return replace(base or MergeOptions(), **settings)


def _layouts(value) -> tuple[tuple[str, str], ...]:
    """``input_layout`` as pairs, from pairs, a dict or ``MODEL=LAYOUT`` strings."""
    items = value.items() if isinstance(value, dict) else value or ()
    pairs = []
    for item in items:
        if isinstance(item, str):
            model, _, layout = item.rpartition("=")
            item = (model, layout)
        if len(item) != 2 or not all(isinstance(part, str) and part for part in item):
            raise RecipeError(f"input_layout {item!r}: give (model file name, layout) pairs, e.g. ('keras.onnx', 'NHWC')")
        pairs.append((item[0], item[1].upper()))
    return tuple(pairs)
