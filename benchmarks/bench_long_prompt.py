"""Decode latency while a long prompt arrives, over gRPC: N streams decode, then one long
prompt (4K tokens by default) is sent; how much do the streams stall while it is prefilled?

The script starts nothing. Start a server first, for example (the demo model's context is
4,096 tokens, so its long prompt is 4,000 tokens and 8 out):
  .venv/bin/glmjax-serve --max_seq_len 4096 --max_batch 16 --grpc_port 50051
  .venv/bin/python benchmarks/bench_long_prompt.py --target 127.0.0.1:50051

Prompts are plain text tokenized by the server (its Tokenize RPC), trimmed to exact lengths,
and begin with a per-run nonce, so that nothing is served from the prefix cache. The streams
decode greedily with stop tokens ignored; they start, run --lead_s, then the long prompt is
sent; --margin_s after its first token the streams are cancelled. With --embed_url the long
input is an embedding call instead (POST /v1/embeddings of its token ids to the same
server's HTTP front), and "first token" is its answer.

Inter-token latency (ITL) here is the gap between two consecutive responses of one stream;
each response carries one engine call's tokens (--decode_steps of the server, the tokens per
response are printed). The window is [arrival - margin_s, long prompt's first token +
margin_s]; every gap ending in it counts. Prints the streams' median and p99 ITL in the window,
p99 / median (goal <= 3), the largest gap, the long prompt's TTFT, and the ITL before the
arrival for reference.
"""

import asyncio
import random
import statistics
import time

from absl import app, flags

_TARGET = flags.DEFINE_string('target', '127.0.0.1:50051', 'gRPC address of the server')
_STREAMS = flags.DEFINE_integer('streams', 8, 'decoding streams')
_STREAM_LEN = flags.DEFINE_integer('stream_prompt_len', 64, 'prompt tokens of each stream')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 4000, 'tokens of the long prompt')
_LONG_OUT = flags.DEFINE_integer('long_max_tokens', 8, 'tokens the long prompt generates')
_LEAD = flags.DEFINE_float('lead_s', 2.0, 'seconds the streams decode before the arrival')
_MARGIN = flags.DEFINE_float('margin_s', 0.5, 'the window reaches this far either side of the '
                             'long prompt\'s prefill (arrival to first token)')
_SEED = flags.DEFINE_integer('seed', None, 'nonce of the prompts (default: from the clock, so '
                             'a rerun on the same server finds nothing cached)')
_KEY = flags.DEFINE_string('api_key', '', 'bearer token, if the server wants one')
_EMBED_URL = flags.DEFINE_string('embed_url', None, 'the same server\'s HTTP front (e.g. '
                                 'http://127.0.0.1:8084): the long input is an embedding call')

TEXT = """The parser reads the configuration file one line at a time. A line that starts \
with a hash or a semicolon is a comment and is skipped. A line in square brackets opens a new \
section, and every key that follows belongs to it until the next section begins. A key and \
its value are separated by an equals sign or a colon; spaces around them are removed. \
def parse(text, filename='<string>'):
    sections, current = {}, None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(('#', ';')):
            continue
        if line.startswith('[') and line.endswith(']'):
            current = sections.setdefault(line[1:-1].strip(), {})
            continue
        key, _, value = line.partition('=')
        current[key.strip().lower()] = value.strip()
    return sections
When a value continues on the next line, the next line is indented, and the two are joined \
with a newline. Values are strings; the caller converts them to booleans, integers, lists or \
durations with the functions of the values module, which raise a ValueError with the text \
they could not read.
"""


