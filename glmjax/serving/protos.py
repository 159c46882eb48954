"""The gRPC stubs of glmjax/serving/glmjax.proto.

The generated modules (glmjax_pb2.py, glmjax_pb2_grpc.py) are committed beside the .proto:
nothing is generated at import time or written into an installed package. After changing the
.proto, regenerate them with `python -m glmjax.serving.protos` (grpcio-tools, a test
dependency); tests/test_protos.py fails while they are out of date.
"""

import os
import sys

from glmjax.serving import glmjax_pb2 as pb
from glmjax.serving import glmjax_pb2_grpc as pb_grpc

SERVICE_NAME = 'glmjax.v1.Glm'
PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'glmjax.proto')
# The proto path is the directory above the `glmjax` package, so that the generated
# glmjax_pb2_grpc.py imports `from glmjax.serving import glmjax_pb2`.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(PROTO)))
STUBS = ('glmjax_pb2.py', 'glmjax_pb2_grpc.py')

__all__ = ['PROTO', 'SERVICE_NAME', 'generate', 'pb', 'pb_grpc']


def generate(out: str) -> list[str]:
    """Compiles the .proto into `out`/glmjax/serving/; returns the paths of the stubs."""
    from grpc_tools import protoc

    args = ['protoc', f'-I{ROOT}', f'--python_out={out}', f'--grpc_python_out={out}',
            os.path.relpath(PROTO, ROOT)]
    if protoc.main(args) != 0:
        raise RuntimeError(f'protoc failed to compile {PROTO}')
    return [os.path.join(out, 'glmjax', 'serving', name) for name in STUBS]


if __name__ == '__main__':
    for path in generate(ROOT):
        print(f'wrote {path}', file=sys.stderr)
