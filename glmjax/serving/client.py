"""glmjax-client: sends one Generate request and prints the text as it arrives.

    glmjax-client --target localhost:50051 --prompt 'Hello' --max_tokens 32
    glmjax-client --token_ids 2,4,7,100 --temperature 0.7 --seed 1 --json
"""

import sys

import grpc
from absl import app, flags
from google.protobuf import json_format

from glmjax.serving.protos import pb, pb_grpc

_TARGET = flags.DEFINE_string('target', 'localhost:50051', 'server address')
_PROMPT = flags.DEFINE_string('prompt', None, 'prompt text (sent as is, no chat template)')
_TOKEN_IDS = flags.DEFINE_list('token_ids', None, 'prompt token ids, comma-separated')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, '0: up to the context limit')
_TEMPERATURE = flags.DEFINE_float('temperature', None, '0 is greedy (server default 1.0)')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0 is no cut')
_TOP_P = flags.DEFINE_float('top_p', None, 'nucleus mass (server default 1.0)')
_MIN_P = flags.DEFINE_float('min_p', 0.0, 'relative probability floor')
_REP = flags.DEFINE_float('repetition_penalty', None, '1 is none')
_PRESENCE = flags.DEFINE_float('presence_penalty', 0.0, '')
_FREQUENCY = flags.DEFINE_float('frequency_penalty', 0.0, '')
_SEED = flags.DEFINE_integer('seed', None, 'same seed, same output')
_STOP = flags.DEFINE_multi_string('stop', [], 'stop string (repeatable)')
_STOP_IDS = flags.DEFINE_list('stop_token_ids', [], 'extra stop token ids')
_IGNORE_EOS = flags.DEFINE_bool('ignore_eos', False, 'do not stop at the eos ids')
_TOP_LOGPROBS = flags.DEFINE_integer('top_logprobs', 0, 'alternatives per token (with --json)')
_STREAM = flags.DEFINE_bool('stream', True, 'print each delta as it arrives (else at the end)')
_JSON = flags.DEFINE_bool('json', False, 'print every response as one JSON line')
_API_KEY = flags.DEFINE_string('api_key', None, 'bearer token')
_TLS_CA = flags.DEFINE_string('tls_ca', None, 'PEM root certificate: connect with TLS')
_TIMEOUT = flags.DEFINE_float('timeout', 300.0, 'deadline in seconds')
_INFO = flags.DEFINE_bool('info', False, 'print GetModelInfo and exit')


def build_request():
    if bool(_PROMPT.value) == bool(_TOKEN_IDS.value):
        raise app.UsageError('give exactly one of --prompt or --token_ids')
    s = pb.SamplingParams(top_k=_TOP_K.value, min_p=_MIN_P.value,
                          presence_penalty=_PRESENCE.value, frequency_penalty=_FREQUENCY.value)
    for field, flag in (('temperature', _TEMPERATURE), ('top_p', _TOP_P),
                        ('repetition_penalty', _REP), ('seed', _SEED)):
        if flag.value is not None:
            setattr(s, field, flag.value)
    return pb.GenerateRequest(
        text=_PROMPT.value or '', token_ids=[int(t) for t in _TOKEN_IDS.value or []],
        sampling=s, max_tokens=_MAX_TOKENS.value, stop=_STOP.value,
        stop_token_ids=[int(t) for t in _STOP_IDS.value], ignore_eos=_IGNORE_EOS.value,
        top_logprobs=_TOP_LOGPROBS.value, logprobs=_JSON.value)


def channel() -> grpc.Channel:
    if not _TLS_CA.value:
        return grpc.insecure_channel(_TARGET.value)
    with open(_TLS_CA.value, 'rb') as f:
        return grpc.secure_channel(_TARGET.value, grpc.ssl_channel_credentials(f.read()))


def main(argv):
    del argv
    metadata = [('authorization', f'Bearer {_API_KEY.value}')] if _API_KEY.value else None
    stub = pb_grpc.GlmStub(channel())
    try:
        if _INFO.value:
            info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=_TIMEOUT.value,
                                     metadata=metadata)
            print(json_format.MessageToJson(info))
            return
        text, last = [], None
        for r in stub.Generate(build_request(), timeout=_TIMEOUT.value, metadata=metadata):
            last = r
            if _JSON.value:
                print(json_format.MessageToJson(r, indent=None), flush=True)
            elif _STREAM.value:
                print(r.text, end='', flush=True)
            else:
                text.append(r.text)
        if not _JSON.value:
            print(''.join(text))
            reason = pb.FinishReason.Name(last.finish_reason) if last else 'none'
            print(f'[finish: {reason}, {last.usage.prompt_tokens} prompt + '
                  f'{last.usage.completion_tokens} completion tokens]', file=sys.stderr)
    except grpc.RpcError as e:
        print(f'error: {e.code().name}: {e.details()}', file=sys.stderr)
        sys.exit(1)


def run():
    app.run(main)


if __name__ == '__main__':
    run()
