"""The committed gRPC stubs are what the .proto compiles to today."""

from glmjax.serving import protos


def test_committed_stubs_match_the_proto(tmp_path):
    for fresh, name in zip(protos.generate(str(tmp_path)), protos.STUBS):
        committed = protos.PROTO.replace('glmjax.proto', name)
        with open(fresh) as a, open(committed) as b:
            assert a.read() == b.read(), (
                f'{name} is out of date: run python -m glmjax.serving.protos')
