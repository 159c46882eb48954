"""The benchmark model configs (overrides of tests/hf_tiny's Hugging Face config): `tiny` as
in the tests, `small` with weights far larger than the CPU caches."""

CONFIGS = {
    'tiny': dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                 first_k_dense_replace=1),
    'small': dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  head_dim=64, moe_intermediate_size=512, n_routed_experts=32,
                  num_experts_per_tok=4, first_k_dense_replace=1),
}
