"""Train the mixed-framework sample models and write them with their data (run from the repo root).

Two pairs of models trained on scikit-learn's digits with the digits sample's split and training
loop (samples/digits/make.py), model A on classes 0-4 and model B on 5-9, each pair from two
frameworks. Writes into samples/mixed/:
  sklearn_mlp_a.onnx  scikit-learn MLPClassifier (hidden layer 64) by skl2onnx: input float32
                      [N, 64] (pixels / 16), outputs label and probabilities
  torch_mlp_b.onnx    PyTorch MLP (hidden layer 128) ending in a softmax, so that it outputs
                      probabilities like the classifier: the same task interface
  keras_cnn_a.onnx    Keras CNN: conv 16 + BN + ReLU, conv 32 + BN + ReLU, global average pool,
                      dense; channels-last input [N, 8, 8, 1] (make_keras.py)
  torch_cnn_b.onnx    the same CNN in PyTorch, input [N, 1, 8, 8], BatchNormalization kept
  calib.npz, test.npz the digits sample's calibration and test images as 64 features (the
                      CNNs use samples/digits/calib.npz and test.npz)
Needs torch, scikit-learn and skl2onnx: pip install -e .[cpu,torch,dev]. The Keras model needs
TensorFlow, which cannot share that environment: pass --keras-python PYTHON of an environment
with tensorflow-cpu, tf2onnx, onnx and onnxruntime; without it the committed keras_cnn_a.onnx stays.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from torch import nn

import digits_sample  # samples/mixed is on sys.path when this runs as a script

HERE = Path(__file__).resolve().parent



digits = digits_sample.load("make")  # data split, training loop, export, accuracy


def sklearn_mlp(x: np.ndarray, y: np.ndarray, path: Path) -> MLPClassifier:
    mask = np.isin(y, digits.TASKS["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(x[mask], y[mask])
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                          options={id(clf): {"zipmap": False}})
    path.write_bytes(onx.SerializeToString())
    return clf


def torch_mlp(x: np.ndarray, y: np.ndarray, path: Path) -> nn.Module:
    torch.manual_seed(2)
    model = digits.train(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 5)), x, y, digits.TASKS["b"], 2)
    torch.onnx.export(nn.Sequential(model, nn.Softmax(1)).eval(), (torch.zeros(2, 64),), path, dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["probabilities"],
                      dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}})
    return model


def cnn(classes: int = 5) -> nn.Module:
    """The CNN design of make_keras.py, channels-first."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def keras_cnn(python: str, x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Train and export the Keras CNN in the TensorFlow environment, on NHWC images."""
    mask = np.isin(y, digits.TASKS["a"])
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "train.npz"
        np.savez(data, x=np.ascontiguousarray(x[mask].transpose(0, 2, 3, 1)), y=y[mask])
        subprocess.run([python, str(HERE / "make_keras.py"), "--data", str(data), "-o", str(path)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--keras-python", help="python of an environment with TensorFlow and tf2onnx")
    args = parser.parse_args()
    x_train, x_test, y_train, y_test = digits.data()
    flat_train, flat_test = x_train.reshape(-1, 64), x_test.reshape(-1, 64)
    clf = sklearn_mlp(flat_train, y_train, args.out / "sklearn_mlp_a.onnx")
    mask = np.isin(y_test, digits.TASKS["a"])
    print(f"sklearn_mlp_a: task accuracy {clf.score(flat_test[mask], y_test[mask]):.3f}")
    mlp = torch_mlp(flat_train, y_train, args.out / "torch_mlp_b.onnx")
    print(f"torch_mlp_b: task accuracy {digits.accuracy(mlp, flat_test, y_test, digits.TASKS['b']):.3f}")
    torch.manual_seed(3)
    model = digits.train(cnn(), x_train, y_train, digits.TASKS["b"], 3)
    digits.export(model, args.out / "torch_cnn_b.onnx")
    print(f"torch_cnn_b: task accuracy {digits.accuracy(model, x_test, y_test, digits.TASKS['b']):.3f}")
    if args.keras_python:
        keras_cnn(args.keras_python, x_train, y_train, args.out / "keras_cnn_a.onnx")
    else:
        print("keras_cnn_a.onnx kept (no --keras-python)")
    with np.load(HERE.parent / "digits" / "calib.npz") as calib:
        np.savez_compressed(args.out / "calib.npz", input=calib["input"].reshape(-1, 64))
    np.savez_compressed(args.out / "test.npz", input=flat_test, y=y_test)


if __name__ == "__main__":
    main()
