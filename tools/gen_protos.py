"""Generate the Python stubs for proto/diffmesh/v1/*.proto into diffmesh/v1/.

The one generator that developers, CI and the Docker build all use. `--check` regenerates into a temporary
directory and exits non-zero when the committed stubs differ (a test runs it, so drift fails CI).
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = pathlib.Path("diffmesh") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc over every .proto file; return the generated files."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(pathlib.Path(tmp))}
        committed = {p.name: p for p in (ROOT / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(set(fresh) ^ set(committed))
        stale += sorted(n for n in set(fresh) & set(committed)
                        if not filecmp.cmp(fresh[n], committed[n], shallow=False))
    if stale:
        print("stubs out of date with proto/: " + ", ".join(stale) + "; run `python tools/gen_protos.py`",
              file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        return check()
    (ROOT / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
