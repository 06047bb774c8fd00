"""``python -m devrep.kube``: run the device plugin until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .._signals import StopSignals
from ..doctor import dev_userfaultfd_status
from ..errors import DevrepError
from .plugin import DEFAULT_PLUGIN_DIR, DEV_USERFAULTFD, RESOURCE_NAME, DevicePlugin, PluginConfig
from .podresources import DEFAULT_SOCKET as DEFAULT_POD_RESOURCES
from .tokens import TokenDirectory

SYSFS_USERFAULTFD = "/sys/class/misc/userfaultfd"


def node_has_dev_userfaultfd() -> bool:
    """Whether the node's kernel offers /dev/userfaultfd. The plugin's container has no such device node (a
    container's /dev holds only the defaults), but sysfs lists the host's misc devices."""
    return dev_userfaultfd_status() != "absent" or os.path.exists(SYSFS_USERFAULTFD)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devrep.kube", description="devrep kubelet device plugin")
    p.add_argument("--plugin-dir", default=DEFAULT_PLUGIN_DIR, help="kubelet device-plugin directory")
    p.add_argument("--resource-name", default=RESOURCE_NAME)
    p.add_argument("--endpoint", default="devrep-replica.sock", help="our socket's file name in --plugin-dir")
    p.add_argument("--slots", type=int, default=16, help="devices advertised per node")
    p.add_argument("--socket-dir", default="/run/devrep", help="host directory of the devrep service socket")
    p.add_argument("--socket-name", default="devrep.sock")
    p.add_argument("--container-socket-dir", default="/run/devrep", help="where pods see --socket-dir")
    p.add_argument("--token-dir", default="/var/lib/devrep/tokens",
                   help="directory the service reads per-allocation tokens from (devrep serve --token-dir)")
    p.add_argument("--numa-nodes", default=None,
                   help="comma-separated NUMA node ids to spread slots over ('' = none; default: from sysfs)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between device health checks")
    p.add_argument("--pod-resources-socket", default=None,
                   help=f"kubelet's PodResources socket (e.g. {DEFAULT_POD_RESOURCES}): revoke the tokens of pods "
                        "that are gone; without it a token is revoked when its slot is allocated again")
    p.add_argument("--pod-resources-interval", type=float, default=10.0,
                   help="seconds between PodResources List calls (one also runs on every Allocate)")
    p.add_argument("--pending-grace", type=float, default=600.0,
                   help="seconds a token no listed pod holds stays valid (a pod whose only devrep user is an init "
                        "container is not listed)")
    p.add_argument("--dev-userfaultfd", choices=["auto", "off"], default="off",
                   help="auto: hand /dev/userfaultfd to every allocated container when `devrep doctor` finds it")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    numa = None if args.numa_nodes is None else [int(n) for n in args.numa_nodes.split(",") if n.strip()]
    config = PluginConfig(
        plugin_dir=args.plugin_dir, resource_name=args.resource_name, endpoint=args.endpoint, slots=args.slots,
        socket_dir=args.socket_dir, socket_name=args.socket_name, container_socket_dir=args.container_socket_dir,
        numa_nodes=numa, poll_interval=args.poll_interval, pod_resources_socket=args.pod_resources_socket,
        pod_resources_interval=args.pod_resources_interval, pending_grace=args.pending_grace,
        dev_userfaultfd=DEV_USERFAULTFD if args.dev_userfaultfd == "auto" and node_has_dev_userfaultfd() else None,
    )
    try:
        plugin = DevicePlugin(config, TokenDirectory(args.token_dir))
    except (DevrepError, OSError) as e:
        print(f"devrep device plugin: {e}", file=sys.stderr)
        return 2
    with StopSignals() as signals:  # not an Event set by the handler: see devrep._signals
        plugin.start()
        try:
            signals.wait()
        finally:
            plugin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
