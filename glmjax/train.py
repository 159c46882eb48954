"""glmjax-train: trains a small model of exactly the GLM-4.6 architecture, with optax.

What is trained is glmjax's own model (the modules of glmjax.model, the router of
glmjax.moe): sigmoid routing with the correction bias and a shared expert, dense first
layer(s), QK-norm, partial RoPE, GQA, and the MTP layer, trained jointly.

- Loss: next-token cross-entropy plus `mtp_weight` times the MTP head's (token t+2 from the
  hidden state at t and the token at t+1). No auxiliary balance loss.
- Router balance as in DeepSeek-V3 / GLM: after each step, each expert's correction bias
  moves down by `bias_rate` if it got more than the mean load in that step's batch, up if
  less. The bias only steers the top-k choice, so it gets no gradient; the optimizer leaves
  it alone (and gives it no weight decay).
- Routed experts run densely (every expert on every token, weighted by a mostly-zero
  combine matrix: `glmjax.moe.experts_dense`): exact, differentiable, and for a few experts
  on CPU no slower than sorting. The forward is the model's own, layer by layer, so that each
  MoE layer's expert loads come out with the logits; a test checks it against
  `glmjax.inference.forward`.
- optax: AdamW with warmup and cosine decay, gradient clipping by global norm, one jitted
  step. Deterministic from the seed: the batch of step s is a function of (seed, s) only,
  so a run resumed from a checkpoint continues bit-identically.
- Output: a Hugging Face checkpoint directory (`export`), loadable by transformers'
  Glm4MoeForCausalLM and by `glmjax.load_hf`.

Typical use (the shipped demo model): `glmjax-train --out /tmp/glm-train` builds the corpus
and tokenizer (glmjax.corpus), trains, and exports to /tmp/glm-train/hf; `glmjax-train
--eval DIR` measures a checkpoint directory on the held-out data.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glmjax.config import GlmConfig
from glmjax.model import merge
from glmjax.moe import MoE, experts_dense, route

# ----------------------------------------------------------------------------------------
# The model to train and the training settings.


def demo_config(vocab_size: int, eos_token_ids: tuple[int, ...] = (), pad_token_id=None,
                **sizes) -> GlmConfig:
    """GLM-4.6's config (qk-norm, attention biases, partial RoPE 0.5, theta 1e6, GQA,
    sigmoid routing with scaling 2.5 and a shared expert, dense first layer, one MTP layer)
    at the size of the shipped demo model; `sizes` overrides any field."""
    small = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                 first_k_dense_replace=1, max_position_embeddings=4096)
    return dataclasses.replace(GlmConfig.preset('glm-4.6'), vocab_size=vocab_size,
                               eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
                               **{**small, **sizes})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The defaults are the shipped demo model's run."""
    steps: int = 1600
    batch: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 60
    weight_decay: float = 0.05
    clip: float = 1.0
    mtp_weight: float = 0.2
    bias_rate: float = 3e-3
    seed: int = 0
    # The compute dtype (measured ~8% faster than fp32 here); parameters and optimizer
    # state stay fp32.
    dtype: str = 'bfloat16'


FLAG_HELP = {
    'steps': 'optimizer steps', 'batch': 'rows per step', 'seq_len': 'tokens per row',
    'lr': 'peak learning rate (AdamW)', 'min_lr_ratio': 'final lr / peak (cosine decay)',
    'warmup': 'linear warmup steps', 'weight_decay': 'AdamW weight decay (matrices only)',
    'clip': 'gradient clipping by global norm', 'mtp_weight': 'weight of the MTP loss',
    'bias_rate': 'per-step move of the router correction bias against the load',
    'seed': 'weights, data order and corpus seed', 'dtype': 'compute dtype: bfloat16|float32',
}


# ----------------------------------------------------------------------------------------
# The forward pass for training: the model's own modules, with each MoE layer's loads.


