"""The capability probe behind ``devrep doctor``: on CI (root, Linux 6.18) every mode must work."""

from __future__ import annotations

import errno
import io
import json

import pytest
from rich.console import Console

from devrep.doctor import MODES, main_doctor, probe
from devrep.tracking._setup import uffd_unavailable_reason


def test_every_mode_works_here() -> None:
    caps = probe()
    assert set(caps.modes) == set(MODES)
    broken = {name: m.reason for name, m in caps.modes.items() if not m.works}
    assert not broken, f"tracking modes unavailable on this machine: {broken}"
    assert caps.userfaultfd and caps.pagemap_scan and caps.inotify
    assert caps.features["WP_ASYNC"] and caps.features["WP_HUGETLBFS_SHMEM"]
    assert caps.all_modes_work


def test_json_and_rich_output(capsys: pytest.CaptureFixture[str]) -> None:
    caps = probe()
    data = json.loads(caps.to_json())
    assert data["kernel"] == caps.kernel
    assert data["modes"]["sync"]["works"] is True
    out = io.StringIO()
    caps.render(Console(file=out, width=120))
    text = out.getvalue()
    assert "tracking modes" in text and "WP_ASYNC" in text and caps.kernel in text
    assert main_doctor(as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["userfaultfd"] is True


def test_unavailability_reasons_say_what_to_do() -> None:
    assert "vm.unprivileged_userfaultfd" in uffd_unavailable_reason(OSError(errno.EPERM, "x"))
    assert "CONFIG_USERFAULTFD" in uffd_unavailable_reason(OSError(errno.ENOSYS, "x"))
