"""Test-wide setup: 8 simulated CPU devices, so that sharded and unsharded runs share a process.
Unsharded code runs on the first device as it would on one accelerator."""

import jax

jax.config.update('jax_num_cpu_devices', 8)
