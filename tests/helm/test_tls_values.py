"""The chart's TLS values: a Secret mounted in every Ray pod, `config.server.tls` pointing into it, the proxy's
certificate environment and Ray's worker setup hook on every container, and render-time refusals that say what to
change (HTTPS at the HTTP port would keep KubeRay's plaintext health checks failing)."""

from __future__ import annotations

import importlib

import pytest
import yaml

from cluster import env, tls
from cluster.config import ClusterConfig
from cluster.serve_config import render_serve_config
from tests.helm.chart import CRD_FILE, KUBE_VERSION, merged_values, one, overlay, render, validate_rayservice

MOUNT = "/etc/blockserve/tls"
SERVER_TLS = {
    "cert_file": f"{MOUNT}/tls.crt",
    "key_file": f"{MOUNT}/tls.key",
    "client_ca_file": f"{MOUNT}/ca.crt",
    "http": False,
}


def tls_values(**server_tls) -> dict:
    values = overlay("values-h100.yaml")  # a head and a GPU worker group: both must get the Secret
    values.setdefault("config", {}).setdefault("server", {})["tls"] = {**SERVER_TLS, **server_tls}
    values["tls"] = {"secretName": "bs-pod-tls"}
    return values


def containers(docs) -> list[dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    assert len(groups) == 2
    return [(g["template"]["spec"], g["template"]["spec"]["containers"][0]) for g in groups]


def test_the_secret_is_mounted_and_named_to_the_proxies_in_every_pod():
    docs = render(tls_values())
    for spec, container in containers(docs):
        (volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        assert volume["secret"] == {"secretName": "bs-pod-tls"}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
        assert mount == {"name": "tls", "mountPath": MOUNT, "readOnly": True}
        variables = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: variables[k] for k in (tls.CERT_ENV, tls.KEY_ENV, tls.CLIENT_CA_ENV)} == {
            tls.CERT_ENV: f"{MOUNT}/tls.crt",
            tls.KEY_ENV: f"{MOUNT}/tls.key",
            tls.CLIENT_CA_ENV: f"{MOUNT}/ca.crt",
        }
        hook = variables["__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"]
        assert hook == env.SETUP_HOOK
        module, _, function = hook.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function))  # Ray imports it by this name
    document = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    config = ClusterConfig.model_validate(merged_values(tls_values())["config"])
    assert document == render_serve_config(config)
    assert "ssl_certfile" not in document["http_options"]  # http: false, for KubeRay's probes


def test_tls_values_validate_against_the_crd_and_kubernetes():
    import kubernetes_validate

    docs = render(tls_values())
    if CRD_FILE.exists():
        validate_rayservice(one(docs, "RayService"))
    for doc in docs:
        if doc["apiVersion"] not in ("ray.io/v1", "monitoring.coreos.com/v1"):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_without_tls_no_certificate_is_mounted_but_the_hook_still_runs():
    for _, container in containers(render(overlay("values-h100.yaml"))):
        variables = {e["name"]: e.get("value") for e in container["env"]}
        assert tls.CERT_ENV not in variables and "tls" not in {m["name"] for m in container["volumeMounts"]}
        assert variables["__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"] == env.SETUP_HOOK


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v["config"]["server"]["tls"].pop("http"), "set http: false under KubeRay"),
        (
            lambda v: v.pop("tls"),
            "config.server.tls.cert_file is set: name the Secret holding it in tls.secretName",
        ),
        (
            lambda v: v["config"]["server"].pop("tls"),
            "tls.secretName is set: point config.server.tls.cert_file",
        ),
        (
            lambda v: v["config"]["server"]["tls"].update(key_file="/keys/tls.key"),
            "config.server.tls.key_file /keys/tls.key must lie under tls.mountPath /etc/blockserve/tls",
        ),
    ],
)
def test_tls_values_that_cannot_work_fail_at_render_time(change, message):
    import helm_python

    values = tls_values()
    change(values)
    with pytest.raises(helm_python.HelmError) as e:
        render(values)
    assert message in str(e.value)
