"""Entry point of an attacker process: ``python _attacker.py MODULE_PATH FUNCTION ARGS_JSON``.

``tests/security/_harness.run_as_attacker`` starts this file as uid/gid 65534 (the privilege drop happens in
the forked child before exec, see there). It loads ``FUNCTION`` from the module file ``MODULE_PATH`` (so each
test file keeps its attacks in a real, linted module), calls it with the JSON-decoded arguments and prints
``RESULT_MARK`` + the JSON of its return value as its last line. It refuses to run with any root id or capability, so an
attack test can never pass by accident because the attacker was privileged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

RESULT_MARK = "@@attack-result@@ "


def main(argv: list[str]) -> int:
    path, name, args_json = argv[1:4]
    ids = (*os.getresuid(), *os.getresgid())
    if 0 in ids or 0 in os.getgroups():
        print(f"attacker still holds a root id: uids/gids {ids}, groups {os.getgroups()}", file=sys.stderr)
        return 3
    status = Path("/proc/self/status").read_text().splitlines()
    caps = [line.split()[1] for line in status if line.startswith(("CapEff", "CapPrm"))]
    if any(int(c, 16) for c in caps):
        print(f"attacker still holds capabilities: {caps}", file=sys.stderr)
        return 3
    spec = importlib.util.spec_from_file_location("devrep_attack", path)
    if spec is None or spec.loader is None:
        print(f"cannot load attack module {path}", file=sys.stderr)
        return 3
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, name)(*json.loads(args_json))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
