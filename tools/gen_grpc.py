"""Regenerate the checked-in gRPC modules of inferd.grpc from their .proto.

    python tools/gen_grpc.py          # rewrite src/inferd/grpc/grpc_predict_v2_pb2*.py(i)
    python tools/gen_grpc.py --check  # exit 1 if the checked-in modules are out of date

Runs ``grpc_tools.protoc`` (grpcio-tools, a dev dependency) with ``src`` as the include root,
so that the service module imports ``inferd.grpc.grpc_predict_v2_pb2``. The message module is
then made to build its descriptors in a pool of its own instead of protobuf's default pool:
the protocol's messages are named ``inference.*`` as every client expects, and so are
``tritonclient.grpc``'s, which could otherwise not be imported in the same process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PROTO = Path("inferd/grpc/grpc_predict_v2.proto")
OUTPUTS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(into: Path) -> dict[str, str]:
    """The generated modules, by file name, written under ``into`` first."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{SRC}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            str(SRC / PROTO),
        ],
        check=True,
    )
    texts = {name: (into / PROTO.parent / name).read_text() for name in OUTPUTS}
    message_module = texts["grpc_predict_v2_pb2.py"]
    if _DEFAULT_POOL not in message_module:
        raise SystemExit(f"protoc's output no longer contains {_DEFAULT_POOL!r}; update this tool")
    texts["grpc_predict_v2_pb2.py"] = message_module.replace(_DEFAULT_POOL, _OWN_POOL)
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts = generate(Path(tmp))
    stale = []
    for name, text in texts.items():
        target = SRC / PROTO.parent / name
        if not target.exists() or target.read_text() != text:
            stale.append(name)
            if not args.check:
                target.write_text(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python tools/gen_grpc.py", file=sys.stderr)
        return 1
    print("regenerated: " + (", ".join(stale) if stale else "nothing changed"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
