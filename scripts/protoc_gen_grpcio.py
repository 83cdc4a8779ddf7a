"""A protoc plugin (for `buf generate`) that runs the pinned grpcio-tools.

grpcio-tools ships protoc's Python generator and gRPC's Python generator inside a
Python extension, not as plugin executables, so buf cannot call them directly. This
plugin reads buf's CodeGeneratorRequest, hands its descriptors to grpcio-tools'
protoc (`--descriptor_set_in`, no source parsing), and returns the files it wrote:
`*_pb2.py` and `*_pb2_grpc.py`, exactly what `python -m grpc_tools.protoc
--python_out --grpc_python_out` makes. The `.pyi` stubs come from mypy-protobuf's
own plugins.

One difference is undone: buf, like protoc talking to any plugin, fills in every
field's `json_name`, while protoc compiling a .proto file records it only when the
file sets it. The Python generator embeds the descriptor it is given, so a default
`json_name` is cleared here to embed the same bytes as protoc does from source.

buf.gen.yaml runs it with the project's virtualenv:

    - local: [.venv/bin/python, scripts/protoc_gen_grpcio.py]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def default_json_name(field_name: str) -> str:
    """protoc's JSON name for a field: lowerCamelCase, underscores dropped."""
    parts = field_name.split("_")
    return parts[0] + "".join(part[:1].upper() + part[1:] for part in parts[1:])


def clear_default_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in [*message.field, *message.extension]:
            if field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
        clear_default_json_names(message.nested_type)


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    files = list(request.proto_file)
    for file in files:
        clear_default_json_names(file.message_type)
        for extension in file.extension:
            if extension.json_name == default_json_name(extension.name):
                extension.ClearField("json_name")
    with tempfile.TemporaryDirectory(prefix="protoc-gen-grpcio-") as work:
        descriptors = Path(work) / "descriptors.binpb"
        descriptors.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())
        out = Path(work) / "out"
        out.mkdir()
        args = [
            "protoc",
            f"--descriptor_set_in={descriptors}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpcio-tools protoc failed (its message is on stderr)"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
