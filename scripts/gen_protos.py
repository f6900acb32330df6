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
    write_documented_descriptors(args[1:4], protos, out_dir)
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")} | {out_dir / "openvpp"}:
        (package_dir / "__init__.py").touch()
        (package_dir / "py.typed").touch()


def write_documented_descriptors(includes: list[str], protos: list[str], out_dir: Path) -> None:
    """Each .proto's descriptor with its comments, beside its module (``x.descriptor.binpb``).

    The generated modules carry descriptors without comments; reflection serves these
    instead (service/edge/reflection.py), so ``grpcurl describe`` shows the documentation.
    """
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "set.binpb"
        command = ["grpc_tools.protoc", *includes, "--include_source_info"]
        if protoc.main([*command, f"--descriptor_set_out={descriptor_set}", *protos]) != 0:
            raise SystemExit("protoc failed (descriptor set)")
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    for file in files:
        # protoc adds json names, the compiled modules have none; without them clients print
        # the fields by their proto names (grid_identifier), as the generated code does.
        messages = list(file.message_type)
        while messages:
            message = messages.pop()
            for message_field in message.field:
                message_field.ClearField("json_name")
            messages.extend(message.nested_type)
        target = out_dir / file.name.removesuffix(".proto")
        target.with_name(f"{target.name}.descriptor.binpb").write_bytes(
            file.SerializeToString(deterministic=True)
        )


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
