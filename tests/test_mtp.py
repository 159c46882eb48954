"""The MTP layer: weights loaded from a checkpoint, forward against an independent torch
implementation of the formula (embedding first, main hidden after the final norm)."""

import json

import jax.numpy as jnp
import numpy as np
import torch
from safetensors.numpy import load_file, save_file

import hf_tiny
from glmjax import GlmConfig, hidden_states, load_hf, mtp_forward


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_head_matches_reference(tmp_path):
    main = hf_tiny.make_model(seed=11)
    L = main.config.num_hidden_layers
    donor = hf_tiny.make_model(seed=12, num_hidden_layers=L + 1)  # supplies a layer L
    hf_tiny.save(main, tmp_path)
    tensors = load_file(str(tmp_path / 'model.safetensors'))
    g = torch.Generator().manual_seed(0)
    D = main.config.hidden_size
    extra = {'enorm.weight': 1 + 0.1 * torch.randn(D, generator=g),
             'hnorm.weight': 1 + 0.1 * torch.randn(D, generator=g),
             'eh_proj.weight': torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5,
             'shared_head.norm.weight': 1 + 0.1 * torch.randn(D, generator=g)}
    layer_prefix = f'model.layers.{L}.'
    for name, value in donor.model.layers[L].state_dict().items():
        if name in ('mlp.experts.gate_up_proj', 'mlp.experts.down_proj'):
            continue
        tensors[layer_prefix + name] = value.numpy()
    E, F = main.config.n_routed_experts, main.config.moe_intermediate_size
    fused = donor.model.layers[L].mlp.experts
    for e in range(E):  # the published per-expert layout
        p = f'{layer_prefix}mlp.experts.{e}.'
        tensors[p + 'gate_proj.weight'] = fused.gate_up_proj[e, :F].detach().numpy()
        tensors[p + 'up_proj.weight'] = fused.gate_up_proj[e, F:].detach().numpy()
        tensors[p + 'down_proj.weight'] = fused.down_proj[e].detach().numpy()
    for name, value in extra.items():
        tensors[layer_prefix + name] = value.numpy()
    save_file(tensors, str(tmp_path / 'model.safetensors'))
    raw = json.loads((tmp_path / 'config.json').read_text())
    raw['num_nextn_predict_layers'] = 1
    (tmp_path / 'config.json').write_text(json.dumps(raw))

    cfg = GlmConfig.from_hf(tmp_path)
    params = load_hf(tmp_path, cfg, dtype=jnp.float32)
    assert 'mtp' in params

    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    h = hidden_states(cfg, params, jnp.asarray(tokens))
    nxt = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    ours = np.asarray(mtp_forward(cfg, params, h, jnp.asarray(nxt)))[:, :-1]

    eps = cfg.rms_norm_eps
    with torch.no_grad():
        ids = torch.from_numpy(tokens).long()
        hidden = main.model(ids).last_hidden_state  # after model.norm
        e = main.model.embed_tokens(torch.from_numpy(nxt).long())
        x = torch.cat([rms(e, extra['enorm.weight'], eps),
                       rms(hidden, extra['hnorm.weight'], eps)], -1) @ extra['eh_proj.weight'].T
        positions = torch.arange(9)[None].expand(2, 9)
        x = donor.model.layers[L](x, position_embeddings=main.model.rotary_emb(x, positions))
        ref = main.lm_head(rms(x, extra['shared_head.norm.weight'], eps))[:, :-1].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
