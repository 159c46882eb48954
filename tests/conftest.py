"""Test-wide setup: 8 simulated CPU devices, so that sharded and unsharded runs share a process.
Unsharded code runs on the first device as it would on one accelerator."""

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    """(cfg, params, tokenizer) of the tiny random GLM-4.6-shaped model, its tokenizer cached
    in a folder of the test's own. Files that want another model define their own."""
    from glmjax.serving import default_model
    mp = pytest.MonkeyPatch()
    mp.setenv('GLMJAX_CACHE', str(tmp_path_factory.mktemp('cache')))
    yield default_model.default_model()
    mp.undo()
