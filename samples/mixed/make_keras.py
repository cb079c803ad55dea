"""Train the mixed sample's Keras CNN (digits 0-4) and export it to ONNX (run by make.py).

Runs in an environment with TensorFlow, Keras, tf2onnx, onnx and onnxruntime (not the
project's: TensorFlow conflicts with torch's pins), and exports with converters/keras_export.py.
  python samples/mixed/make_keras.py --data TRAIN.npz -o samples/mixed/keras_cnn_a.onnx
TRAIN.npz holds NHWC images ``x`` and labels ``y`` (0-4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from converters.keras_export import export_keras  # noqa: E402  (the repo root is importable now)


def build(classes: int = 5) -> keras.Model:
    """The CNN design of the sample, channels-last: conv 16 and 32 with BN and ReLU, pool, dense.
    BN momentum 0.9 (PyTorch's): with Keras's 0.99 the running statistics of a few hundred
    steps are still far from the data's and inference is at chance."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="input")
    x = inputs
    for filters in (16, 32):
        x = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(layers.Conv2D(filters, 3, padding="same")(x)))
    outputs = layers.Dense(classes)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="keras_cnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    with np.load(args.data) as data:
        x, y = data["x"], data["y"]
    keras.utils.set_random_seed(1)
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=15, verbose=0)
    export_keras(model, args.output)
    print(f"{args.output.name}: training accuracy {history.history['accuracy'][-1]:.3f}")


if __name__ == "__main__":
    main()
