"""The values the command-line options accept, as plain data.

The modules that act on an option check its value against these names; the CLI builds its
parser from them without importing those modules (they load onnx, onnxruntime and scipy), so
``onnxmerge --help`` and ``--version`` start in a fraction of a second. Registries that hold
implementations (``match.METHODS``, ``match.align.ALIGNERS``) are keyed by the names here, and
the tests check that both agree.
"""

BN_MODES = ("keep", "fold")  # graph/canonical.py: keep BatchNormalization or fold it into the Conv
PROVIDERS = ("auto", "cpu", "cuda")  # calib/capture.py: onnxruntime execution provider
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
}
