"""Regenerate the Python stubs of jlora.v1 from `jlora/v1/jlora.proto`.

    python -m serving.proto.generate            # rewrite the committed stubs
    python -m serving.proto.generate --out DIR  # write them under DIR (the currency test)

Uses grpcio-tools at the version pinned in pyproject.toml's `test` extra, so the output is
reproducible; `tests/serving/test_server_proto.py` regenerates into a temporary directory
and compares with the committed files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]        # the repository root: imports resolve as
PROTO = "serving/proto/jlora/v1/jlora.proto"      # serving.proto.jlora.v1.jlora_pb2
STUBS = ("jlora_pb2.py", "jlora_pb2.pyi", "jlora_pb2_grpc.py")


def generate(out: Path = ROOT) -> list[Path]:
    """Write the stubs under `out` (at serving/proto/jlora/v1/); returns their paths."""
    from grpc_tools import protoc
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", str(ROOT / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit status {rc})")
    return [out / Path(PROTO).parent / name for name in STUBS]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT, help="root to write under (default: "
                   "the repository)")
    for path in generate(p.parse_args(argv).out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
