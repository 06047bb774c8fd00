"""deploy/: every manifest and the rendered Helm chart pass kubernetes-validate (strict schemas) and yamllint;
the DaemonSet keeps its security and scheduling contract; Dockerfiles parse and copy what exists.

No helm binary installs from the registries CI reaches, so the chart is rendered by
``devrep.kube.chart`` (its Go-template subset translated to Jinja2; see that module)."""

from __future__ import annotations

import io
import py_compile
import re
import shlex
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import dockerfile
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
LINT = YamlLintConfig(file=str(DEPLOY / "yamllint.yaml"))

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cpu": {"backend": "cpu", "gpuNodesOnly": False, "cpuDevices": 8, "requireToken": False,
            "syncModeAcrossProcesses": False, "nodeSelector": {"kubernetes.io/os": "linux"}, "socketGroup": "2000"},
    "minimal": {"metrics": {"enabled": False}, "serviceAccount": {"create": False, "name": "default"},
                "extraServerArgs": ["--log-level", "debug"], "slots": 4, "quotas": {"bytesPerClient": 1 << 30}},
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
    text = rendered(variant)
    lint(text, f"chart[{variant}]")
    kinds = sorted(d["kind"] for d in docs(text))
    expected = ["DaemonSet", "Service", "ServiceAccount"]
    if variant == "minimal":
        expected = ["DaemonSet"]
    assert kinds == expected
    for doc in docs(text):
        validate(doc, f"chart[{variant}]")


def test_chart_files_lint() -> None:
    for name in ("Chart.yaml", "values.yaml"):
        lint((CHART / name).read_text(), name)
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "devrep"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


def test_plain_daemonset_is_the_rendered_chart() -> None:
    committed = (DEPLOY / "kubernetes" / "devrep.yaml").read_text()
    body = committed[committed.index("---\n"):]  # after the "Generated ..." header
    assert body == rendered("defaults"), (
        "deploy/kubernetes/devrep.yaml is stale: regenerate it with python -m devrep.kube.chart "
        "deploy/helm/devrep --release devrep --namespace devrep")


