"""Write the converter test fixtures of one framework: the designs of ``designs.py`` as ONNX
files plus ``.npz`` samples (input ``x``, framework output ``y``, output name ``output``).

Run it in that framework's environment (scripts/make_converter_fixtures.sh runs all of them):
    python converters/fixtures.py torch --out tests/fixtures/converters
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# framework -> the converter module that knows how to build its designs
MODULES = {
    "torch": "torch_export",
    "sklearn": "sklearn_export",
    "keras": "keras_export",
    "jax": "jax_export",
    "paddle": "paddle_export",
}
MAX_FIXTURE_BYTES = 200_000  # fixtures are committed: keep each small


def write(framework: str, folder: Path) -> dict[str, dict[str, float]]:
    """Run ``write_fixtures`` of the framework's converter; refuse oversized files."""
    package = f"{__package__}." if __package__ else ""
    module = importlib.import_module(package + MODULES[framework])
    folder.mkdir(parents=True, exist_ok=True)
    results = module.write_fixtures(folder)
    for name in results:
        size = (folder / name).stat().st_size
        if size > MAX_FIXTURE_BYTES:
            raise SystemExit(f"fixtures: {name} is {size} bytes > {MAX_FIXTURE_BYTES}; shrink it")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("framework", choices=sorted(MODULES))
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/converters"))
    args = parser.parse_args(argv)
    for name, diffs in write(args.framework, args.out).items():
        text = ", ".join(f"{output} {diff:.3g}" for output, diff in diffs.items())
        print(f"{args.out / name}: max abs diff {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
