"""Runs the HTTP API (uvicorn) in a thread of the serving process, beside gRPC."""

import socket
import threading
import time

import uvicorn

from glmjax.serving.openai_api import make_app


class HttpServer:
    def __init__(self, backend, host: str, port: int, api_key: str | None = None,
                 tls_files: tuple[str, str] | None = None):
        # Bound here (port 0: the system picks a free one, held from then on, so that no
        # other server can take it between picking and listening), then handed to uvicorn.
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        port = self.socket.getsockname()[1]
        self.host, self.port, self.backend = host, port, backend
        cert, key = tls_files or (None, None)
        config = uvicorn.Config(make_app(backend, api_key), host=host, port=port,
                                log_level='warning', lifespan='off', ssl_certfile=cert,
                                ssl_keyfile=key)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [self.socket]},
                                       name='glmjax-http', daemon=True)

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
