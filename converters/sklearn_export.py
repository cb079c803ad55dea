"""Export a scikit-learn MLP to a mergeable ONNX file and check it against scikit-learn.

Environment (the project's own dev environment already has it):
    python -m venv /work/venvs/sklearn
    /work/venvs/sklearn/bin/pip install scikit-learn skl2onnx onnx onnxruntime

Command:
    python converters/sklearn_export.py MODEL -o model.onnx [--opset N]

MODEL is a fitted ``MLPClassifier`` or ``MLPRegressor`` saved with ``joblib.dump`` or
``pickle`` (loading unpickles: load only files you trust), or a spec ``module:factory`` /
``file.py:factory`` returning the fitted estimator.

Settings, chosen so onnxmerge can read the parameters back: skl2onnx with ``zipmap=False``, so
a classifier's ``probabilities`` is a float tensor [N, classes] rather than a sequence of maps;
the ``label`` output (int64 [N], ArgMax over the probabilities mapped to the classes) is kept.
Opset 17 at most for the default domain (skl2onnx may pick a lower one, 16 for an MLP) and 1
for ``ai.onnx.ml``; input ``input`` of shape [batch, features].
The layers come out as MatMul + Add + Relu (weights ``coefficient``, ``intercepts``, ...), then
Softmax (or Sigmoid for two classes) and the ArgMax/Cast/label-lookup tail.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np

if __package__:  # imported as converters.sklearn_export
    from . import designs
    from .checks import Tolerance, finish, name_batch_axis, save_model, verify
    from .specs import (ConverterError, base_parser, call_spec, load_inputs, run_main,
                        sample_input, save_sample)
else:  # run as a script: converters/ is on sys.path
    import designs
    from checks import Tolerance, finish, name_batch_axis, save_model, verify
    from specs import (ConverterError, base_parser, call_spec, load_inputs, run_main,
                       sample_input, save_sample)

DEFAULT_OPSET = 17
ML_OPSET = 1


def load_estimator(source: str):
    """The fitted estimator in a joblib/pickle file, or returned by a spec."""
    if Path(source).is_file() and not source.endswith(".py"):
        import joblib

        try:
            estimator = joblib.load(source)
        except (pickle.UnpicklingError, KeyError, ValueError) as error:
            raise ConverterError(f"cannot unpickle {source} ({error}), in MODEL; "
                                 "save the estimator with joblib.dump or pickle.dump") from None
    else:
        estimator = call_spec(source)
    if not hasattr(estimator, "n_features_in_"):
        raise ConverterError(f"{source} holds a {type(estimator).__name__} that is not a fitted "
                             "estimator, in MODEL; fit it before saving")
    return estimator


def sklearn_outputs(estimator, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the ONNX outputs should hold, by the names skl2onnx gives them."""
    if hasattr(estimator, "predict_proba"):
        return {"label": estimator.predict(x).astype(np.int64),
                "probabilities": estimator.predict_proba(x).astype(np.float32)}
    prediction = estimator.predict(x).astype(np.float32)
    return {"variable": prediction.reshape(len(x), -1)}


def export_sklearn(estimator, path: str | Path, *, opset: int | None = None,
                   check_input: np.ndarray | None = None,
                   tolerance: Tolerance = Tolerance()) -> dict[str, float]:
    """Convert ``estimator`` with skl2onnx, check it on ``check_input`` and write ``path``.

    Returns the max abs difference per output (for ``label``: the number of mismatches).

    Raises:
        ConverterError: skl2onnx cannot convert it, or the result differs from scikit-learn.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    features = int(estimator.n_features_in_)
    if check_input is None:
        check_input = sample_input((features,), batch=3, seed=0)
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    try:
        model = convert_sklearn(
            estimator, initial_types=[("input", FloatTensorType([None, features]))],
            options=options, target_opset={"": opset or DEFAULT_OPSET, "ai.onnx.ml": ML_OPSET})
    except RuntimeError as error:  # skl2onnx's "Unable to find a shape calculator ..."
        raise ConverterError(f"skl2onnx cannot convert {type(estimator).__name__} ({error}), "
                             "in MODEL; use an MLPClassifier or MLPRegressor") from None
    model.graph.name = type(estimator).__name__  # skl2onnx writes a random uuid: not reproducible
    name_batch_axis(model)
    references = sklearn_outputs(estimator, check_input)
    diffs = verify(model, check_input, references, tolerance, f"skl2onnx export of "
                   f"{type(estimator).__name__}")
    save_model(model, path)
    return diffs


def example_mlp():
    """A fitted ``MLPClassifier`` 64->32->16->10 holding the ``mlp`` design weights.

    scikit-learn builds its layers only when fitting, so one iteration on a tiny set with every
    class sets up the estimator, and the design weights then replace the fitted ones.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    sizes = designs.MLP_SIZES
    classifier = MLPClassifier(hidden_layer_sizes=sizes[1:-1], max_iter=1, random_state=0)
    x = np.random.default_rng(designs.SEED).standard_normal((designs.CLASSES, sizes[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x, np.arange(designs.CLASSES))
    weights = designs.mlp_weights()
    layers = range(1, len(sizes))
    # scikit-learn stores (in, out) matrices; the design stores PyTorch's (out, in)
    classifier.coefs_ = [weights[f"fc{i}.weight"].T.astype(np.float64) for i in layers]
    classifier.intercepts_ = [weights[f"fc{i}.bias"].astype(np.float64) for i in layers]
    return classifier


def write_fixtures(folder: Path) -> dict[str, dict[str, float]]:
    """``sklearn_mlp.onnx`` and ``.npz`` in ``folder``; diffs by file."""
    estimator = example_mlp()
    x = designs.fixture_input("mlp")
    path = folder / "sklearn_mlp.onnx"
    diffs = export_sklearn(estimator, path, check_input=x)
    save_sample(path.with_suffix(".npz"), x, sklearn_outputs(estimator, x), "probabilities")
    return {path.name: diffs}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("model", help="a joblib/pickle file of a fitted MLP, or module:factory")
    args = parser.parse_args(argv)
    estimator = load_estimator(args.model)
    features = int(estimator.n_features_in_)
    check_input = (load_inputs(args.inputs) if args.inputs else
                   sample_input((features,), batch=args.batch, seed=args.seed))
    diffs = export_sklearn(estimator, args.output, opset=args.opset, check_input=check_input,
                           tolerance=Tolerance(args.rtol, args.atol))
    return finish(args, check_input, diffs, lambda: sklearn_outputs(estimator, check_input), main=None)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
