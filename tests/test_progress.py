"""The start-up progress bar: rewritten in place on a terminal, one finished line in a log."""

import io

from glmjax.progress import Progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_only_the_finished_line():
    out = io.StringIO()
    p = Progress('compiling', 1, stream=out, width=4)
    for i in range(1, 5):
        p(i, 4)
    p(4, 4)  # after it finished: nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith('compiling [####] 4/4 ')


def test_a_terminal_sees_the_bar_move():
    out = Tty()
    p = Progress('restoring weights', 3, stream=out, width=3)
    p(1)
    p(3)
    text = out.getvalue()
    assert '\rrestoring weights [#..] 1/3' in text
    assert text.endswith('\n') and text.count('\n') == 1
    assert '[###] 3/3' in text
