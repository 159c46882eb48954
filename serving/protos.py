"""The generated gRPC stubs of serving/glmjax.proto, built on first use.

The stubs are not committed: they are generated here with grpcio-tools, into this package
directory when it is writable (a source checkout) or else into ~/.cache/glmjax/stubs, and
regenerated whenever the .proto is newer. Generation writes to a temporary directory and
renames, so concurrent processes never import a half-written file.
"""

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'glmjax.proto')
SERVICE_NAME = 'glmjax.v1.Glm'


def _out_dir() -> str:
    """The directory that holds serving/glmjax_pb2*.py (the root that 'serving' lives in)."""
    package_dir = os.path.dirname(PROTO)
    if os.access(package_dir, os.W_OK):
        return os.path.dirname(package_dir)
    with open(PROTO, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.environ.get('GLMJAX_CACHE', os.path.expanduser('~/.cache/glmjax'))
    return os.path.join(cache, 'stubs', digest)


def _generate(out: str) -> None:
    from grpc_tools import protoc  # build-time tool, imported only when stubs are missing

    os.makedirs(os.path.join(out, 'serving'), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(out, 'serving')) as tmp:
        # The proto path is the directory above the package so that the generated
        # glmjax_pb2_grpc.py imports `from serving import glmjax_pb2`.
        root = os.path.dirname(os.path.dirname(PROTO))
        args = ['protoc', f'-I{root}', f'--python_out={tmp}', f'--grpc_python_out={tmp}',
                os.path.join(root, 'serving', 'glmjax.proto')]
        if protoc.main(args) != 0:
            raise RuntimeError(f'protoc failed to compile {PROTO}')
        for name in ('glmjax_pb2.py', 'glmjax_pb2_grpc.py'):
            os.replace(os.path.join(tmp, 'serving', name), os.path.join(out, 'serving', name))


def _stale(path: str) -> bool:
    return not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(PROTO)


def _import(name: str, path: str):
    full = f'serving.{name}'
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module  # before exec: glmjax_pb2_grpc imports serving.glmjax_pb2
    spec.loader.exec_module(module)
    return module


@functools.cache
def load():
    """Returns (glmjax_pb2, glmjax_pb2_grpc)."""
    out = _out_dir()
    paths = [os.path.join(out, 'serving', f'{n}.py') for n in ('glmjax_pb2', 'glmjax_pb2_grpc')]
    if any(_stale(p) for p in paths):
        _generate(out)
    return _import('glmjax_pb2', paths[0]), _import('glmjax_pb2_grpc', paths[1])
