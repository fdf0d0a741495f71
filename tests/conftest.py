"""Shared pytest set-up. Tests run on CPU in float32; nothing is downloaded."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# 8 virtual CPU devices for the sharding tests (must be set before jax is imported)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402

import pytest  # noqa: E402

# Identical programs (the same stage and config trained in several tests) compile once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "unclip_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: rare, slow tests (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def shapes_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on shapes-world captions (a directory path)."""
    from unclip_jax.data.shapes_tfds import as_numpy
    from unclip_jax.data.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("tokenizer"))
    d = as_numpy("train", 300, seed=0)
    train_tokenizer([c for cs in d["captions"] for c in cs], path, vocab_size=512,
                    context_length=24)
    return path
