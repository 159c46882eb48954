"""A one-line progress bar on stderr for long start-up work (restoring weights, compiling).

On a terminal the line is rewritten in place; in a log file only the finished line is
written, so logs stay short.
"""

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None, width: int = 30):
        self.label, self.total, self.width = label, max(total, 1), width
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.live = getattr(self.stream, 'isatty', lambda: False)()
        self._draw()

    def __call__(self, done: int, total: int | None = None) -> None:
        """Reports `done` of `total` units (the callback the loaders and warm-up take)."""
        self.total = max(total or self.total, 1)
        self.done = min(done, self.total)
        self._draw()
        if self.done == self.total:
            self.close()

    def _line(self) -> str:
        filled = self.width * self.done // self.total
        return (f'{self.label} [{"#" * filled}{"." * (self.width - filled)}] '
                f'{self.done}/{self.total} {time.monotonic() - self.start:.1f} s')

    def _draw(self) -> None:
        if self.live and self.stream is not None:
            self.stream.write('\r' + self._line())
            self.stream.flush()

    def close(self) -> None:
        if self.stream is None:
            return
        self.stream.write(('\r' if self.live else '') + self._line() + '\n')
        self.stream.flush()
        self.stream = None
