"""glmjax-train on a tiny config: loss goes down, the router bias moves against the load,
a resumed run is bit-identical, the export loads in transformers and glmjax alike; the corpus
keeps its held-out files out; tool conversations parse back; the shipped demo model beats a
unigram model on held-out stdlib text."""

import dataclasses
import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import GlmConfig, forward, hidden_states, load_hf, mtp_forward
from glmjax import corpus as C
from glmjax import train as T

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, n_routed_experts=4,
             num_experts_per_tok=2, max_position_embeddings=256)
CC = C.CorpusConfig(vocab_size=384, tool_conversations=30, max_files=12, eval_tool_prompts=4,
                    eval_signatures=4)
TC = T.TrainConfig(steps=8, batch=2, seq_len=64, lr=2e-2, warmup=2, seed=3)
DEMO = os.path.join(os.path.dirname(T.__file__), 'demo_model')


def _train(out, **kwargs):
    return T.train(str(out), TC, CC, SIZES, log=lambda *_: None, log_every=1,
                   checkpoint_every=100, **kwargs)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One uninterrupted run, exported in fp32."""
    out = tmp_path_factory.mktemp('run')
    cfg, params = _train(out, export_dtype='float32')
    return out, cfg, params


def test_loss_goes_down(run):
    out, _, _ = run
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in log] == list(range(1, TC.steps + 1))
    assert log[-1]['main'] < log[0]['main'] - 0.3, log
    assert all(np.isfinite(r['mtp']) and r['mtp'] > 0 for r in log)


def test_resume_is_bit_identical(run, tmp_path):
    out, _, params = run
    shutil.copytree(out / 'corpus', tmp_path / 'corpus')
    _train(tmp_path, stop_after=3)
    assert not (tmp_path / 'hf').exists()  # interrupted: nothing exported
    _, resumed = _train(tmp_path, resume=True)
    a, b = jax.tree.leaves(params), jax.tree.leaves(resumed)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_refuses_other_settings(run, tmp_path):
    out, _, _ = run
    shutil.copytree(out, tmp_path / 'r')
    with pytest.raises(ValueError, match='differs'):
        T.train(str(tmp_path / 'r'), dataclasses.replace(TC, lr=1e-3), CC, SIZES,
                resume=True, log=lambda *_: None)


def test_bias_moves_against_the_load():
    cfg = T.demo_config(64, **SIZES)
    params, _ = T.init_state(cfg, TC)
    loads = jnp.array([[8, 0, 4, 4], [1, 1, 1, 13]])  # the MoE layer, then the MTP layer
    new = T.update_biases(cfg, params, loads, 0.01)
    np.testing.assert_allclose(new['model']['layers'][1]['mlp']['router_bias'],
                               [-0.01, 0.01, 0, 0])
    np.testing.assert_allclose(new['mtp']['layer']['mlp']['router_bias'],
                               [0.01, 0.01, 0.01, -0.01])


def test_router_gets_gradient_through_weights_bias_none():
    """As GLM and DeepSeek-V3 route: the biased scores choose, the unbiased scores weigh."""
    from glmjax.moe import route
    cfg = T.demo_config(64, **SIZES)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(16, 32), jnp.float32)
    router = jnp.asarray(rng.randn(32, 4) * 0.3, jnp.float32)
    bias = jnp.asarray([0.3, -0.2, 0.1, 0.0], jnp.float32)
    target = jnp.asarray(rng.randn(16, 2), jnp.float32)
    f = lambda r, b: (route(cfg, x, r, b)[0] * target).sum()  # noqa: E731
    g_router, g_bias = jax.grad(f, argnums=(0, 1))(router, bias)
    assert np.any(np.asarray(g_router)) and not np.any(np.asarray(g_bias))


def test_train_step_moves_bias_by_the_rate_only(run):
    """Each step moves each bias by exactly +-rate or 0: the optimizer gives it no update
    and no weight decay; the router weights do get one."""
    _, cfg, params = run
    before = jax.tree.map(np.asarray, params)
    opt_state = T.optimizer(TC).init(params)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 65)))
    new = jax.tree.map(jnp.array, params)
    for _ in range(2):  # the learning rate of the first step is 0 (warmup)
        new, opt_state, _ = T.train_step(cfg, TC, new, opt_state, tokens)
    for layer in (new['model']['layers'][1]['mlp'], new['mtp']['layer']['mlp']):
        old = (before['model']['layers'][1]['mlp'] if layer is new['model']['layers'][1]['mlp']
               else before['mtp']['layer']['mlp'])
        delta = np.asarray(layer['router_bias']) - old['router_bias']
        np.testing.assert_allclose(np.abs(delta) / TC.bias_rate, np.round(np.abs(delta)
                                   / TC.bias_rate), atol=1e-3)
        assert np.abs(delta).max() > 0 and np.round(np.abs(delta) / TC.bias_rate).max() <= 2
        assert not np.array_equal(np.asarray(layer['router']), old['router'])


def test_train_forward_is_the_model_forward(run):
    _, cfg, params = run
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 12)))
    logits, mtp_logits, loads = jax.jit(T.train_forward, static_argnums=0)(cfg, params, tokens)
    np.testing.assert_allclose(logits, forward(cfg, params, tokens), atol=1e-5)
    h = hidden_states(cfg, params, tokens)
    ref = mtp_forward(cfg, params, h[:, :-1], tokens[:, 1:])
    np.testing.assert_allclose(mtp_logits, ref, atol=1e-5)
    assert loads.shape == (2, cfg.n_routed_experts)
    k = cfg.num_experts_per_tok
    assert np.asarray(loads).sum(-1).tolist() == [2 * 12 * k, 2 * 11 * k]  # main, MTP


def _hf_parity(path, atol=1e-4):
    import torch
    from transformers import Glm4MoeForCausalLM

    cfg = GlmConfig.from_hf(path)
    ours = load_hf(path, cfg, jnp.float32)
    assert 'mtp' in ours
    ref = Glm4MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want = ref(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(cfg, ours, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    return cfg, ours


def test_export_loads_in_transformers_and_glmjax(run):
    out, cfg, params = run
    files = set(os.listdir(out / 'hf'))
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'chat_template.jinja',
            'generation_config.json'} <= files
    loaded_cfg, loaded = _hf_parity(out / 'hf')
    assert loaded_cfg.eos_token_ids == cfg.eos_token_ids
    # An fp32 export is exact: the same tree, the same values.
    a, b = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(loaded)
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(['--help'])
    assert e.value.code == 0
    assert '--resume' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# Corpus.


def test_held_out_files_stay_out(run):
    out, _, _ = run
    files = C.stdlib_files()
    held = {p for p, _ in files if C.is_held_out(p)}
    assert 0 < len(held) < len(files) // 10
    meta = C.Corpus.load(str(out / 'corpus')).eval
    assert meta['held_files'] and not set(meta['held_files']) & set(meta['train_files'])
    assert set(meta['held_files']) <= held and not set(meta['train_files']) & held
    # The held-out signatures come from held-out files only.
    held_modules = {C.module_name(p) for p in held}
    assert all(s['module'] in held_modules for s in meta['signatures'])


def test_tool_conversations_parse_back():
    parser = C._parser_module()
    template = C.chat_template()
    rng, calls, modes = random.Random(0), 0, set()
    for _ in range(40):
        messages, thinking = C.tool_conversation(rng)
        text = C.render(template, messages, thinking, tools=C.TOOLS)
        assert text.startswith('[gMASK]<sop><|system|>') and text.endswith('<|user|>')
        if len(messages) < 3:
            continue
        modes.add(thinking)
        want = messages[1]['tool_calls'][0]['function']
        # What the model must write: from the first assistant turn to the observation.
        turn = text.split('<|assistant|>', 1)[1].split('<|observation|>')[0]
        parsed = parser.parse(turn, C.TOOLS)
        assert [c.name for c in parsed.tool_calls] == [want['name']]
        args = json.loads(parsed.tool_calls[0].arguments)
        assert args == want['arguments'] and not C.schema_errors(want['name'], args)
        assert bool(parsed.reasoning) == thinking
        calls += 1
    assert calls > 20 and modes == {True, False}


def test_schema_errors():
    assert not C.schema_errors('get_weather', {'city': 'Oslo', 'unit': 'celsius'})
    assert C.schema_errors('get_weather', {'unit': 'kelvin'}) == [
        'missing city', "unit='kelvin' not in ['celsius', 'fahrenheit']"]
    assert C.schema_errors('calculator', {'expression': 3}) == ['expression is not a string']
    assert C.schema_errors('nope', {}) == ["unknown tool 'nope'"]


def test_packed_rows_hold_whole_documents(run):
    out, _, _ = run
    corpus = C.Corpus.load(str(out / 'corpus'))
    rows = C.pack(corpus, 400, seed=0)
    assert rows.shape[1] == 401 and rows.dtype == np.int32
    gmask = 2  # [gMASK] is the third special token
    assert C.SPECIAL_TOKENS[gmask] == '[gMASK]'
    starts = (rows == gmask).sum()
    n_docs = sum(1 for i in range(len(corpus.doc_offsets) - 1)
                 if corpus.doc_offsets[i + 1] - corpus.doc_offsets[i] <= 401)
    assert starts >= n_docs  # every document that fits a row is in (code may add more)


# ----------------------------------------------------------------------------------------
# The shipped demo model.


@pytest.mark.skipif(not os.path.isdir(DEMO), reason='no glmjax/demo_model')
def test_demo_model_matches_transformers():
    _hf_parity(DEMO)


@pytest.mark.skipif(not os.path.isdir(DEMO), reason='no glmjax/demo_model')
def test_demo_model_beats_unigram_on_held_out_text():
    """Random weights fail this: the model's loss on held-out stdlib files is well below the
    entropy of a unigram model fitted to that very text."""
    import tokenizers

    cfg = GlmConfig.from_hf(DEMO)
    params = load_hf(DEMO, cfg, jnp.float32)
    tok = tokenizers.Tokenizer.from_file(os.path.join(DEMO, 'tokenizer.json'))
    held = [t for p, t in C.stdlib_files() if C.is_held_out(p)]
    ids = np.concatenate([tok.encode(t, add_special_tokens=False).ids for t in held])
    rows = C.rows_of(ids, 256, max_rows=4)
    logits = forward(cfg, params, jnp.asarray(rows[:, :-1]))
    logp = jax.nn.log_softmax(logits, -1)
    loss = -float(jnp.take_along_axis(logp, jnp.asarray(rows[:, 1:, None]), -1).mean())
    counts = np.bincount(rows[:, 1:].ravel(), minlength=cfg.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert loss < unigram - 1.0, (loss, unigram)


@pytest.mark.skipif(not os.path.isdir(DEMO), reason='no glmjax/demo_model')
def test_heldout_mix_is_held_out_text_in_the_training_mix():
    """What the router balance is measured on: the held-out files' code and documents made
    from held-out functions and tool prompts only, packed as training packs."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(DEMO, 'tokenizer.json'))
    held = [p for p, _ in C.stdlib_files() if C.is_held_out(p)]
    mix = C.heldout_mix(tok, held, tool_conversations=60)
    assert tok.decode(mix.code.tolist(), skip_special_tokens=False).count(C.EOT) == len(held)
    docs = [tok.decode(mix.doc(i).tolist()) for i in range(len(mix.doc_offsets) - 1)]
    modules = {C.module_name(p) for p, _ in C.stdlib_files() if C.is_held_out(p)}
    chats = [d for d in docs if '` from `' in d]
    assert chats and all(any(f'from `{m}`' in d for m in modules) for d in chats)
    training_cities = set(C.CITIES) - set(C._held(C.CITIES, True))
    assert not any(c in d for c in training_cities for d in docs)
    assert not any(answer in d for _, answer in C.CHITCHAT for d in docs)  # all in training
    rows = C.pack(mix, 512, seed=0)
    code = mix.code.tobytes()
    both = [(r == tok.token_to_id('<|user|>')).any() and code.find(r[-16:].tobytes()) >= 0
            for r in rows[:64]]  # documents first, then a piece of the code stream
    assert len(rows) >= 64 and sum(both) > 48, sum(both)
