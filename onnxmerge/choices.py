"""The values the command-line options accept, as plain data.

The modules that act on an option check its value against these names; the CLI builds its
parser from them without importing those modules (they load onnx, onnxruntime and scipy), so
``onnxmerge --help`` and ``--version`` start in a fraction of a second. Registries that hold
implementations (``match.METHODS``, ``match.align.ALIGNERS``) are keyed by the names here, and
the tests check that both agree.
"""

BN_MODES = ("keep", "fold")  # graph/canonical.py: keep BatchNormalization or fold it into the Conv
PROVIDERS = ("auto", "cpu", "cuda")  # calib/sessions.py: onnxruntime execution provider
HEADS = ("separate", "shared")  # rewrite/heads.py
REPAIRS = ("auto", "none", "reset", "repair")  # rewrite/repair.py
ALIGNMENTS = ("auto", "sma", "lma", "uniform", "head-tail", "none")  # depth.py; the aligners are match/align.py's
MIN_SAMPLES = 16  # fewer calibration samples give correlations and repair statistics that are mostly noise

# --method name -> one line for --help and reports; match/__init__.py registers each one's implementation
METHODS = {
    "zip": "elastic zipping of correlated features, within and across models",
    "permute": "one-to-one activation matching (Hungarian on correlation)",
    "weight": "data-free weight matching by coordinate descent (used without --calib)",
    "average": "plain weight averaging, no matching",
    "task-arithmetic": "same base: base + scale * sum of task vectors (needs --base)",
    "ties": "same base: trimmed task vectors, elected signs, disjoint mean (needs --base)",
    "dare": "same base: randomly dropped, rescaled task vectors, then task arithmetic or TIES (needs --base)",
    "slerp": "same base: spherical interpolation of two models at --t",
    "linear": "same base: weighted average (--weights), the model soup",
    "regmean": "same base: per weight layer the least-squares fit of every model's outputs (input Gram "
               "matrices on --calib)",
}
DARE_THEN = ("task-arithmetic", "ties")  # match/taskvec.py: what follows DARE's drops

# method parameter (a field of the methods' parameter dataclasses in match/) -> (default, help,
# the methods that read it, allowed values, range (low, high, low open, high open) of a number:
# None bounds only ask for a finite value); the CLI flag is --name-with-dashes, the API keyword
# and the recipe key under `parameters` the name; the tests check them against the dataclasses
PARAMETERS = {
    "alpha": (0.5, "zip: correlation decay of joined clusters; regmean: scale of the Gram matrices' "
                   "off-diagonal entries", ("zip", "regmean"), (), (0.0, 1.0, False, False)),
    "beta": (1.0, "scale of the within-model merge budgets", ("zip",), (), (0.0, None, False, False)),
    "scale": (1.0, "lambda: scale of the task vectors added to the base (negative: subtract them)",
              ("task-arithmetic", "ties", "dare"), (), (None, None, False, False)),
    "density": (0.2, "share of each task vector kept (largest magnitudes)", ("ties",), (), (0.0, 1.0, True, False)),
    "drop_rate": (0.9, "share of each task vector dropped at random", ("dare",), (), (0.0, 1.0, False, True)),
    "dare_then": ("task-arithmetic", "what follows the drops: task-arithmetic (sum) or ties (sign election, "
                                     "disjoint mean)", ("dare",), DARE_THEN, None),
    "t": (0.5, "position between model 0 (0) and model 1 (1)", ("slerp",), (), (0.0, 1.0, False, False)),
    "weights": (None, "one non-negative weight per model (default equal)", ("linear",), (), None),
}


def default(parameter: str):
    """The default of a method parameter (``PARAMETERS``), which every dataclass holding it uses."""
    return PARAMETERS[parameter][0]
