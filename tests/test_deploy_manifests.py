"""deploy/: every manifest and every rendering of the Helm chart pass kubernetes-validate (strict schemas, the oldest
and newest supported Kubernetes) and yamllint; the chart passes ``helm lint --strict``; the DaemonSet keeps its
security and scheduling contract; Dockerfiles parse and copy what exists.

The chart is rendered by Helm itself: Helm v4's Go library through ``helm-python-sdk`` (``devrep.kube.chart``)."""

from __future__ import annotations

import io
import py_compile
import shlex
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import dockerfile
import helm_python
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from devrep.cli import build_parser
from devrep.errors import InvalidArgumentError
from devrep.kube import __main__ as plugin_cli
from devrep.kube import chart

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "devrep"
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
"""The oldest Kubernetes the chart supports (docs/kubernetes.md) and the newest kubernetes-validate knows."""
LINT = YamlLintConfig(file=str(DEPLOY / "yamllint.yaml"))
BIG_GID = 1000680000  # OpenShift-style gid: float64 prints it as 1.00068e+09 unless the template says int64

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cpu": {"backend": "cpu", "cpuDevices": 8, "requireToken": False,
            "nodeSelector": {"kubernetes.io/os": "linux"}, "socketGroup": 2000, "devUserfaultfd": False},
    "minimal": {"metrics": {"enabled": False}, "serviceAccount": {"create": False, "name": "default"},
                "extraServerArgs": ["--log-level", "debug"], "slots": 4, "quotas": {"bytesPerClient": 1 << 30},
                "tolerations": []},
    "operator": {
        "image": {"registry": "registry.example.com", "repository": "ml/devrep", "tag": "1.2.3",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}], "runtimeClassName": "nvidia",
        "updateStrategy": {"type": "OnDelete"}, "socketGroup": BIG_GID,
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "example.com/gpu", "operator": "Exists"}]}]}}},
        "tolerations": [{"operator": "Exists"}],
        "podSecurityContext": {"supplementalGroups": [3000], "seccompProfile": {"type": "RuntimeDefault"}},
        "securityContext": {"server": {"seccompProfile": {"type": "RuntimeDefault"}}},
        "resources": {"server": {"limits": {"memory": "8Gi"}}},
        "tokenDir": "/var/lib/devrep-ml/tokens",
    },
}


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def rendered(variant: str) -> str:
    return chart.render_text(chart.render(CHART, VARIANTS[variant]))


def lint(text: str, name: str) -> None:
    problems = [f"{name}:{p.line}:{p.column} {p.level} {p.message}" for p in linter.run(text, LINT)]
    assert not problems, "\n".join(problems)


def validate(doc: dict[str, Any], name: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata'].get('name')} invalid for Kubernetes {version} at "
                        f"{path}: {e.message}")


def plain_manifests() -> list[Path]:
    return sorted([*(DEPLOY / "kubernetes").glob("*.yaml"), *(DEPLOY / "examples").glob("*.yaml")])


def daemonset(text: str) -> dict[str, Any]:
    (ds,) = [d for d in docs(text) if d["kind"] == "DaemonSet"]
    return ds


