"""Runs the HTTP API (uvicorn) in a thread of the serving process, beside gRPC."""

import socket
import threading
import time

import uvicorn

from glmjax.serving.openai_api import make_app


class HttpServer:
    def __init__(self, backend, host: str, port: int, api_key: str | None = None,
                 tls_files: tuple[str, str] | None = None):
        if port == 0:  # pick a free port ourselves, so that we can report it
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port, self.backend = host, port, backend
        cert, key = tls_files or (None, None)
        config = uvicorn.Config(make_app(backend, api_key), host=host, port=port,
                                log_level='warning', lifespan='off', ssl_certfile=cert,
                                ssl_keyfile=key)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name='glmjax-http', daemon=True)

    def start(self, timeout: float = 30.0) -> 'HttpServer':
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f'the HTTP server did not start on {self.host}:{self.port}')
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
