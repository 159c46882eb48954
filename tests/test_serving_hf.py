"""glmjax-serve --hf_dir (a Hugging Face checkpoint directory: config.json, safetensors,
tokenizer.json) and --checkpoint (its glmjax-convert output) served through gRPC give
transformers' own greedy continuation."""

import io
import shutil

import grpc
import pytest

import hf_tiny
from glmjax.serving import default_model
from glmjax.serving.paged_engine import PagedEngine
from glmjax.serving.protos import pb, pb_grpc
from glmjax.serving.server import load_model
from glmjax.serving.service import GlmServer


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('GLMJAX_CACHE', str(tmp_path / 'cache'))
    tok = default_model.default_tokenizer()
    eos = [tok.token_id(t) for t in default_model.EOS_TOKENS]
    model = hf_tiny.make_model(seed=3, vocab_size=tok.vocab_size, eos_token_id=eos)
    path = tmp_path / 'ckpt'
    hf_tiny.save(model, str(path))
    shutil.copy(default_model.tokenizer_path(), path / 'tokenizer.json')
    return model, str(path)


@pytest.mark.parametrize('source', ['hf_dir', 'checkpoint'])
def test_served_greedy_equals_transformers(hf_dir, source, tmp_path):
    model, path = hf_dir
    if source == 'checkpoint':
        from glmjax.convert.convert import convert
        path = str(tmp_path / 'converted' / 'ckpt')
        convert(hf_dir[1], path, dtype='fp32', stream=io.StringIO())
    cfg, params, tok, name = load_model(**{source: path}, dtype='float32')
    assert name == 'ckpt' and tok.kind == 'tokenizers'
    assert cfg.vocab_size == tok.vocab_size and len(cfg.eos_token_ids) == 3
    server = GlmServer(PagedEngine(cfg, params, max_batch=2, max_seq_len=32, steps_per_call=4),
                       tok, cfg, name, max_queue=4).start()
    try:
        server.warmup()
        with grpc.insecure_channel(f'127.0.0.1:{server.port}') as channel:
            stub = pb_grpc.GlmStub(channel)
            text = 'The quick brown fox'
            req = pb.GenerateRequest(text=text, max_tokens=12, ignore_eos=True,
                                     sampling=pb.SamplingParams(temperature=0.0))
            responses = list(stub.Generate(req, timeout=60))
            ids = [t for r in responses for t in r.token_ids]
            assert ids == hf_tiny.torch_greedy(model, tok.encode(text), 12)
            assert ''.join(r.text for r in responses) == tok.decode(ids)
            info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=60)
            assert (info.model_name, info.vocab_size, info.max_seq_len) == \
                ('ckpt', tok.vocab_size, 32)
    finally:
        server.shutdown(grace=1)


def test_checkpoint_and_hf_dir_together_is_a_usage_error():
    from absl import app
    with pytest.raises(app.UsageError, match='not both'):
        load_model(checkpoint='a', hf_dir='b')
