"""The layer contracts of pyproject.toml ([tool.importlinter], docs/architecture.md) hold, and can break.

`lint-imports` (import-linter) reads the import graph of analysis_daemon, protocol and trainer_hook
statically, function-level imports included, and checks: the layers of analysis_daemon (only downward
imports, no sibling imports within a layer), protocol below the daemon and the hook, the hook apart from
the daemon, and no import circles between the modules of any package.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("analysis_daemon", "protocol", "trainer_hook")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (import-linter is in the test extra)")
    return subprocess.run([str(exe), "--no-cache", str(cwd / "pyproject.toml")], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _verdicts(report: str) -> dict[str, str]:
    """{contract name: "KEPT" | "BROKEN"} from lint-imports' summary (names wrap over lines there)."""
    text = " ".join(report.split())
    section = text.split(" dependencies.", 1)[1].split(" Contracts: ", 1)[0].lstrip("- ")
    return {name.strip(): verdict for name, verdict in re.findall(r"(.+?) (KEPT|BROKEN)", section)}


def test_the_layer_contracts_are_kept() -> None:
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    verdicts = _verdicts(out.stdout)
    assert len(verdicts) == 5 and set(verdicts.values()) == {"KEPT"}, out.stdout[-4000:]


@pytest.mark.parametrize(("module", "line", "contract"), [
    # the shared records reaching up into the daemon: the layers contract
    ("analysis_daemon/records.py", "from .service import state", "reads as the data flows"),
    # replay importing the command line again (the old circle cli <-> replay): the layers contract
    ("analysis_daemon/replay/command.py", "from ..cli import SUBCOMMANDS", "reads as the data flows"),
    # the old circle geometry <-> sampled, inside one layer: the acyclic contract
    ("analysis_daemon/metrics/sampled.py", "from . import geometry", "no import circles"),
    # a lazy import counts as much as one at the top: the daemon's worker reaching for the daemon
    ("analysis_daemon/service/worker.py", "def _f():\n    from .daemon import Daemon", "no import circles"),
    # the trainer hook importing the daemon
    ("trainer_hook/callbacks.py", "import analysis_daemon.records", "trainer hook stands on its own"),
])
def test_an_injected_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """The contracts are not vacuous: a copy of the tree with one offending import fails lint-imports."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout[-4000:]
    broken = [name for name, verdict in _verdicts(out.stdout).items() if verdict == "BROKEN"]
    assert any(contract in name for name in broken), (broken, out.stdout[-4000:])
