"""Stop strings, matched across token boundaries and never shown to the client."""


class StopMatcher:
    """Feed text deltas; get back the text that is safe to emit.

    Text that could be the start of a stop string is held back until the next delta decides
    it; a match ends the stream with everything before it emitted and nothing after.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ''
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        if self.matched is not None:
            return ''
        text = self.held + delta
        first = min(((text.find(s), s) for s in self.stops if s in text), default=None)
        if first is not None:
            self.held, self.matched = '', first[1]
            return text[:first[0]]
        keep = self._partial(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of the stream (not by a stop string) the held text is plain text."""
        text, self.held = self.held, ''
        return '' if self.matched is not None else text

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
