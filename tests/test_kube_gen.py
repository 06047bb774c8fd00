"""The committed device-plugin stubs match the proto, and the proto matches kubelet's wire names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devrep.kube import gen
from devrep.kube._gen import api_pb2, podresources_pb2


def without_tool_versions(text: str) -> str:
    """The stubs minus the protoc/grpcio-tools version stamps, so a newer generator alone is not 'stale'."""
    text = re.sub(r"# Protobuf Python Version: .*", "# Protobuf Python Version: *", text)
    text = re.sub(r"(Domain\.PUBLIC,\n)\s+\d+,\n\s+\d+,\n\s+\d+,\n", r"\1    *\n", text)
    return re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '*'", text)


def test_generated_stubs_are_fresh() -> None:
    expected = {name: without_tool_versions(text) for name, text in gen.generate().items()}
    committed = {p.name: without_tool_versions(p.read_text()) for p in gen.OUT.iterdir()
                 if p.suffix in (".py", ".pyi")}
    assert committed.keys() == expected.keys()
    stale = [name for name, text in expected.items() if committed[name] != text]
    assert not stale, f"{stale} differ from the proto: run `python -m devrep.kube.gen` and commit"


def test_wire_names_match_kubelet() -> None:
    # Kubelet addresses these by full name; a typo here would make registration fail on a real node.
    d = api_pb2.DESCRIPTOR
    assert d.package == "v1beta1"
    assert d.services_by_name["Registration"].full_name == "v1beta1.Registration"
    methods = [m.name for m in d.services_by_name["DevicePlugin"].methods]
    assert methods == ["GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate",
                       "PreStartContainer"]
    fields = {
        "RegisterRequest": {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4},
        "DevicePluginOptions": {"pre_start_required": 1, "get_preferred_allocation_available": 2},
        "Device": {"ID": 1, "health": 2, "topology": 3},
        "NUMANode": {"ID": 1},
        "ContainerPreferredAllocationRequest": {"available_deviceIDs": 1, "must_include_deviceIDs": 2,
                                                "allocation_size": 3},
        "ContainerAllocateRequest": {"devices_ids": 1},
        "ContainerAllocateResponse": {"envs": 1, "mounts": 2, "devices": 3, "annotations": 4, "cdi_devices": 5},
        "Mount": {"container_path": 1, "host_path": 2, "read_only": 3},
        "DeviceSpec": {"container_path": 1, "host_path": 2, "permissions": 3},
    }
    for message, numbers in fields.items():
        got = {f.name: f.number for f in d.message_types_by_name[message].fields}
        assert got == numbers, message
    assert Path(gen.PROTO_ROOT, gen.PROTO).is_file()


def test_podresources_wire_names_match_kubelet() -> None:
    # kubelet's k8s.io/kubelet/pkg/apis/podresources/v1/api.proto: the fields devrep reads, by number.
    d = podresources_pb2.DESCRIPTOR
    assert d.package == "v1"
    service = d.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert service.methods_by_name["List"].input_type.full_name == "v1.ListPodResourcesRequest"
    fields = {
        "ListPodResourcesResponse": {"pod_resources": 1},
        "PodResources": {"name": 1, "namespace": 2, "containers": 3},
        "ContainerResources": {"name": 1, "devices": 2, "cpu_ids": 3},
        "ContainerDevices": {"resource_name": 1, "device_ids": 2, "topology": 3},
        "TopologyInfo": {"nodes": 1},
        "NUMANode": {"ID": 1},
    }
    for message, numbers in fields.items():
        got = {f.name: f.number for f in d.message_types_by_name[message].fields}
        assert got == numbers, message
    assert Path(gen.PROTO_ROOT, gen.PODRESOURCES_PROTO).is_file()


def test_freshness_check_sees_a_changed_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for proto in gen.PROTOS:
        copy = tmp_path / proto
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text((Path(gen.PROTO_ROOT) / proto).read_text())
    changed = tmp_path / gen.PROTO
    changed.write_text(changed.read_text().replace("string health = 2;", "string state = 2;"))
    monkeypatch.setattr(gen, "PROTO_ROOT", tmp_path)
    regenerated = gen.generate()
    assert without_tool_versions(regenerated["api_pb2.py"]) != without_tool_versions(
        (gen.OUT / "api_pb2.py").read_text())
    assert without_tool_versions(regenerated["podresources_pb2.py"]) == without_tool_versions(
        (gen.OUT / "podresources_pb2.py").read_text())
    assert without_tool_versions("GRPC_GENERATED_VERSION = '9.9.9'") == "GRPC_GENERATED_VERSION = '*'"
