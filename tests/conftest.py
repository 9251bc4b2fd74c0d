import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    key = jr.PRNGKey(5678)

    def _getkey():
        nonlocal key
        key, subkey = jr.split(key)
        return subkey

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    # Each test module compiles many programs; dropping them between modules keeps
    # one long pytest process (CI runs the whole suite in one) from accumulating them.
    yield
    jax.clear_caches()
