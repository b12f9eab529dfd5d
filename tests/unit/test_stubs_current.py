"""The committed diffmesh/v1 stubs match proto/, and `tools/gen_protos.py --check` notices when they do not."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 60


def _check(root: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "gen_protos.py"), "--check"],
        cwd=root, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def _copy_tree(dest: pathlib.Path) -> pathlib.Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "proto", dest / "proto", ignore=ignore)
    shutil.copytree(ROOT / "tools", dest / "tools", ignore=ignore)
    shutil.copytree(ROOT / "diffmesh" / "v1", dest / "diffmesh" / "v1", ignore=ignore)
    return dest


def test_committed_stubs_match_the_protos():
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr


def test_check_fails_when_a_proto_changes_without_regenerating(tmp_path):
    root = _copy_tree(tmp_path)
    # The untouched copy passes, so a failure below is due to the edit alone.
    control = _check(root)
    assert control.returncode == 0, control.stderr

    proto = root / "proto" / "diffmesh" / "v1" / "tensor.proto"
    text = proto.read_text()
    anchor = "  bytes data = 3;\n  bool last = 4;\n}"
    assert anchor in text  # MediaChunk's closing lines
    proto.write_text(text.replace(anchor, "  bytes data = 3;\n  bool last = 4;\n  string checksum = 5;\n}"))

    result = _check(root)
    assert result.returncode != 0
    assert "out of date" in result.stderr
    assert "tensor_pb2.py" in result.stderr
    # --check must not rewrite the committed stubs.
    for name in ("tensor_pb2.py", "tensor_pb2.pyi"):
        assert (root / "diffmesh" / "v1" / name).read_bytes() == (ROOT / "diffmesh" / "v1" / name).read_bytes()


def test_check_fails_when_a_stub_is_missing(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "diffmesh" / "v1" / "decoder_pb2_grpc.py").unlink()
    result = _check(root)
    assert result.returncode != 0
    assert "decoder_pb2_grpc.py" in result.stderr
