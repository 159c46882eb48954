"""The persistent compilation cache, on by default for glmjax's programs: a restarted server
loads its compiled prefill/decode programs instead of compiling them again."""

import os

import jax

DEFAULT_DIR = os.path.join(os.environ.get('GLMJAX_CACHE', os.path.expanduser('~/.cache/glmjax')),
                           'xla')


def enable(path: str | None = None) -> str | None:
    """Turns the cache on (path '' or GLMJAX_COMPILATION_CACHE=off turns it off).
    Returns the directory used, or None when off."""
    path = os.environ.get('GLMJAX_COMPILATION_CACHE', DEFAULT_DIR) if path is None else path
    if not path or path == 'off':
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', path)
    # Cache every program: serving compiles many small ones (one per bucket) that add up.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    return path
