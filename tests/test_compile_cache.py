"""The persistent compilation cache helper (unclip_jax.compile_cache) and the CLI's switch.

The suite itself runs with a JAX cache directory set by conftest.py; the tests that need "no
directory configured" clear it for their duration and put it back."""
import os
import warnings

import jax
import pytest

from unclip_jax import compile_cache
from unclip_jax.compile_cache import DIR_ENV, SWITCH_ENV, enable_compilation_cache

_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
         "jax_enable_compilation_cache")


@pytest.fixture
def unconfigured(monkeypatch, tmp_path):
    """JAX as a user's process starts it: no cache directory, JAX's default threshold, none of
    our variables; XDG_CACHE_HOME points into tmp_path."""
    saved = {k: getattr(jax.config, k) for k in _KEYS}
    monkeypatch.setattr(compile_cache, "_state", {"disabled": False, "warned": False})
    for name in (DIR_ENV, SWITCH_ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    yield tmp_path
    for k, v in saved.items():
        jax.config.update(k, v)


def test_sets_the_default_dir_when_none_is_set(unconfigured):
    want = str(unconfigured / "xdg" / "unclip_jax" / "xla")
    assert compile_cache.default_cache_dir() == want
    assert enable_compilation_cache() == want
    assert jax.config.jax_compilation_cache_dir == want
    assert os.path.isdir(want)
    # small CPU compiles are cached too
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    assert threshold == compile_cache.MIN_COMPILE_TIME_SECS == 0.0
    assert enable_compilation_cache() == want  # a second call changes nothing


def test_env_dir_and_explicit_path(unconfigured, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(unconfigured / "env"))
    assert compile_cache.default_cache_dir() == str(unconfigured / "env")
    explicit = str(unconfigured / "explicit")
    assert enable_compilation_cache(explicit) == explicit
    assert jax.config.jax_compilation_cache_dir == explicit


def test_user_threshold_is_kept(unconfigured, monkeypatch):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    enable_compilation_cache()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.5)
    enable_compilation_cache()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5


def test_an_already_configured_dir_is_respected(unconfigured):
    mine = str(unconfigured / "mine")
    jax.config.update("jax_compilation_cache_dir", mine)
    other = unconfigured / "other"
    assert enable_compilation_cache(str(other)) == mine
    assert jax.config.jax_compilation_cache_dir == mine
    assert not other.exists()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0  # nothing else touched


def test_the_suite_cache_dir_survives():
    """conftest.py's JAX_COMPILATION_CACHE_DIR is what the helper reports and keeps."""
    before = jax.config.jax_compilation_cache_dir
    assert before == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert enable_compilation_cache() == before
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_env_off_switch(unconfigured, monkeypatch, value):
    monkeypatch.setenv(SWITCH_ENV, value)
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (unconfigured / "xdg").exists()


def test_disable_and_jax_switch(unconfigured):
    jax.config.update("jax_enable_compilation_cache", False)
    assert enable_compilation_cache() is None
    jax.config.update("jax_enable_compilation_cache", True)
    compile_cache.disable_compilation_cache()
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (unconfigured / "xdg").exists()


def test_an_unusable_dir_warns_once_and_goes_on(unconfigured):
    blocker = unconfigured / "a_file"
    blocker.write_text("not a directory")
    bad = str(blocker / "xla")  # cannot be created, whoever runs the test (root included)
    with pytest.warns(RuntimeWarning, match="compilation cache"):
        assert enable_compilation_cache(bad) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert enable_compilation_cache(bad) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert int(jax.jit(lambda x: x + 1)(1)) == 2  # compiling still works


def test_the_pipeline_turns_the_cache_on(monkeypatch, tmp_path):
    from unclip_jax import pipeline
    from unclip_jax.convert.diffusers_pipeline import NotAPipelineError

    calls = []
    monkeypatch.setattr(pipeline, "enable_compilation_cache", lambda: calls.append(1))
    with pytest.raises(NotAPipelineError):
        pipeline.UnCLIPPipeline.from_diffusers(str(tmp_path / "missing"))
    assert calls  # before anything of the pipeline is loaded or compiled


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_no_compile_cache_flag(monkeypatch, tmp_path, capsys, where):
    from unclip_jax.cli import main

    monkeypatch.setattr(compile_cache, "_state", {"disabled": False, "warned": False})
    cmd = ["sample", "--workdir", str(tmp_path / "missing"), "--prompt", "a red cube"]
    argv = ["--no-compile-cache"] + cmd if where == "before" else cmd + ["--no-compile-cache"]
    suite_dir = jax.config.jax_compilation_cache_dir
    assert main(argv) == 1  # parsed; fails fast on the missing workdir
    assert "error" in capsys.readouterr().err
    assert compile_cache.disabled()
    assert jax.config.jax_compilation_cache_dir == suite_dir


def test_cli_default_keeps_a_configured_cache(monkeypatch, tmp_path, capsys):
    from unclip_jax.cli import build_parser, main

    monkeypatch.setattr(compile_cache, "_state", {"disabled": False, "warned": False})
    assert build_parser().parse_args(["demo"]).no_compile_cache is False
    suite_dir = jax.config.jax_compilation_cache_dir
    assert main(["sample", "--workdir", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert not compile_cache.disabled()
    assert jax.config.jax_compilation_cache_dir == suite_dir
