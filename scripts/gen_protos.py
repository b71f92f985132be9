"""Regenerate the committed gRPC/protobuf code in protos/ from protos/*.proto.

    python scripts/gen_protos.py            # rewrite protos/*_pb2*.py[i]
    python scripts/gen_protos.py --check    # exit 1 when the committed code is stale

Compiles a copy laid out as the installed package (`crowdtrain/protos/`), so generated imports read
`from crowdtrain.protos import ...`.
Needs the `dev` extra (grpcio-tools, pinned so the output is reproducible).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    package = out_dir / "src" / "crowdtrain" / "protos"
    package.mkdir(parents=True)
    sources = []
    for source in sorted((ROOT / "protos").glob("*.proto")):
        sources.append(package / source.name)
        sources[-1].write_bytes(source.read_bytes())
    args = [
        "grpc_tools.protoc",
        f"-I{out_dir / 'src'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s.relative_to(out_dir / "src")) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {[s.name for s in sources]}")
    return sorted((out_dir / "crowdtrain" / "protos").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, exit 1 when stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            committed = ROOT / "protos" / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(path.name)
                if not args.check:
                    committed.write_bytes(path.read_bytes())
    if args.check and stale:
        print(f"stale generated code: {stale}; run `python scripts/gen_protos.py`", file=sys.stderr)
        return 1
    print("generated code is up to date" if not stale else f"regenerated {stale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
