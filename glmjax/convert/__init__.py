"""Checkpoint tools: `glmjax-convert` (Hugging Face -> glmjax Orbax checkpoint, in
convert/convert.py) and `glmjax-verify` (transformers and glmjax logits side by side, in
convert/verify.py)."""
