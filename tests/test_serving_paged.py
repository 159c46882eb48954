"""The paged engine behind the real server (gRPC and HTTP): greedy equals `generate`,
repeated and concurrent prompts report cached tokens, and a pool too small for every request
at once still finishes every request, with the same tokens, by making requests wait for
pages."""

import concurrent.futures
import random

import grpc
import httpx
import numpy as np
import pytest

from glmjax import generate
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.server import start_http
from glmjax.serving.service import GlmServer

MAX_BATCH, MAX_SEQ_LEN, STEPS, PAGE = 4, 128, 4, 8
TIMEOUT = 120


def serve(model, **engine_kwargs):
    cfg, params, tok = model
    engine = PagedEngine(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS, page_size=PAGE,
                         max_num_batched_tokens=32, **engine_kwargs)
    server = GlmServer(engine, tok, cfg, 'paged', 64).start()
    server.warmup()
    return server


def greedy(prompt, n):
    return pb.GenerateRequest(token_ids=prompt, max_tokens=n, ignore_eos=True,
                              sampling=pb.SamplingParams(temperature=0.0))


def run(stub, req):
    responses = list(stub.Generate(req, timeout=TIMEOUT))
    return [t for r in responses for t in r.token_ids], responses[-1].usage


def prompts(n, seed):
    rng = random.Random(seed)
    system = [rng.randrange(700) for _ in range(37)]  # shared by all: 4 full pages
    return [system + [rng.randrange(700) for _ in range(rng.randrange(1, 30))]
            for _ in range(n)]


def test_paged_server_greedy_and_cached_tokens(model):
    cfg, params, _ = model
    server = serve(model)
    try:
        stub = pb_grpc.GlmStub(grpc.insecure_channel(f'127.0.0.1:{server.port}'))
        ps = prompts(6, seed=3)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda p: run(stub, greedy(p, 20)), ps))
        assert [ids for ids, _ in got] == generate(cfg, params, ps, 20, stop_ids=())
        # The shared 4 pages are computed once, whenever each request came: at prefill or
        # while an older prompt computed them, every other request took them.
        assert sorted(use.cached_tokens for _, use in got) == [0] + [32] * 5
        ids, use = run(stub, greedy(ps[0], 20))  # the same prompt again
        assert ids == got[0][0]
        assert use.cached_tokens == (len(ps[0]) - 1) // PAGE * PAGE > 0
        front = start_http(server, None, '127.0.0.1', 0)
        try:
            r = httpx.post(f'http://127.0.0.1:{front.port}/v1/completions', timeout=TIMEOUT,
                           json={'prompt': ps[1], 'max_tokens': 4, 'temperature': 0})
            assert r.status_code == 200, r.text
            assert r.json()['usage']['prompt_tokens_details']['cached_tokens'] > 0
            metrics = httpx.get(f'http://127.0.0.1:{front.port}/metrics', timeout=10).text
            assert 'glmjax:prefix_cache_hits' in metrics
        finally:
            front.stop()
    finally:
        server.shutdown(grace=5)


def test_a_pool_too_small_for_all_at_once_finishes_every_request(model):
    cfg, params, _ = model
    # 20 pages of 8: room for about two of these sequences at a time, not four.
    server = serve(model, num_pages=21, prefix_caching=False)
    try:
        stub = pb_grpc.GlmStub(grpc.insecure_channel(f'127.0.0.1:{server.port}'))
        assert server.limits.max_seq_len == MAX_SEQ_LEN
        ps = prompts(8, seed=4)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: run(stub, greedy(p, 40))[0], ps))
        assert got == generate(cfg, params, ps, 40, stop_ids=())
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        assert (info.busy_slots, info.queued) == (0, 0)
        assert server.engine.manager.pool.num_free == 20
    finally:
        server.shutdown(grace=5)


def test_a_request_that_could_never_fit_is_invalid(model):
    server = serve(model, num_pages=9)  # 64 tokens in all
    try:
        stub = pb_grpc.GlmStub(grpc.insecure_channel(f'127.0.0.1:{server.port}'))
        with pytest.raises(grpc.RpcError) as e:
            run(stub, greedy(list(range(1, 40)), 40))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert 'context limit of 64 tokens' in e.value.details()
        ids, _ = run(stub, greedy([1, 2, 3], 8))
        assert len(ids) == 8
    finally:
        server.shutdown(grace=5)


def test_an_embedding_call_is_computed_beside_the_decoding_streams(model):
    """The engine computes an embedding call's inputs as chunks of the mixed steps that also
    carry the decoding stream's next token: the stream advances in every step of it, its
    tokens are unchanged, and the vectors are those of the call computed alone."""
    from glmjax.serving.paged_engine import PagedEngine as Paged
    cfg, params, _ = model
    server = serve(model)
    try:
        engine, steps = server.engine, []
        mixed = engine._mixed

        def spy(decoding, chunks, embeds, masks):
            steps.append((len(decoding), len(embeds)))
            return mixed(decoding, chunks, embeds, masks)

        engine._mixed = spy
        stub = pb_grpc.GlmStub(grpc.insecure_channel(f'127.0.0.1:{server.port}'))
        stream = stub.Generate(greedy(prompts(1, seed=5)[0], 60), timeout=TIMEOUT)
        first = next(stream)  # decoding now
        inputs = [p[:20] for p in prompts(3 * MAX_BATCH + 1, seed=6)]
        vectors = server.orchestrator.embed(inputs).result(timeout=TIMEOUT)
        ids = list(first.token_ids) + [t for r in stream for t in r.token_ids]
        assert ids == generate(cfg, params, prompts(1, seed=5), 60, stop_ids=())[0]
        # 260 tokens, 31 a step beside the stream's token.
        assert [s for s in steps if s[1]] and all(d == 1 for d, e in steps if e)
        assert sum(1 for _, e in steps if e) == -(-13 * 20 // 31)
        alone = Paged(cfg, params, MAX_BATCH, MAX_SEQ_LEN, STEPS, page_size=PAGE,
                      max_num_batched_tokens=32)
        np.testing.assert_allclose(vectors, alone.embed(inputs), atol=1e-6)
    finally:
        server.shutdown(grace=5)


def test_an_embedding_call_whose_client_left_computes_no_more(model):
    """cancel_embed on a call the engine has begun: the next step drops it, its future is
    cancelled, its pages are free, and the steps after compute nothing of it."""
    server = serve(model)
    try:
        engine, orchestrator, steps = server.engine, server.orchestrator, []
        future, generate_call = None, engine.generate

        def step(*args):
            out = generate_call(*args)
            steps.append(engine.last_tokens)
            if len(steps) == 2:  # the client leaves once two steps of it have run
                orchestrator.cancel_embed(future)
            return out

        engine.generate = step
        future = orchestrator.embed([(p * 4)[:120] for p in prompts(4, seed=7)])
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(timeout=TIMEOUT)
        assert len(steps) == 2 and not engine.embedding_work
        assert engine.manager.pool.num_free == engine.manager.pool.allocatable
        ids, _ = run(pb_grpc.GlmStub(grpc.insecure_channel(f'127.0.0.1:{server.port}')),
                     greedy([1, 2, 3], 8))
        assert len(ids) == 8
    finally:
        server.shutdown(grace=5)