async def tokens_of(stub, pb2, metadata, head: str, n: int) -> list[int]:
    """Exactly n tokens of text: `head`, then TEXT as often as it takes, cut at n."""
    ids = list((await stub.Tokenize(pb2.TokenizeRequest(text=head), metadata=metadata)).token_ids)
    body = list((await stub.Tokenize(pb2.TokenizeRequest(text=TEXT),
                                     metadata=metadata)).token_ids)
    while len(ids) < n:
        ids += body
    return ids[:n]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main_async():
    import grpc

    from glmjax.serving.protos import pb as pb2
    from glmjax.serving.protos import pb_grpc as pb2_grpc
    metadata = (('authorization', f'Bearer {_KEY.value}'),) if _KEY.value else ()
    headers = {'authorization': f'Bearer {_KEY.value}'} if _KEY.value else {}
    channel = grpc.aio.insecure_channel(_TARGET.value)
    stub = pb2_grpc.GlmStub(channel)
    info = await stub.GetModelInfo(pb2.ModelInfoRequest(), metadata=metadata)
    if _PROMPT_LEN.value + _LONG_OUT.value > info.max_seq_len:
        raise app.UsageError(f'--prompt_len {_PROMPT_LEN.value} + --long_max_tokens '
                             f'{_LONG_OUT.value} exceeds the server\'s max_seq_len '
                             f'{info.max_seq_len}')
    if _STREAMS.value + 1 > info.max_batch:
        raise app.UsageError(f'{_STREAMS.value} streams and the long prompt need max_batch >= '
                             f'{_STREAMS.value + 1}; the server has {info.max_batch}')
    nonce = _SEED.value if _SEED.value is not None else int(time.time() * 1e3) % 10**9
    rng = random.Random(nonce)
    greedy = pb2.SamplingParams(temperature=0.0)

    # Warm-up: one short request (the server compiled its shapes at start-up).
    warm = await tokens_of(stub, pb2, metadata, f'Warm-up {nonce}. ', 32)
    async for _ in stub.Generate(pb2.GenerateRequest(token_ids=warm, max_tokens=8,
                                                     sampling=greedy), metadata=metadata):
        pass
    if _EMBED_URL.value:  # and the HTTP route: its first call pays the front's own set-up
        import httpx
        async with httpx.AsyncClient(timeout=600) as client:
            (await client.post(f'{_EMBED_URL.value}/v1/embeddings', json={'input': warm},
                               headers=headers)).raise_for_status()

    stream_out = info.max_seq_len - _STREAM_LEN.value
    times: list[list[tuple[float, int]]] = [[] for _ in range(_STREAMS.value)]
    finished = [False] * _STREAMS.value
    calls = []

    async def stream(i: int, prompt: list[int]):
        call = stub.Generate(pb2.GenerateRequest(token_ids=prompt, max_tokens=stream_out,
                                                 ignore_eos=True, sampling=greedy),
                             metadata=metadata)
        calls.append(call)
        try:
            async for resp in call:
                if resp.token_ids:
                    times[i].append((time.perf_counter(), len(resp.token_ids)))
            finished[i] = True
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    prompts = [await tokens_of(stub, pb2, metadata,
                               f'Stream {i} of run {nonce}, seed {rng.random()}. ',
                               _STREAM_LEN.value) for i in range(_STREAMS.value)]
    long_prompt = await tokens_of(stub, pb2, metadata, f'Long prompt of run {nonce}. ',
                                  _PROMPT_LEN.value)
    tasks = [asyncio.create_task(stream(i, p)) for i, p in enumerate(prompts)]
    while not all(times) and not all(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    await asyncio.sleep(_LEAD.value)

    arrival = time.perf_counter()
    first = None
    usage = None
    if _EMBED_URL.value:
        async with httpx.AsyncClient(timeout=600) as client:
            r = await client.post(f'{_EMBED_URL.value}/v1/embeddings',
                                  json={'input': long_prompt}, headers=headers)
            r.raise_for_status()
        first = time.perf_counter()
    else:
        async for resp in stub.Generate(pb2.GenerateRequest(token_ids=long_prompt,
                                                            max_tokens=_LONG_OUT.value,
                                                            ignore_eos=True, sampling=greedy),
                                        metadata=metadata):
            if resp.token_ids and first is None:
                first = time.perf_counter()
            if resp.HasField('usage'):
                usage = resp.usage
    long_done = time.perf_counter()
    await asyncio.sleep(_MARGIN.value)
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()

    lo, hi = arrival - _MARGIN.value, first + _MARGIN.value
    window, before, per_stream_max, when = [], [], [], []
    tokens_per_response = []
    for ts in times:
        gaps = [(b, (b - a) * 1e3) for (a, _), (b, _) in zip(ts, ts[1:])]
        tokens_per_response += [n for _, n in ts]
        inside = [g for t, g in gaps if lo <= t <= hi]
        window += inside
        before += [g for t, g in gaps if t < lo]
        per_stream_max.append(max(inside) if inside else float('nan'))
        if inside:  # where the largest gap ends, from the arrival
            when.append(max((g, t) for t, g in gaps if lo <= t <= hi)[1] - arrival)
    print(f'{_TARGET.value} ({info.model_name}, max_batch {info.max_batch}, '
          f'{info.decode_steps_per_call} decode steps per call): {_STREAMS.value} streams of '
          f'{_STREAM_LEN.value}-token prompts; a {_PROMPT_LEN.value}-token '
          + ('embedding input' if _EMBED_URL.value else
             f'prompt (usage: {usage.prompt_tokens if usage else "?"} prompt, '
             f'{usage.cached_tokens if usage else "?"} cached)')
          + f' arrives after {_LEAD.value:.1f} s')
    print(f'  long {"input" if _EMBED_URL.value else "prompt"}: '
          f'{"answered" if _EMBED_URL.value else "TTFT"} {(first - arrival) * 1e3:.0f} ms, '
          f'done after {(long_done - arrival) * 1e3:.0f} ms')
    if any(finished):
        print(f'  WARNING: {sum(finished)} streams ended before the window closed')
    if not window:
        print('  no response of the streams fell in the window')
        return
    print(f'  tokens per response: median {statistics.median(tokens_per_response):.0f}, '
          f'max {max(tokens_per_response)}')
    if before:
        print(f'  ITL before the window: median {statistics.median(before):.1f} ms, '
              f'p99 {pct(before, 0.99):.1f} ms ({len(before)} gaps)')
    med, p99 = statistics.median(window), pct(window, 0.99)
    print(f'  ITL in the window ({(hi - lo):.2f} s, {len(window)} gaps): median {med:.1f} ms, '
          f'p99 {p99:.1f} ms, max {max(window):.1f} ms; '
          f'{sum(g > 3 * med for g in window)} gaps > 3x median')
    print('  largest gap per stream, ms: ' + ' '.join(f'{g:.0f}' for g in per_stream_max))
    print('  ... ending at, ms after the arrival: ' + ' '.join(f'{w * 1e3:.0f}' for w in when) +
          f' (the first token of the long prompt: {(first - arrival) * 1e3:.0f})')
    print(f'  p99 / median ITL: {p99 / med:.1f}x (goal <= 3x)')


def main(argv):
    del argv
    asyncio.run(main_async())


if __name__ == '__main__':
    app.run(main)
