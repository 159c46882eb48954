"""Tiny GLM-4.x checkpoints built with transformers and saved the way Hugging Face saves them."""

import json
import math
import os

import numpy as np
import torch
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
    use_qk_norm=True, attention_bias=True, max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                     'partial_rotary_factor': 0.5},
    num_nextn_predict_layers=0, eos_token_id=None, pad_token_id=None,
    tie_word_embeddings=False,
)


def hf_config(**overrides) -> Glm4MoeConfig:
    return Glm4MoeConfig(**{**BASE, **overrides})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replaces transformers' init (ones, zeros, tiny routers) with values that exercise every
    weight: norms near 1, non-zero biases and correction bias, decisive routing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith('norm.weight'):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith('.bias'):
                p.copy_(0.1 * noise)
            elif name.endswith('mlp.gate.weight'):
                p.copy_(3.0 * noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith('e_score_correction_bias'):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make_model(seed: int = 0, **overrides) -> Glm4MoeForCausalLM:
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(hf_config(**overrides)).eval()
    randomize(model, seed)
    return model


def save(model: Glm4MoeForCausalLM, path: str, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return path


def legacy_config(path: str) -> None:
    """Rewrites config.json in the transformers 4.x spelling (rope keys at top level), as the
    published GLM checkpoints have it."""
    file = os.path.join(path, 'config.json')
    with open(file) as f:
        raw = json.load(f)
    rope = raw.pop('rope_parameters')
    raw['rope_theta'] = rope['rope_theta']
    raw['partial_rotary_factor'] = rope['partial_rotary_factor']
    with open(file, 'w') as f:
        json.dump(raw, f)


def torch_logits(model: Glm4MoeForCausalLM, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def torch_greedy(model: Glm4MoeForCausalLM, tokens: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(tokens):].tolist()


def prompts(vocab: int, lengths=(5, 11, 8), seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in lengths]
