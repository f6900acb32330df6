"""Generate the Python code and type stubs for protos/openvpp/v1 into gen/.

Usage: python scripts/gen_protos.py [--check]

--check generates into a temporary folder and fails when gen/ differs, so CI catches
generated code that is stale against the .proto files.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GEN_ROOT = ROOT / "gen"
# Imported googleapis types (google/type/date.proto): include path only, never generated
# (their Python modules ship with googleapis-common-protos).
VENDORED_ROOT = ROOT / "third_party" / "protos"


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    scripts = Path(sysconfig.get_path("scripts"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{VENDORED_ROOT}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")} | {out_dir / "openvpp"}:
        (package_dir / "__init__.py").touch()
        (package_dir / "py.typed").touch()


def differences(left: Path, right: Path) -> list[str]:
    left_files = {
        p.relative_to(left) for p in left.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    right_files = {
        p.relative_to(right)
        for p in right.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    changed = [str(p) for p in left_files ^ right_files]
    changed += [
        str(p)
        for p in left_files & right_files
        if not filecmp.cmp(left / p, right / p, shallow=False)
    ]
    return sorted(changed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if check:
            stale = differences(fresh, GEN_ROOT)
            if stale:
                print("gen/ is stale; run: python scripts/gen_protos.py", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        shutil.rmtree(GEN_ROOT, ignore_errors=True)
        shutil.copytree(fresh, GEN_ROOT)
    print(f"generated into {GEN_ROOT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
