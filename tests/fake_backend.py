"""A backend whose output can be worked out by hand: characters are tokens, and it 'generates'
a scripted text, a few tokens per event, as the real engine does several steps per call."""

import asyncio
import contextlib
import socket
import threading
import time

import numpy as np
import uvicorn

from glmjax.serving.chat import DEFAULT_TEMPLATE, ChatTemplate
from glmjax.serving.openai_api import GenEvent, TokenLogprob


class FakeBackend:
    model_name = 'glm-fake'
    served_names = ('glm-fake', 'm')
    max_context = 2048
    vocab_size = 4096
    eos_ids = (0,)

    def __init__(self, script: str = 'Hello.'):
        self.script = script
        self.is_ready = True
        self.requests = []
        with open(DEFAULT_TEMPLATE) as f:
            self.chat_template = ChatTemplate(f.read())

    def ready(self):
        return self.is_ready

    def draining(self):
        return False

    def generate_all(self, requests):
        return [self.generate(r) for r in requests]

    def encode(self, text):
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids):
        return ''.join(chr(i) for i in ids)

    async def generate(self, request):
        self.requests.append(request)
        text, finish = self.script, 'stop'
        for s in request.stop:
            if s in text:
                text = text[:text.index(s)]
        if request.max_tokens is not None and len(text) > request.max_tokens:
            text, finish = text[:request.max_tokens], 'length'
        ids = self.encode(text)
        sizes = [1, 3, 2]
        i, k = 0, 0
        if not ids:
            yield GenEvent([], '', finish_reason=finish, queue_time=0.0)
            return
        while i < len(ids):
            step = ids[i:i + sizes[k % 3]]
            i, k = i + len(step), k + 1
            lps = None
            if request.logprobs is not None:
                lps = [TokenLogprob(t, -0.5, [(t, -0.5), (t + 1, -1.5)][:request.logprobs])
                       for t in step]
            await asyncio.sleep(0)
            yield GenEvent(step, self.decode(step), lps, finish if i >= len(ids) else None,
                           0.0 if k == 1 else None)

    async def embed(self, prompts):
        out = np.zeros((len(prompts), 16), np.float32)
        for r, p in enumerate(prompts):
            for t in p:
                out[r, t % 16] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def stats(self):
        return {'running': 1, 'waiting': 2, 'kv_cache_usage': 0.25}


@contextlib.contextmanager
def serve(app):
    """Runs an ASGI app on a free localhost port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))  # held from here on: no other server can take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='error'))
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        thread.join(10)
