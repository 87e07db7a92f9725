"""cluster/env.py: variables parse and fail with useful messages; the loopback environment is forced and
matches the Makefile's exports."""

import re
from pathlib import Path

import pytest

from cluster import env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in env.environment_variables:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    assert env.BLOCKSERVE_GRPC_PORT == 9000
    assert env.BLOCKSERVE_LOG_LEVEL == "INFO"
    assert Path(env.BLOCKSERVE_MODEL_PATH) == REPO / "model" / "assets" / "tiny-diffusiongemma"


def test_values_are_read_at_access_time(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("BLOCKSERVE_GRPC_PORT", "9100")
    clean_env.setenv("BLOCKSERVE_LOG_LEVEL", "debug")
    clean_env.setenv("BLOCKSERVE_MODEL_PATH", str(tmp_path))
    assert env.BLOCKSERVE_GRPC_PORT == 9100
    assert env.BLOCKSERVE_LOG_LEVEL == "DEBUG"
    assert env.BLOCKSERVE_MODEL_PATH == str(tmp_path)


def test_empty_value_means_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BLOCKSERVE_GRPC_PORT", "")
    assert env.BLOCKSERVE_GRPC_PORT == 9000


@pytest.mark.parametrize("raw", ["ninety", "0", "65536", "-1"])
def test_bad_port_names_the_variable_and_the_range(clean_env: pytest.MonkeyPatch, raw: str) -> None:
    clean_env.setenv("BLOCKSERVE_GRPC_PORT", raw)
    with pytest.raises(ValueError, match=r"BLOCKSERVE_GRPC_PORT.*1\.\.65535"):
        _ = env.BLOCKSERVE_GRPC_PORT


def test_bad_log_level_lists_the_choices(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BLOCKSERVE_LOG_LEVEL", "loud")
    with pytest.raises(
        ValueError, match="BLOCKSERVE_LOG_LEVEL='LOUD'.*DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ):
        _ = env.BLOCKSERVE_LOG_LEVEL


def test_unknown_attribute_raises_and_dir_lists_variables() -> None:
    with pytest.raises(AttributeError, match="BLOCKSERVE_NOPE"):
        _ = env.BLOCKSERVE_NOPE
    assert {"BLOCKSERVE_GRPC_PORT", "BLOCKSERVE_LOG_LEVEL", "BLOCKSERVE_MODEL_PATH"} <= set(dir(env))


def test_every_variable_has_the_prefix() -> None:
    assert all(name.startswith("BLOCKSERVE_") for name in env.environment_variables)


def test_apply_loopback_env_forces_values_and_keeps_the_rest() -> None:
    environ = {"http_proxy": "http://corp-proxy:3128", "RAY_AUTH_MODE": "token", "HOME": "/root"}
    applied = env.apply_loopback_env(environ)

    assert applied == env.LOOPBACK_ENV
    assert environ["http_proxy"] == "http://127.0.0.1:9"
    assert environ["RAY_AUTH_MODE"] == "disabled"
    assert environ["HOME"] == "/root"
    assert set(environ) == set(env.LOOPBACK_ENV) | {"HOME"}
    # The caller gets a copy: changing it cannot change what later calls apply.
    applied["http_proxy"] = "x"
    assert env.LOOPBACK_ENV["http_proxy"] == "http://127.0.0.1:9"


def test_loopback_proxies_point_at_loopback_and_exempt_it() -> None:
    for name in ("http_proxy", "https_proxy"):
        assert env.LOOPBACK_ENV[name].startswith("http://127.0.0.1:")
    assert set(env.LOOPBACK_ENV["no_proxy"].split(",")) == {"localhost", "127.0.0.1", "::1"}
    assert env.LOOPBACK_ENV["RAY_USAGE_STATS_ENABLED"] == "0"
    # Without it ray.init binds the routed interface even when told _node_ip_address="127.0.0.1".
    assert env.LOOPBACK_ENV["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_makefile_exports_the_same_loopback_env() -> None:
    exports = dict(re.findall(r"^export (\w+) := (.*)$", (REPO / "Makefile").read_text(), flags=re.M))
    assert exports == env.LOOPBACK_ENV


def test_ray_init_kwargs_bind_ray_to_loopback() -> None:
    kwargs = env.ray_init_kwargs(num_cpus=8)
    assert kwargs == {
        "num_cpus": 8,
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
        "object_store_memory": 256 * 1024 * 1024,
        "runtime_env": {
            "worker_process_setup_hook": "cluster.serve_fixes.apply",
            "env_vars": {"BLOCKSERVE_BIND_HOST": "127.0.0.1", "SERVE_SOCKET_REUSE_PORT_ENABLED": "0"},
        },
    }
    assert env.ray_init_kwargs()["num_cpus"] == 32
    assert (
        env.ray_init_kwargs(bind_host="0.0.0.0")["runtime_env"]["env_vars"]["BLOCKSERVE_BIND_HOST"]
        == "0.0.0.0"
    )


def test_the_bind_hook_is_importable_by_its_name() -> None:
    from cluster import bind, serve_fixes

    assert env.SETUP_HOOK == f"{serve_fixes.__name__}.{serve_fixes.apply.__name__}"
    assert bind.rehost("[::]:9000", "127.0.0.1") == "127.0.0.1:9000"
    assert bind.rehost("0.0.0.0:0", "::1") == "[::1]:0"
    assert bind.rehost("10.0.0.5:9000", "127.0.0.1") == "10.0.0.5:9000"  # one interface already: kept
    assert bind.rehost("[::]:9000", "0.0.0.0") == "[::]:9000"  # every interface asked for: kept


def test_ray_init_kwargs_rejects_zero_cpus() -> None:
    with pytest.raises(ValueError, match="num_cpus=0"):
        env.ray_init_kwargs(num_cpus=0)
