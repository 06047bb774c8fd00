"""A client in a container's shoes (test_kube_node, run under setpriv as another uid).

``python kube_client.py ADDRESS``: connects (10 s timeout) and prints ``connected <regions>``, or
``refused <error>`` on a devrep error.
"""

from __future__ import annotations

import sys

import devrep
import devrep.client


def main(address: str) -> None:
    try:
        with devrep.client.connect(address, timeout=10) as c:
            print("connected", c.list_regions())
    except devrep.DevrepError as e:
        print("refused", e)


if __name__ == "__main__":
    main(sys.argv[1])