def containers(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def helm_lint(path: Path, values: dict[str, Any] | None = None) -> list[str]:
    """``helm lint --strict`` findings of warning level and above (info, e.g. "icon is recommended", passes)."""
    report = helm_python.lint(path, values, strict=True, namespace="devrep")
    return [*report["errors"], *(f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2)]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("path", plain_manifests(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_plain_manifests_validate_and_lint(path: Path) -> None:
    text = path.read_text()
    lint(text, str(path))
    found = docs(text)
    assert found, f"{path} holds no manifest"
    for doc in found:
        validate(doc, str(path))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_chart_validates_and_lints(variant: str) -> None:
    assert helm_lint(CHART, VARIANTS[variant]) == []
    text = rendered(variant)
    lint(text, f"chart[{variant}]")
    kinds = sorted(d["kind"] for d in docs(text))
    expected = ["DaemonSet", "Service", "ServiceAccount"]
    if variant == "minimal":
        expected = ["DaemonSet"]
    assert kinds == expected
    for doc in docs(text):
        validate(doc, f"chart[{variant}]")


def test_helm_lint_and_schema_catch_mistakes(tmp_path: Path) -> None:
    broken = tmp_path / "devrep"
    shutil.copytree(CHART, broken)
    service = broken / "templates" / "service.yaml"
    service.write_text(service.read_text().replace("{{- end }}", ""))  # an unclosed if
    assert helm_lint(broken), "helm lint should flag a template that does not parse"
    with pytest.raises(InvalidArgumentError, match="helm"):
        chart.render(broken)
    for bad in ({"socketGroup": "2000"}, {"slots": 0}, {"backend": "rocm"}, {"sockteDir": "/x"},
                {"resourceName": "replica"}):
        with pytest.raises(InvalidArgumentError, match="helm"):
            chart.render(CHART, bad)
        assert helm_lint(CHART, bad), bad
    with pytest.raises(InvalidArgumentError, match="helm"):
        chart.render(CHART, release="Not_A_Release")


def test_chart_files_lint() -> None:
    for name in ("Chart.yaml", "values.yaml"):
        lint((CHART / name).read_text(), name)
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "devrep"
    with helm_python.Chart.load(CHART) as loaded:
        assert loaded.schema is not None  # values.schema.json ships with the chart
        assert loaded.version == meta["version"]


def test_plain_daemonset_is_the_rendered_chart() -> None:
    committed = (DEPLOY / "kubernetes" / "devrep.yaml").read_text()
    assert committed == chart.plain_manifest(), (
        "deploy/kubernetes/devrep.yaml is stale: regenerate it with python -m devrep.kube.chart --write-plain")
    assert committed.startswith(chart.PLAIN_HEADER) and committed[len(chart.PLAIN_HEADER):] == rendered("defaults")


def test_validator_catches_a_broken_manifest() -> None:
    ds = daemonset(rendered("defaults"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["dorp"] = ["ALL"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)
    assert list(linter.run("a: 1\na: 2\n", LINT)), "yamllint should flag a duplicated key"


# ---------------------------------------------------------------------------------------------- contract
GPU_LABELS = {"feature.node.kubernetes.io/pci-10de.present", "feature.node.kubernetes.io/cpu-model.vendor_id",
              "nvidia.com/gpu.present"}


def test_daemonset_security_and_scheduling_contract() -> None:
    ds = daemonset(rendered("defaults"))
    spec = ds["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["automountServiceAccountToken"] is False
    assert "runtimeClassName" not in spec and "imagePullSecrets" not in spec
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec["tolerations"])
    # Any one of NVIDIA's node labels admits a node: one term per label, and terms are OR'ed.
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [len(t["matchExpressions"]) for t in terms] == [1] * len(terms)
    assert {t["matchExpressions"][0]["key"] for t in terms} == GPU_LABELS
    host = {v["name"]: v["hostPath"] for v in spec["volumes"] if "hostPath" in v}
    assert {name: h["path"] for name, h in host.items()} == {
        "device-plugins": "/var/lib/kubelet/device-plugins", "pod-resources": "/var/lib/kubelet/pod-resources",
        "sockets": "/run/devrep", "tokens": "/var/lib/devrep/tokens"}
    assert not [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]  # tokens on disk
    c = containers(ds)
    assert set(c) == {"server", "device-plugin"}
    for name, container in c.items():
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
        for probe in ("livenessProbe", "readinessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "/usr/local/bin/devrep-probe"], (name, probe)
        assert container["image"] == "devrep:0.1.0-cuda"  # the tag defaults to the chart's appVersion
    assert "add" not in c["server"]["securityContext"]["capabilities"]  # client tracking is checked through fds
    assert "add" not in c["device-plugin"]["securityContext"]["capabilities"]
    assert c["server"]["livenessProbe"]["exec"]["command"][-1] == "/run/devrep/devrep.sock"
    assert c["device-plugin"]["readinessProbe"]["exec"]["command"][-2:] == ["--service", "devrep.kube.DevicePlugin"]
    mounts = {m["name"]: m for m in c["device-plugin"]["volumeMounts"]}
    assert mounts["sockets"]["readOnly"] is True  # the plugin only looks at the service socket
    assert mounts["pod-resources"]["readOnly"] is True and not mounts["tokens"].get("readOnly")
    server_mounts = {m["name"]: m for m in c["server"]["volumeMounts"]}
    assert server_mounts["tokens"] == {"name": "tokens", "mountPath": "/var/lib/devrep/tokens", "readOnly": True}

    cpu = daemonset(rendered("cpu"))
    assert "affinity" not in cpu["spec"]["template"]["spec"]  # backend cpu runs on any node
    assert "add" not in containers(cpu)["server"]["securityContext"]["capabilities"]
    assert cpu["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # backend cpu with gpuNodesOnly left on still needs no GPU label
    assert "affinity" not in daemonset(chart.render_text(chart.render(CHART, {"backend": "cpu"})))["spec"][
        "template"]["spec"]


def test_operator_knobs() -> None:
    ds = daemonset(rendered("operator"))
    spec = ds["spec"]["template"]["spec"]
    c = containers(ds)
    assert {x["image"] for x in c.values()} == {"registry.example.com/ml/devrep:1.2.3-cuda"}
    assert {x["imagePullPolicy"] for x in c.values()} == {"Always"}
    assert spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["runtimeClassName"] == "nvidia"
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert spec["affinity"] == VARIANTS["operator"]["affinity"]  # replaces the GPU-label terms
    assert spec["tolerations"] == [{"operator": "Exists"}]
    # socketGroup joins the operator's own supplementary groups, as a number (not 1.00068e+09).
    assert spec["securityContext"] == {"supplementalGroups": [3000, BIG_GID],
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    server_sc = c["server"]["securityContext"]
    assert server_sc["seccompProfile"] == {"type": "RuntimeDefault"}  # merged key by key into the defaults
    assert server_sc["capabilities"]["drop"] == ["ALL"] and server_sc["readOnlyRootFilesystem"] is True
    assert c["server"]["resources"]["limits"] == {"memory": "8Gi"}
    args = build_parser().parse_args(c["server"]["args"])
    assert args.socket_group == BIG_GID and args.token_dir == "/var/lib/devrep-ml/tokens"
    assert plugin_cli.parse_args(c["device-plugin"]["args"]).token_dir == "/var/lib/devrep-ml/tokens"
    assert f"- \"{BIG_GID}\"" in rendered("operator") and "e+09" not in rendered("operator")


def test_values_reach_the_containers() -> None:
    c = containers(daemonset(rendered("minimal")))
    plugin_args = plugin_cli.parse_args(c["device-plugin"]["args"])  # the plugin CLI accepts what the chart passes
    assert plugin_args.slots == 4 and plugin_args.resource_name == "devrep.io/replica"
    assert plugin_args.plugin_dir == "/var/lib/kubelet/device-plugins" and plugin_args.socket_dir == "/run/devrep"
    assert plugin_args.token_dir == "/var/lib/devrep/tokens"
    assert plugin_args.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert plugin_args.dev_userfaultfd == "auto"
    server = c["server"]["args"]
    assert server[-2:] == ["--log-level", "debug"]
    args = build_parser().parse_args(server[:-2])  # `devrep serve` accepts what the chart passes
    assert args.command == "serve" and args.quota_bytes == 1 << 30 and args.require_token
    assert args.metrics_port is None and "ports" not in c["server"]
    assert (args.socket, args.token_dir) == ("/run/devrep/devrep.sock", "/var/lib/devrep/tokens")
    cpu_ds = daemonset(rendered("cpu"))
    cpu = containers(cpu_ds)
    cpu_args = build_parser().parse_args(cpu["server"]["args"])
    assert cpu_args.cpu_devices == 8 and not cpu_args.require_token and cpu["server"]["image"] == "devrep:0.1.0-cpu"
    assert cpu_args.socket_group == 2000                   # socketGroup -> --socket-group
    # ... and the server is in that group, or it could not give its sockets to it (no CAP_CHOWN).
    assert cpu_ds["spec"]["template"]["spec"]["securityContext"] == {"supplementalGroups": [2000]}
    assert plugin_cli.parse_args(cpu["device-plugin"]["args"]).dev_userfaultfd == "off"
    defaults_ds = daemonset(rendered("defaults"))
    defaults = containers(defaults_ds)
    default_args = build_parser().parse_args(defaults["server"]["args"])
    assert default_args.metrics_port == defaults["server"]["ports"][0]["containerPort"] == 9464
    # The server's metrics bind loopback unless told otherwise; Prometheus scrapes the pod's own address.
    assert default_args.metrics_address == "0.0.0.0"
    assert default_args.socket_group is None and "securityContext" not in defaults_ds["spec"]["template"]["spec"]


def test_example_pod_requests_a_replica() -> None:
    pod = docs((DEPLOY / "examples" / "pod.yaml").read_text())[0]
    job = docs((DEPLOY / "examples" / "job.yaml").read_text())[0]
    for container in (pod["spec"]["containers"][0], job["spec"]["template"]["spec"]["containers"][0]):
        assert container["resources"]["limits"]["devrep.io/replica"] == 1
        assert container["args"][container["args"].index("--device") + 1] == "cuda:0"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # a CUDA replica needs the GPU in the pod
        assert container["command"] == ["python", "/opt/devrep/examples/read_replica.py"]
    py_compile.compile(str(DEPLOY / "examples" / "read_replica.py"), doraise=True)


# ---------------------------------------------------------------------------------------------- images
KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
         "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    commands = dockerfile.parse_file(str(DEPLOY / "docker" / name))
    assert commands[0].cmd == "FROM"
    assert {c.cmd for c in commands} <= KNOWN
    copied = {}
    for c in commands:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            *sources, dest = c.value
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist"
                copied[src] = dest
    assert copied["devrep/kube/probe.py"] == "/usr/local/bin/devrep-probe"  # what the chart's probes run
    assert copied["deploy/examples"] == "/opt/devrep/examples"  # what the example pod runs
    env = " ".join(" ".join(c.value) for c in commands if c.cmd == "ENV")
    # The kernels are package data of the installed wheel: nothing may point the backends elsewhere.
    assert "kernels" not in copied and "DEVREP_KERNELS_DIR" not in env
    entry = [c for c in commands if c.cmd == "ENTRYPOINT"][-1]
    assert entry.json and entry.value == ("devrep",)
    assert any("NUMBA_CACHE_DIR" in c.value for c in commands if c.cmd == "ENV")


# ---------------------------------------------------------------------------------------------- renderer
def test_renderer_command_line(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("slots: 3\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert chart.main([str(CHART), "-f", str(values), "--set", "backend=cpu,socketGroup=1000680000",
                           "--release", "r1"]) == 0
    text = out.getvalue()
    assert text.startswith("---\n# Source: devrep/templates/daemonset.yaml\n")
    ds = daemonset(text)
    assert ds["metadata"]["name"] == "r1"
    c = containers(ds)
    assert c["device-plugin"]["args"][c["device-plugin"]["args"].index("--slots") + 1] == "3"
    assert "cpu" in shlex.join(c["server"]["args"]) and "1000680000" in c["server"]["args"]
    assert chart.main([str(CHART), "--set", "slots=oops"]) == 2  # the schema wants an integer
    assert chart.main([str(CHART), "--set", "noequals"]) == 2  # helm --set syntax: key=value
