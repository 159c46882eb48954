"""The routed experts of one MoE layer alone, each implementation at several token counts:
where decode and prefill time goes, and the measurements behind moe.choose_impl.

  .venv/bin/python benchmarks/bench_moe.py --tokens 1,8,32,128,1024,4096

Shapes default to the `small` benchmark config (32 experts of width 512, top-4, D=1024,
fp32); random routing, even or (--skew) uneven. Median of --repeats calls, in ms.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit('/', 1)[0])

_TOKENS = flags.DEFINE_string('tokens', '1,8,32,128,1024,4096', 'tokens per call')
_IMPLS = flags.DEFINE_string('impls', 'dense,gather,tiled,batched,grouped', 'implementations')
_EXPERTS = flags.DEFINE_integer('experts', 32, 'routed experts')
_TOP_K = flags.DEFINE_integer('top_k', 4, 'experts per token')
_WIDTH = flags.DEFINE_integer('width', 512, "each expert's intermediate size")
_HIDDEN = flags.DEFINE_integer('hidden', 1024, 'model width')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed calls')
_SKEW = flags.DEFINE_float(
    'skew', 0.0, 'uneven routing: expert e is picked with odds exp(skew * z_e), z_e ~ N(0, 1); '
    '0.6 makes the largest group about 2.4x the mean at 4096 tokens, as in the random `small`')


def main(argv):
    del argv
    from roofline import median_time

    from glmjax.moe import EXPERT_IMPLS
    E, k, F, D = _EXPERTS.value, _TOP_K.value, _WIDTH.value, _HIDDEN.value
    rng = np.random.RandomState(0)
    weights = [jnp.asarray(rng.normal(size=(E, F, D)).astype(np.float32) / 30) for _ in range(3)]
    impls = _IMPLS.value.split(',')
    print(f'{E} experts top-{k}, F={F}, D={D}, fp32 on {jax.default_backend()}; ms per call')
    print(f'{"tokens":>6} | ' + ' | '.join(f'{name:>9}' for name in impls))
    odds = np.exp(_SKEW.value * rng.normal(size=E))
    for T in [int(t) for t in _TOKENS.value.split(',')]:
        x = jnp.asarray(rng.normal(size=(T, D)).astype(np.float32))
        ids = np.stack([rng.choice(E, k, replace=False, p=odds / odds.sum()) for _ in range(T)])
        sizes = np.bincount(ids.ravel(), minlength=E)
        ids = jnp.asarray(ids, jnp.int32)
        w = jnp.asarray(rng.uniform(size=(T, k)).astype(np.float32))
        row = []
        for name in impls:
            f = jax.jit(EXPERT_IMPLS[name])
            call = lambda f=f, args=(x, w, ids, *weights): f(*args).block_until_ready()  # noqa: E731
            call()  # compile
            row.append(f'{median_time(call, _REPEATS.value) * 1e3:9.1f}')
        skew = f'largest group {sizes.max() / sizes.mean():.1f}x the mean'
        print(f'{T:>6} | ' + ' | '.join(row) + f' | {skew}', flush=True)


if __name__ == '__main__':
    app.run(main)