def _moe(cfg: GlmConfig, moe: MoE, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, D] -> (out [B, T, D], load [E]: token-expert pairs per expert)."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    # route(): top-k by scores + bias, weights from the unbiased sigmoid scores; the ids are
    # integers, so the bias gets no gradient and the router gets it through the weights.
    weights, ids = route(cfg, flat, moe.router[...], moe.router_bias[...])
    routed = experts_dense(flat, weights.astype(x.dtype), ids, moe.gate[...], moe.up[...],
                           moe.down[...])
    load = jnp.bincount(ids.reshape(-1), length=cfg.n_routed_experts)
    return routed.reshape(B, T, D) + moe.shared(x), load


def _layer(cfg: GlmConfig, layer, x, positions):
    """One decoder layer as DecoderLayer.__call__, returning its load (None if dense)."""
    h, _ = layer.attn(layer.attn_norm(x), positions)
    x = x + h
    y = layer.mlp_norm(x)
    if isinstance(layer.mlp, MoE):
        out, load = _moe(cfg, layer.mlp, y)
    else:
        out, load = layer.mlp(y), None
    return x + out, load


def train_forward(cfg: GlmConfig, params: dict, tokens: jax.Array):
    """tokens [B, T] -> (logits fp32 [B, T, V], MTP logits fp32 [B, T-1, V] for the token
    at t+2, loads int [L_moe, E] for the main MoE layers then the MTP layer)."""
    model = merge(cfg, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed[...][tokens]  # [B, T, D]
    loads = []
    for layer in model.layers:
        x, load = _layer(cfg, layer, x, positions)
        if load is not None:
            loads.append(load)
    h = model.norm(x)
    logits = model.logits(h)
    mtp = merge(cfg, params, 'mtp')
    e = mtp.enorm(model.embed[...][tokens[:, 1:]])
    x = jnp.concatenate([e, mtp.hnorm(h[:, :-1])], axis=-1) @ mtp.eh_proj[...]
    x, load = _layer(cfg, mtp.layer, x, positions[:, :-1])
    loads.append(load)
    return logits, model.logits(mtp.head_norm(x)), jnp.stack(loads)


def _is_bias(path) -> bool:
    return getattr(path[-1], 'key', None) == 'router_bias'


def _cast(params: dict, dtype) -> dict:
    """The compute copy: the router and its bias stay fp32, as in the model."""
    def one(path, x):
        keep = _is_bias(path) or getattr(path[-1], 'key', None) == 'router'
        return x if keep else x.astype(dtype)
    return jax.tree_util.tree_map_with_path(one, params)


def loss_fn(params: dict, cfg: GlmConfig, tc: TrainConfig, tokens: jax.Array):
    """tokens [B, T+1]. Returns (total loss, (main loss, MTP loss, loads))."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, mtp_logits, loads = train_forward(cfg, _cast(params, jnp.dtype(tc.dtype)), inputs)
    main = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    mtp = optax.softmax_cross_entropy_with_integer_labels(mtp_logits, targets[:, 1:]).mean()
    return main + tc.mtp_weight * mtp, (main, mtp, loads)


# ----------------------------------------------------------------------------------------
# Optimizer, bias update, the jitted step.


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, min(tc.warmup, max(tc.steps - 1, 1)), max(tc.steps, 2),
        end_value=tc.lr * tc.min_lr_ratio)
    decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731 (not norms, biases)
    train = optax.chain(optax.clip_by_global_norm(tc.clip),
                        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay,
                                    mask=decay))
    labels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: 'bias' if _is_bias(path) else 'train', p)
    return optax.multi_transform({'train': train, 'bias': optax.set_to_zero()}, labels)


def moe_biases(cfg: GlmConfig, params: dict) -> list[tuple]:
    """The params paths of the correction biases, in the order of train_forward's loads."""
    paths = [('model', 'layers', i, 'mlp', 'router_bias')
             for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return paths + [('mtp', 'layer', 'mlp', 'router_bias')]


def update_biases(cfg: GlmConfig, params: dict, loads: jax.Array, rate: float) -> dict:
    """Each expert's bias moves by `rate` against its load: down if above the layer's mean
    load, up if below (DeepSeek-V3's auxiliary-loss-free balancing)."""
    params = jax.tree.map(lambda x: x, params)  # a new tree; leaves shared
    for path, load in zip(moe_biases(cfg, params), loads, strict=True):
        node = params
        for k in path[:-1]:
            node = node[k]
        load = load.astype(jnp.float32)
        node[path[-1]] = node[path[-1]] + rate * jnp.sign(load.mean() - load)
    return params


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(cfg: GlmConfig, tc: TrainConfig, params: dict, opt_state, tokens: jax.Array):
    """One step: returns (params, opt_state, metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (main, mtp, loads)), grads = grad_fn(params, cfg, tc, tokens)
    updates, opt_state = optimizer(tc).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = update_biases(cfg, params, loads, tc.bias_rate)
    balance = loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-9)
    metrics = {'loss': loss, 'main': main, 'mtp': mtp, 'grad_norm': optax.global_norm(grads),
               'balance': balance.max()}
    return params, opt_state, metrics


def init_state(cfg: GlmConfig, tc: TrainConfig) -> tuple[dict, object]:
    from glmjax.model import init_params
    params = init_params(cfg, jnp.float32, seed=tc.seed, mtp=True)
    return params, optimizer(tc).init(params)


# ----------------------------------------------------------------------------------------
# Data: the batch of step s depends on (seed, s) only.


class Batches:
    """Rows [N, T+1] in a fresh seeded order each epoch; `get(step)` -> [B, T+1] int32."""

    def __init__(self, rows: np.ndarray, batch: int, seed: int):
        if len(rows) < batch:
            raise ValueError(f'{len(rows)} rows of data, fewer than a batch of {batch}')
        self.rows, self.batch, self.seed = rows, batch, seed
        self.per_epoch = len(rows) // batch
        self._order = (None, None)

    def get(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch])
                           .permutation(len(self.rows)))
        return self.rows[self._order[1][i * self.batch:(i + 1) * self.batch]]


# ----------------------------------------------------------------------------------------
# Checkpoints to resume from: every leaf of (params, optimizer state), and the step.


def save_state(path: str, step: int, params: dict, opt_state) -> None:
    leaves = jax.tree.leaves((params, opt_state))
    tmp = path + '.tmp.npz'
    np.savez(tmp, step=np.int64(step), **{f'l{i}': np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint


def load_state(path: str, params: dict, opt_state) -> tuple[int, dict, object]:
    """Restores into the structure of (params, opt_state), checking every shape."""
    template, treedef = jax.tree.flatten((params, opt_state))
    with np.load(path) as z:
        leaves = [z[f'l{i}'] for i in range(len(template))]
        step = int(z['step'])
        if f'l{len(template)}' in z.files:
            raise ValueError(f'{path} has more tensors than this model and optimizer')
    for i, (a, b) in enumerate(zip(leaves, template, strict=True)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f'{path}: tensor {i} is {a.dtype}{list(a.shape)}, expected '
                             f'{b.dtype}{list(b.shape)}: another model or optimizer')
    params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
    return step, params, opt_state


# ----------------------------------------------------------------------------------------
# Export as a Hugging Face checkpoint directory.


def hf_tensors(cfg: GlmConfig, params: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """The published (per-expert) layout, the inverse of glmjax.hf's reading. The router
    and its correction bias stay fp32; everything else is cast to `dtype`."""
    from glmjax.hf import _flatten, sources
    flat = _flatten(jax.tree.map(np.asarray, params))
    out = {}
    for path, src in sources(cfg, mtp='mtp' in params).items():
        value = flat[path].astype(np.float32)
        keep = path[-1] in ('router', 'router_bias')
        cast = lambda t: np.ascontiguousarray(t, np.float32 if keep else dtype)  # noqa: E731,B023
        if '{e}' in src.name:
            for e in range(value.shape[0]):
                out[src.name.format(e=e)] = cast(_to_hf(value[e], src.n_in))
        elif src.flat:
            out[src.name] = cast(value.reshape(-1))
        else:
            out[src.name] = cast(_to_hf(value, src.n_in))
    return out


def _to_hf(t: np.ndarray, n_in: int | None) -> np.ndarray:
    """glmjax [in..., out...] -> torch [out, in] for a linear weight; others unchanged."""
    if n_in is None:
        return t
    rows = math.prod(t.shape[:n_in])
    return t.reshape(rows, -1).T


def hf_config(cfg: GlmConfig, dtype: str) -> dict:
    """config.json as GLM-4.6 publishes it (rope keys at top level)."""
    return {
        'architectures': ['Glm4MoeForCausalLM'], 'model_type': 'glm4_moe',
        **{k: getattr(cfg, k) for k in (
            'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
            'num_attention_heads', 'num_key_value_heads', 'head_dim', 'partial_rotary_factor',
            'rope_theta', 'max_position_embeddings', 'rms_norm_eps', 'attention_bias',
            'use_qk_norm', 'moe_intermediate_size', 'n_routed_experts', 'n_shared_experts',
            'num_experts_per_tok', 'first_k_dense_replace', 'norm_topk_prob',
            'routed_scaling_factor', 'n_group', 'topk_group', 'num_nextn_predict_layers')},
        'eos_token_id': list(cfg.eos_token_ids), 'pad_token_id': cfg.pad_token_id,
        'hidden_act': 'silu', 'tie_word_embeddings': False, 'attention_dropout': 0.0,
        'initializer_range': 0.02, 'use_cache': True, 'torch_dtype': dtype,
    }


def export(cfg: GlmConfig, params: dict, tokenizer_file: str, out: str,
           dtype: str = 'bfloat16', template_file: str | None = None) -> str:
    """Writes config.json, model.safetensors, tokenizer.json, chat_template.jinja and
    generation_config.json to `out` (replaced whole, via a temporary directory)."""
    import shutil

    import ml_dtypes
    from safetensors.numpy import save_file

    from glmjax import corpus
    np_dtype = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}[dtype]
    tmp = out.rstrip('/') + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(hf_tensors(cfg, params, np_dtype), os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})
    files = {'config.json': hf_config(cfg, dtype),
             'generation_config.json': {'eos_token_id': list(cfg.eos_token_ids),
                                        'pad_token_id': cfg.pad_token_id,
                                        'do_sample': False},
             'tokenizer_config.json': {'tokenizer_class': 'PreTrainedTokenizerFast',
                                       'eos_token': corpus.EOT, 'pad_token': corpus.EOT,
                                       'clean_up_tokenization_spaces': False,
                                       'model_max_length': cfg.max_position_embeddings}}
    for name, content in files.items():
        with open(os.path.join(tmp, name), 'w') as f:
            json.dump(content, f, indent=2)
    shutil.copy(tokenizer_file, os.path.join(tmp, 'tokenizer.json'))
    shutil.copy(template_file or corpus.chat_template_path(),
                os.path.join(tmp, 'chat_template.jinja'))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class Run:
    """Where a run lives: OUT/corpus (tokens, tokenizer.json, eval prompts), OUT/state.npz
    (the checkpoint to resume from), OUT/train.json (its settings), OUT/log.jsonl, OUT/hf."""
    out: str

    def __getattr__(self, name):
        files = {'corpus': 'corpus', 'state': 'state.npz', 'settings': 'train.json',
                 'log': 'log.jsonl', 'hf': 'hf'}
        if name not in files:
            raise AttributeError(name)
        return os.path.join(self.out, files[name])

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.corpus, 'tokenizer.json')


def prepare_corpus(run: Run, cc, log=print):
    """The corpus of the run, built once and reused (by resumed runs too)."""
    from glmjax import corpus as C
    if not os.path.exists(os.path.join(run.corpus, 'tokens.npz')):
        os.makedirs(run.corpus, exist_ok=True)
        built, _ = C.build(cc, tokenizer_out=run.tokenizer, log=log)
        built.save(run.corpus)
    import tokenizers
    return C.Corpus.load(run.corpus), tokenizers.Tokenizer.from_file(run.tokenizer)


def model_for(tokenizer, sizes: dict) -> GlmConfig:
    from glmjax import corpus as C
    eos = tuple(tokenizer.token_to_id(t) for t in C.EOS_TOKENS)
    vocab = -(-tokenizer.get_vocab_size(with_added_tokens=True) // 128) * 128
    return demo_config(vocab, eos, eos[0], **sizes)


class Progress:
    """One line per `every` steps: loss, MTP loss, balance, tokens/s, time left."""

    def __init__(self, total: int, start: int, tokens_per_step: int, every: int, stream):
        self.total, self.start, self.tps, self.every = total, start, tokens_per_step, every
        self.stream, self.t0 = stream, time.perf_counter()
        self.tty = getattr(stream, 'isatty', lambda: False)()

    def update(self, step: int, m: dict) -> dict | None:
        done = step + 1
        if done % self.every and done != self.total:
            return None
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) * self.tps / max(elapsed, 1e-9)
        left = (self.total - done) * self.tps / max(rate, 1e-9)
        rec = {'step': done, **{k: round(float(v), 4) for k, v in m.items()},
               'tokens_per_s': round(rate, 1), 'elapsed_s': round(elapsed, 1)}
        bar = '#' * int(30 * done / self.total)
        line = (f'[{bar:<30}] {done}/{self.total} loss {rec["main"]:.3f} mtp {rec["mtp"]:.3f} '
                f'balance {rec["balance"]:.2f} {rate:,.0f} tok/s {elapsed / 60:.1f} min, '
                f'{left / 60:.1f} min left')
        end = '\n' if not self.tty or done == self.total else ''
        print(('\r' if self.tty else '') + line, end=end, file=self.stream, flush=True)
        return rec


def train(out: str, tc: TrainConfig, cc=None, sizes: dict | None = None,
          resume: bool = False, stop_after: int | None = None, checkpoint_every: int = 200,
          log_every: int = 10, export_dir: str | None = None, export_dtype='bfloat16',
          log=print, stream=sys.stderr) -> tuple[GlmConfig, dict]:
    """Trains (or resumes) the run in `out`; returns the config and the fp32 params.
    `stop_after` ends early at that step, with a checkpoint (as an interruption would)."""
    from glmjax import corpus as C
    run = Run(out)
    os.makedirs(out, exist_ok=True)
    corpus, tokenizer = prepare_corpus(run, cc or C.CorpusConfig(seed=tc.seed), log)
    cfg = model_for(tokenizer, sizes or {})
    settings = {'train': dataclasses.asdict(tc), 'model': dataclasses.asdict(cfg)}
    params, opt_state = init_state(cfg, tc)
    start = 0
    if resume and os.path.exists(run.state):
        with open(run.settings) as f:
            saved = json.load(f)
        if json.loads(json.dumps(settings)) != saved:
            raise ValueError(f'{run.settings} differs from these settings: resume with the '
                             'same flags, or use a new --out')
        start, params, opt_state = load_state(run.state, params, opt_state)
        log(f'resumed from {run.state} at step {start}')
    with open(run.settings, 'w') as f:
        json.dump(settings, f, indent=1)
    batches = Batches(C.pack(corpus, tc.seq_len, tc.seed), tc.batch, tc.seed)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(f'model: {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers + MTP, '
        f'{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, vocab '
        f'{cfg.vocab_size}; data: {len(batches.rows)} rows of {tc.seq_len + 1} tokens')
    end = tc.steps if stop_after is None else min(stop_after, tc.steps)
    progress = Progress(tc.steps, start, tc.batch * tc.seq_len, log_every, stream)
    with open(run.log, 'a') as logf:
        for step in range(start, end):
            tokens = jnp.asarray(batches.get(step))
            params, opt_state, metrics = train_step(cfg, tc, params, opt_state, tokens)
            rec = progress.update(step, metrics)
            if rec:
                logf.write(json.dumps(rec) + '\n')
                logf.flush()
            if (step + 1) % checkpoint_every == 0 or step + 1 == end:
                save_state(run.state, step + 1, params, opt_state)
    if end == tc.steps and export_dir != '':
        path = export(cfg, params, run.tokenizer, export_dir or run.hf, export_dtype)
        log(f'exported {path}')
    return cfg, params


# ----------------------------------------------------------------------------------------
# Evaluation on held-out data.


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(cfg: GlmConfig, params: dict, tokens: jax.Array):
    """tokens [B, T+1] -> (sum of CE, count, loads [L, E], MTP agreements, MTP hits)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, mtp_logits, loads = train_forward(cfg, params, inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    draft = mtp_logits.argmax(-1)  # [B, T-1]: the guess for the token at t+2
    agree = (draft == logits[:, 1:].argmax(-1)).sum()  # the model's own next-next token
    hits = (draft == targets[:, 1:]).sum()  # the text's
    return ce.sum(), ce.size, loads, agree, hits


def _loads_balance(loads: np.ndarray) -> list[float]:
    """Per MoE layer: the largest expert load over the mean."""
    return (loads.max(-1) / loads.mean(-1)).tolist()


def heldout_figures(cfg, params, corpus, seq_len=512, max_rows=64, batch=8,
                    mix=None) -> dict:
    """Loss, perplexity, router balance and MTP agreement on the held-out code; with `mix`
    (corpus.heldout_mix) the router balance on held-out text in the training mix too."""
    from glmjax.corpus import pack, rows_of
    rows = rows_of(corpus.held_code, seq_len, max_rows)
    total, count, agree, hits, loads = 0.0, 0, 0, 0, 0
    if not len(rows):
        raise ValueError(f'the held-out text has fewer than {seq_len + 1} tokens')
    for i in range(0, len(rows), batch):
        ce, n, ld, a, h = _eval_batch(cfg, params, jnp.asarray(rows[i:i + batch]))
        total, count, agree, hits = total + float(ce), count + int(n), agree + int(a), hits + int(h)
        loads = loads + np.asarray(ld)
    mixed = {}
    if mix is not None:
        mix_rows = pack(mix, seq_len, seed=0)[:max_rows]
        mix_balance = _loads_balance(sum(
            np.asarray(_eval_batch(cfg, params, jnp.asarray(mix_rows[i:i + batch]))[2])
            for i in range(0, len(mix_rows), batch)))
        mixed = {'balance_mix_per_moe_layer': mix_balance, 'balance_mix_max': max(mix_balance)}
    # The unigram baseline on the same targets, from the training tokens (add-one).
    counts = np.bincount(np.concatenate([corpus.code, corpus.docs]), minlength=cfg.vocab_size)
    logp = np.log((counts + 1) / (counts.sum() + cfg.vocab_size))
    unigram = float(-logp[rows[:, 1:]].mean())
    balance = _loads_balance(loads)
    mtp_n = count - count // seq_len
    return {'heldout_tokens': count, 'heldout_loss': total / count,
            'heldout_ppl': math.exp(total / count), 'unigram_loss': unigram,
            'unigram_ppl': math.exp(unigram), 'balance_per_moe_layer': balance,
            'balance_max': max(balance), **mixed, 'mtp_agreement': agree / mtp_n,
            'mtp_accuracy': hits / mtp_n}


def _generate_texts(cfg, params, tokenizer, prompts: list[str], max_new: int,
                    stop_ids: tuple[int, ...], batch: int = 16) -> list[tuple[str, bool]]:
    """Greedy completions: (text without the stop token, whether a stop token ended it)."""
    from glmjax.generate import generate
    out = []
    for i in range(0, len(prompts), batch):
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts[i:i + batch]]
        for row in generate(cfg, params, ids, max_new, stop_ids=stop_ids):
            stopped = bool(row) and row[-1] in stop_ids
            out.append((tokenizer.decode(row[:-1] if stopped else row,
                                         skip_special_tokens=False), stopped))
    return out


def tool_figures(cfg, params, tokenizer, prompts: list[dict], max_new: int = 96) -> dict:
    """Held-out tool requests, alternately with thinking on and off: the share whose greedy
    answer parses to a call of the right tool with schema-valid arguments."""
    from glmjax import corpus as C
    parser = C._parser_module()
    template = C.chat_template()
    texts = [template.render([{'role': 'user', 'content': p['user']}], tools=C.TOOLS,
                             add_generation_prompt=True,
                             **({} if i % 2 == 0 else {'enable_thinking': False}))
             for i, p in enumerate(prompts)]
    outs = _generate_texts(cfg, params, tokenizer, texts, max_new, cfg.eos_token_ids)
    ok, exact, by_mode, samples = 0, 0, [0, 0], []
    for i, (p, (text, _)) in enumerate(zip(prompts, outs, strict=True)):
        calls = parser.parse(text, C.TOOLS).tool_calls
        good = False
        if calls and calls[0].name == p['name']:
            try:
                args = json.loads(calls[0].arguments)
            except json.JSONDecodeError:
                args = None
            good = args is not None and not C.schema_errors(p['name'], args)
            exact += good and args == p['arguments']
        ok += good
        by_mode[i % 2] += good
        if len(samples) < 4:
            samples.append({'user': p['user'], 'output': text})
    n = len(prompts)
    return {'tool_prompts': n, 'tool_call_valid': ok / n, 'tool_call_exact': exact / n,
            'tool_call_valid_thinking_on': by_mode[0] / ((n + 1) // 2),
            'tool_call_valid_thinking_off': by_mode[1] / max(n // 2, 1),
            'tool_samples': samples}


def function_body(completion: str, stopped: bool, indent: int = 0) -> str:
    """The body lines of a completion up to the end of the function: the first line back at
    the signature's column `indent`, or (cut by the token limit) the last whole line."""
    lines = completion.split('\n')
    if not stopped:
        lines = lines[:-1]
    body = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return '\n'.join(body)


def signature_figures(cfg, params, tokenizer, signatures: list[dict], max_new: int = 128):
    """Greedy completions of held-out function signatures: the share that parses."""
    import ast
    import textwrap

    from glmjax.corpus import EOT
    # The signature as it stands in its file (a method indented), ending at the colon:
    # byte-level BPE joins a newline with the indentation after it, so a prompt ending in a
    # bare newline would split a token that training never saw split.
    indents = [s.get('indent', 0) for s in signatures]
    prompts = [textwrap.indent(s['signature'], ' ' * n) for s, n in zip(signatures, indents,
                                                                          strict=True)]
    outs = _generate_texts(cfg, params, tokenizer, prompts, max_new,
                           (tokenizer.token_to_id(EOT),))
    good, samples = 0, []
    for prompt, n, (text, stopped) in zip(prompts, indents, outs, strict=True):
        head, _, rest = text.partition('\n')
        code = textwrap.dedent(prompt + head + '\n' + function_body(rest, stopped, n))
        try:
            ast.parse(code)
            good += 1
        except SyntaxError:
            pass
        if len(samples) < 3:
            samples.append(code)
    return {'signatures': len(prompts), 'signature_parse_rate': good / max(len(prompts), 1),
            'signature_samples': samples}


def evaluate(hf_dir: str, corpus_dir: str, seq_len: int = 512, max_rows: int = 64) -> dict:
    """Every figure of the report, measured on the exported checkpoint as it ships."""
    import tokenizers

    from glmjax import corpus as C
    from glmjax.hf import load_hf
    cfg = GlmConfig.from_hf(hf_dir)
    params = load_hf(hf_dir, cfg, jnp.float32)
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, 'tokenizer.json'))
    corpus = C.Corpus.load(corpus_dir)
    figures = heldout_figures(cfg, params, corpus, seq_len, max_rows,
                              mix=C.heldout_mix(tokenizer, corpus.eval['held_files']))
    figures.update(tool_figures(cfg, params, tokenizer, corpus.eval['tool_prompts']))
    figures.update(signature_figures(cfg, params, tokenizer, corpus.eval['signatures']))
    return figures


# ----------------------------------------------------------------------------------------
# Command line.


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog='glmjax-train', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', default='/tmp/glmjax-train',
                   help='run directory: corpus, checkpoint, log, and the exported model (hf/)')
    p.add_argument('--export', default=None,
                   help='where to write the final Hugging Face directory (default OUT/hf)')
    p.add_argument('--resume', action='store_true',
                   help='continue from OUT/state.npz (same flags required)')
    p.add_argument('--eval', metavar='HF_DIR', default=None,
                   help='only evaluate HF_DIR on the held-out data of OUT/corpus')
    p.add_argument('--threads', type=int, default=0,
                   help='XLA:CPU threads (0: all); with 1, pin the process too: taskset -c N')
    for f in dataclasses.fields(TrainConfig):
        p.add_argument('--' + f.name, type=type(getattr(d, f.name)), default=getattr(d, f.name),
                       help=FLAG_HELP.get(f.name))
    p.add_argument('--vocab_size', type=int, default=4096, help='BPE size, specials included')
    p.add_argument('--tool_conversations', type=int, default=5000)
    p.add_argument('--max_files', type=int, default=None, help='only the first N stdlib files')
    p.add_argument('--hidden_size', type=int, default=None)
    p.add_argument('--num_hidden_layers', type=int, default=None)
    p.add_argument('--n_routed_experts', type=int, default=None)
    p.add_argument('--num_experts_per_tok', type=int, default=None)
    p.add_argument('--moe_intermediate_size', type=int, default=None)
    p.add_argument('--checkpoint_every', type=int, default=200)
    p.add_argument('--log_every', type=int, default=10)
    p.add_argument('--export_dtype', default='bfloat16', choices=('bfloat16', 'float32'))
    return p


def _set_threads(n: int):
    """Before the first computation: the CPU client reads XLA_FLAGS when it starts."""
    if n == 1:
        flags = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
    elif n > 1:
        flags = f'intra_op_parallelism_threads={n}'
    else:
        return
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _set_threads(args.threads)
    from glmjax import corpus as C
    if args.eval:
        figures = evaluate(args.eval, Run(args.out).corpus, args.seq_len)
        print(json.dumps(figures, indent=1, ensure_ascii=False))
        return 0
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cc = C.CorpusConfig(vocab_size=args.vocab_size, tool_conversations=args.tool_conversations,
                        max_files=args.max_files, seed=tc.seed)
    sizes = {k: getattr(args, k) for k in ('hidden_size', 'num_hidden_layers',
                                            'n_routed_experts', 'num_experts_per_tok',
                                            'moe_intermediate_size')
             if getattr(args, k) is not None}
    start = time.perf_counter()
    train(args.out, tc, cc, sizes, resume=args.resume, checkpoint_every=args.checkpoint_every,
          log_every=args.log_every, export_dir=args.export, export_dtype=args.export_dtype)
    print(f'training took {(time.perf_counter() - start) / 60:.1f} min', file=sys.stderr)
    return 0


def run():
    sys.exit(main())


if __name__ == '__main__':
    run()
