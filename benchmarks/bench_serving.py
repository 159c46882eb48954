"""Serving under load, in the manner of `vllm bench serve`, over HTTP and over gRPC.

Start a server first (e.g. `.venv/bin/glmjax-serve --grpc_port 50051 --http_port 8000`),
then for example:
  .venv/bin/python benchmarks/bench_serving.py --protocol http --url http://127.0.0.1:8000 \
      --concurrency 1,32 --num_prompts 64 --input_len 64 --output_len 64
  .venv/bin/python benchmarks/bench_serving.py --protocol grpc --url 127.0.0.1:50051 \
      --request_rate 8 --num_prompts 64 --random_lengths

Prompts are random token ids (fixed length, or uniform in [len/2, len] with
--random_lengths), so the same work goes over either protocol. Each request generates
exactly --output_len tokens (stop tokens ignored). Prints request and output-token
throughput, TTFT, TPOT, ITL (mean, median, p99) and end-to-end latency, and the ratio of
output tokens/s at the highest concurrency to that at concurrency 1.
"""

import asyncio
import dataclasses
import json
import random
import statistics
import time

from absl import app, flags

_PROTOCOL = flags.DEFINE_enum('protocol', 'http', ['http', 'grpc'], 'API to load')
_URL = flags.DEFINE_string('url', 'http://127.0.0.1:8000', 'HTTP base URL or gRPC target')
_CONCURRENCY = flags.DEFINE_string('concurrency', '1,32', 'in-flight request limits to run')
_RATE = flags.DEFINE_float('request_rate', 0.0, 'Poisson arrivals per second (0: all at once '
                           'up to the concurrency limit)')
_N = flags.DEFINE_integer('num_prompts', 64, 'requests per run')
_IN = flags.DEFINE_integer('input_len', 64, 'prompt tokens')
_OUT = flags.DEFINE_integer('output_len', 64, 'generated tokens per request')
_RANDOM = flags.DEFINE_bool('random_lengths', False, 'prompt lengths uniform in [len/2, len]')
_VOCAB = flags.DEFINE_integer('vocab', 0, 'token ids below this (0: ask the server)')
_KEY = flags.DEFINE_string('api_key', '', 'bearer token, if the server wants one')


@dataclasses.dataclass
class Result:
    ttft: float
    e2e: float
    chunk_times: list[float]
    tokens: int


async def http_request(client, prompt, out_len) -> Result:
    start = time.perf_counter()
    times, tokens = [], 0
    body = {'prompt': prompt, 'max_tokens': out_len, 'stream': True, 'ignore_eos': True,
            'temperature': 0.0}
    async with client.stream('POST', '/v1/completions', json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith('data: ') or line == 'data: [DONE]':
                continue
            chunk = json.loads(line[6:])
            if chunk.get('choices') and chunk['choices'][0]['text']:
                times.append(time.perf_counter())
            usage = chunk.get('usage')
            if usage:
                tokens = usage['completion_tokens']
    return Result(times[0] - start, time.perf_counter() - start, times, tokens or out_len)


async def grpc_request(stub, pb2, prompt, out_len, metadata) -> Result:
    start = time.perf_counter()
    times, tokens = [], 0
    req = pb2.GenerateRequest(token_ids=prompt, max_tokens=out_len, ignore_eos=True,
                              sampling=pb2.SamplingParams(temperature=0.0))
    async for resp in stub.Generate(req, metadata=metadata):
        if resp.token_ids:
            times.append(time.perf_counter())
            tokens += len(resp.token_ids)
    return Result(times[0] - start, time.perf_counter() - start, times, tokens)


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    lengths = [rng.randint(max(1, _IN.value // 2), _IN.value) if _RANDOM.value else _IN.value
               for _ in range(_N.value)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


async def run(concurrency: int, send, work) -> tuple[list[Result], float]:
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(1)

    async def one(p):
        async with limit:
            return await send(p)

    start = time.perf_counter()
    tasks = []
    for p in work:
        tasks.append(asyncio.create_task(one(p)))
        if _RATE.value > 0:
            await asyncio.sleep(rng.expovariate(_RATE.value))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(concurrency: int, results: list[Result], wall: float) -> float:
    out = sum(r.tokens for r in results)
    ttft = [r.ttft * 1e3 for r in results]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) * 1e3 for r in results if r.tokens > 1]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [r.e2e * 1e3 for r in results]
    print(f'\nconcurrency {concurrency}: {len(results)} requests in {wall:.2f} s, '
          f'{len(results) / wall:.2f} req/s, {out / wall:.1f} output tok/s')
    for name, xs in (('TTFT ms', ttft), ('TPOT ms', tpot), ('ITL ms', itl), ('E2E ms', e2e)):
        if xs:
            print(f'  {name:8} mean {statistics.mean(xs):9.2f}  median '
                  f'{statistics.median(xs):9.2f}  p99 {pct(xs, 0.99):9.2f}')
    return out / wall


async def main_async():
    levels = [int(c) for c in _CONCURRENCY.value.split(',')]
    if _PROTOCOL.value == 'http':
        import httpx
        headers = {'Authorization': f'Bearer {_KEY.value}'} if _KEY.value else {}
        client = httpx.AsyncClient(base_url=_URL.value, timeout=600, headers=headers,
                                   limits=httpx.Limits(max_connections=max(levels) + 4))
        vocab = _VOCAB.value or 256
        send = lambda p: http_request(client, p, _OUT.value)  # noqa: E731
    else:
        import grpc

        from glmjax.serving.protos import pb as pb2
        from glmjax.serving.protos import pb_grpc as pb2_grpc
        channel = grpc.aio.insecure_channel(_URL.value)
        stub = pb2_grpc.GlmStub(channel)
        metadata = (('authorization', f'Bearer {_KEY.value}'),) if _KEY.value else ()
        info = await stub.GetModelInfo(pb2.ModelInfoRequest(), metadata=metadata)
        vocab = _VOCAB.value or info.vocab_size
        send = lambda p: grpc_request(stub, pb2, p, _OUT.value, metadata)  # noqa: E731
    work = prompts(vocab)
    await run(1, send, work[:2])  # warm-up
    print(f'{_PROTOCOL.value} {_URL.value}: {_N.value} prompts of '
          f'{"up to " if _RANDOM.value else ""}{_IN.value} tokens, {_OUT.value} out')
    throughput = {c: report(c, *(await run(c, send, work))) for c in levels}
    if 1 in throughput and len(throughput) > 1:
        top = max(throughput)
        print(f'\noutput tok/s at concurrency {top} / at 1: '
              f'{throughput[top] / throughput[1]:.1f}x')


def main(argv):
    del argv
    asyncio.run(main_async())


if __name__ == '__main__':
    app.run(main)
