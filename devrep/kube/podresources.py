"""Which pods still hold which devices: kubelet's PodResources API v1 ``List``.

Kubelet serves ``v1.PodResourcesLister`` on ``/var/lib/kubelet/pod-resources/kubelet.sock`` (GA since Kubernetes
1.20). ``List`` reports, for every active pod, the device ids each app container holds (and those of restartable
"sidecar" init containers); the device plugin uses it to revoke the tokens of pods that are gone
(``DevicePlugin.reconcile``). Plain init containers are not listed: kubelet hands their devices on to the pod's app
containers (``devicesToReuse`` in pkg/kubelet/cm/devicemanager), so a pod's listed devices cover its init
containers' devices whenever an app container asks for the same resource.
"""

from __future__ import annotations

import logging

import grpc

from ._gen import podresources_pb2, podresources_pb2_grpc

log = logging.getLogger("devrep.kube")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

PodKey = tuple[str, str]
"""(namespace, name) of a pod."""


class PodResources:
    """A client of kubelet's PodResources ``List``, filtered to one extended resource."""

    def __init__(self, socket_path: str, resource_name: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.resource_name = resource_name
        self.timeout = timeout
        # One channel for the plugin's lifetime: gRPC reconnects by itself when kubelet restarts.
        self._channel = grpc.insecure_channel("unix:" + socket_path)
        self._stub = podresources_pb2_grpc.PodResourcesListerStub(self._channel)

    def holdings(self) -> dict[PodKey, set[str]] | None:
        """Device ids of ``resource_name`` per live pod (pods holding none left out); ``None`` when kubelet did not
        answer within ``timeout`` (then nobody may conclude that a pod is gone)."""
        try:
            reply = self._stub.List(podresources_pb2.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            log.warning("PodResources List on %s failed: %s %s", self.socket_path, e.code(), e.details())
            return None
        out: dict[PodKey, set[str]] = {}
        for pod in reply.pod_resources:
            ids = {i for c in pod.containers for d in c.devices if d.resource_name == self.resource_name
                   for i in d.device_ids}
            if ids:
                out.setdefault((pod.namespace, pod.name), set()).update(ids)
        return out

    def close(self) -> None:
        self._channel.close()