def test_validator_catches_a_broken_manifest() -> None:
    ds = daemonset(rendered("defaults"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["dorp"] = ["ALL"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)
    assert list(linter.run("a: 1\na: 2\n", LINT)), "yamllint should flag a duplicated key"


# ---------------------------------------------------------------------------------------------- contract
def test_daemonset_security_and_scheduling_contract() -> None:
    ds = daemonset(rendered("defaults"))
    spec = ds["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["automountServiceAccountToken"] is False
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec["tolerations"])
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["key"] == "nvidia.com/gpu.present"
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host == {"device-plugins": "/var/lib/kubelet/device-plugins", "sockets": "/run/devrep"}
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
    assert c["server"]["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE"]
    assert "add" not in c["device-plugin"]["securityContext"]["capabilities"]
    assert c["server"]["livenessProbe"]["exec"]["command"][-1] == "/run/devrep/devrep.sock"
    assert c["device-plugin"]["readinessProbe"]["exec"]["command"][-2:] == ["--service", "devrep.kube.DevicePlugin"]
    mounts = {m["name"]: m for m in c["device-plugin"]["volumeMounts"]}
    assert mounts["sockets"]["readOnly"] is True  # the plugin only looks at the service socket

    cpu = daemonset(rendered("cpu"))
    assert "affinity" not in cpu["spec"]["template"]["spec"]
    assert "add" not in containers(cpu)["server"]["securityContext"]["capabilities"]
    assert cpu["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_values_reach_the_containers() -> None:
    c = containers(daemonset(rendered("minimal")))
    plugin_args = plugin_cli.parse_args(c["device-plugin"]["args"])  # the plugin CLI accepts what the chart passes
    assert plugin_args.slots == 4 and plugin_args.resource_name == "devrep.io/replica"
    assert plugin_args.plugin_dir == "/var/lib/kubelet/device-plugins" and plugin_args.socket_dir == "/run/devrep"
    assert plugin_args.token_dir == "/run/devrep-tokens"
    server = c["server"]["args"]
    assert server[-2:] == ["--log-level", "debug"]
    args = build_parser().parse_args(server[:-2])  # `devrep serve` accepts what the chart passes
    assert args.command == "serve" and args.quota_bytes == 1 << 30 and args.require_token
    assert args.metrics_port is None and "ports" not in c["server"]
    assert (args.socket, args.token_dir) == ("/run/devrep/devrep.sock", "/run/devrep-tokens")
    cpu = containers(daemonset(rendered("cpu")))["server"]
    cpu_args = build_parser().parse_args(cpu["args"])
    assert cpu_args.cpu_devices == 8 and not cpu_args.require_token and cpu["image"] == "devrep:0.1.0-cpu"
    assert cpu_args.socket_group == 2000                   # socketGroup -> --socket-group
    defaults = containers(daemonset(rendered("defaults")))
    default_args = build_parser().parse_args(defaults["server"]["args"])
    assert default_args.metrics_port == defaults["server"]["ports"][0]["containerPort"] == 9464
    assert default_args.socket_group is None
    assert defaults["server"]["image"] == defaults["device-plugin"]["image"] == "devrep:0.1.0-cuda"


def test_example_pod_requests_a_replica() -> None:
    pod = docs((DEPLOY / "examples" / "pod.yaml").read_text())[0]
    job = docs((DEPLOY / "examples" / "job.yaml").read_text())[0]
    for container in (pod["spec"]["containers"][0], job["spec"]["template"]["spec"]["containers"][0]):
        assert container["resources"]["limits"]["devrep.io/replica"] == 1
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
def test_renderer_semantics(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("apiVersion: v2\nname: t\nversion: 1.2.3\nappVersion: '9'\n")
    (tmp_path / "values.yaml").write_text("a: {b: 1}\nflag: false\nname: x\nlist: [1, 2]\nmsg: 'say \"hi\"'\n")
    (tmp_path / "templates" / "t.yaml").write_text(
        "{{/* a comment */}}\n"
        "k: {{ .Values.a.b }}\n"
        "{{- if .Values.flag }}\nyes: 1\n{{- else if eq .Values.name \"x\" }}\nx: {{ .Chart.Version }}\n"
        "{{- else }}\nno: 1\n{{- end }}\n"
        "q: {{ .Values.msg | quote }}\n"
        "l:\n  {{- toYaml .Values.list | nindent 2 }}\n"
        "d: {{ .Values.missing | default \"dflt\" }}\n"
        "r: {{ .Release.Name }}/{{ .Release.Namespace }}\n"
        "b: {{ .Values.flag }}\n"
        "e: {{ .Values.big }}\n"
        "i: {{ .Values.big | int64 }}\n"
    )
    (tmp_path / "values.yaml").write_text((tmp_path / "values.yaml").read_text() + "missing: ''\nbig: 17179869184\n")
    [(name, text)] = chart.render(tmp_path, chart.parse_set("a.b=7"), release="rel", namespace="ns")
    assert name == "t/templates/t.yaml"
    assert yaml.safe_load(text) == {"k": 7, "x": "1.2.3", "q": 'say "hi"', "l": [1, 2], "d": "dflt",
                                    "r": "rel/ns", "b": False, "e": 17179869184.0, "i": 17179869184}
    assert "b: false" in text  # Go prints booleans lower-case
    # helm holds numbers as float64 and prints large ones in exponent form unless piped through int64.
    assert "e: 1.7179869184e+10\n" in text and "i: 17179869184\n" in text and "l:\n  - 1\n  - 2\n" in text

    for bad, words in [("{{ range .Values.list }}{{ end }}", "range"), ("{{ include \"x\" . }}", "include"),
                       ("{{ $x := 1 }}", "subset"), ("{{ .Values.nope }}", "not in values"),
                       ("{{ if .Values.flag }}", "without 'end'"), ("{{ end }}", "without a matching"),
                       ("{{ frobnicate .Values.a }}", "unsupported function"), ("{{ .Foo }}", "unsupported operand")]:
        (tmp_path / "templates" / "t.yaml").write_text(bad + "\n")
        with pytest.raises(InvalidArgumentError, match=words):
            chart.render(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"key\.path=value"):
        chart.parse_set("no-equals-sign")


def test_renderer_command_line(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("slots: 3\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert chart.main([str(CHART), "-f", str(values), "--set", "backend=cpu", "--release", "r1"]) == 0
    c = containers(daemonset(out.getvalue()))
    assert c["device-plugin"]["args"][c["device-plugin"]["args"].index("--slots") + 1] == "3"
    assert "cpu" in shlex.join(c["server"]["args"])
    assert chart.main([str(CHART), "--set", "bad"]) == 2
