"""Tokenizers, incremental detokenisation and stop strings (no model, no server)."""

import random

import pytest

from glmjax.serving import default_model
from glmjax.serving.stops import StopMatcher
from glmjax.serving.tokenizer import REPLACEMENT, IncrementalDetokenizer, Tokenizer

TEXT = 'Hello café, Grüße 한국어 🎉 naïve <think>why</think> done.'  # some chars unseen in training


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> Tokenizer:
    mp = pytest.MonkeyPatch()
    mp.setenv('GLMJAX_CACHE', str(tmp_path_factory.mktemp('cache')))
    yield default_model.default_tokenizer()
    mp.undo()


def stream(tok: Tokenizer, ids: list[int], context=()) -> list[str]:
    d = IncrementalDetokenizer(tok, list(context))
    return [d.add(i) for i in ids] + [d.flush()]


def test_default_tokenizer_has_the_glm_special_tokens_by_name(tok):
    ids = tok.encode('[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>')
    names = tok.token_strings(ids)
    for name in ('[gMASK]', '<sop>', '<|user|>', '<|assistant|>', '<think>', '</think>'):
        assert name in names
    for name in default_model.SPECIAL_TOKENS + default_model.TAG_TOKENS:
        i = tok.token_id(name)
        assert i is not None and tok.decode([i]) == name  # survives decoding
    cfg = default_model.default_config(tok)
    # Padded like GLM's own vocabulary, so that it splits over tensor shards.
    assert cfg.vocab_size % 128 == 0 and 0 <= cfg.vocab_size - tok.vocab_size < 128
    assert cfg.eos_token_ids == tuple(tok.token_id(t) for t in default_model.EOS_TOKENS)


def test_default_tokenizer_is_built_once_and_cached(tok):
    path = default_model.tokenizer_path()
    mtime = default_model.os.path.getmtime(path)
    assert default_model.tokenizer_path() == path
    assert default_model.os.path.getmtime(path) == mtime


def test_multibyte_characters_split_across_tokens_are_held_back(tok):
    ids = tok.encode(TEXT)
    # Byte-level BPE splits some characters over several tokens: check that it happens here.
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    deltas = stream(tok, ids)
    assert ''.join(deltas) == TEXT
    assert not any(REPLACEMENT in d for d in deltas)


def test_random_byte_tokens_never_emit_a_premature_replacement(tok):
    """Whatever the model writes, the deltas add up to decoding everything at once."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        prompt = tok.encode('Hi there')
        assert ''.join(stream(tok, ids, prompt)) == tok.decode(ids)


def test_sentencepiece_model_is_accepted(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n'.join([TEXT, 'the quick brown fox jumps over the lazy dog'] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / 'tokenizer'),
                                   vocab_size=320, byte_fallback=True, character_coverage=0.99,
                                   hard_vocab_limit=False,
                                   minloglevel=2)
    sp = Tokenizer.from_dir(tmp_path)  # no tokenizer.json there: tokenizer.model
    assert sp.kind == 'sentencepiece'
    text = 'the fox 🚀 café'
    ids = sp.encode(text)
    assert ''.join(stream(sp, ids)) == sp.decode(ids) == text


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    m = StopMatcher(stops)
    out = ''.join(m.feed(p) for p in pieces)
    return out + m.flush(), m.matched


def test_stop_string_split_across_pieces_is_caught_and_hidden():
    assert feed_all(['STOP'], ['abc S', 'T', 'OP tail']) == ('abc ', 'STOP')
    assert feed_all(['\n\n'], ['one\n', '\ntwo']) == ('one', '\n\n')


def test_held_text_is_released_when_it_is_not_a_stop():
    m = StopMatcher(['STOP'])
    assert m.feed('abc ST') == 'abc '  # 'ST' might start 'STOP'
    assert m.feed('ay') == 'STay'
    assert feed_all(['STOP'], ['the end ST']) == ('the end ST', None)  # flushed at the end


def test_earliest_of_several_stops_wins():
    assert feed_all(['world', 'lo w'], ['hel', 'lo world']) == ('hel', 'lo w')
    assert feed_all(['x'], ['']) == ('', None)
