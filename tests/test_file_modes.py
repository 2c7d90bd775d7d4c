"""What the daemon writes is private by default (issue 21, item 9): files 0600, directories 0700.

`--state-dir` held the raw embedding (`snapshot-*.bin`) and the vocabulary (`state.json`) as 0644 in
0755 directories, although the shared-memory segments are 0600. Now the state dir, the results
(analysis.jsonl), the log file and the HTML report are the user's alone, whatever the umask, unless
the user asks otherwise (`--results-mode 0644`, `report --mode 0644`). Checked as another user too.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis_daemon.cli import build_parser
from analysis_daemon.files import dir_mode_for, parse_mode
from tests.test_daemon import WAIT_S, env, start_daemon, wait_for  # noqa: F401
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(120)
ATTACKER_UID = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): mode(p) for p in sorted(root.rglob("*"))}


def publish_two(endpoint: str, run: str) -> None:
    pub = EmbeddingPublisher(endpoint, run=run, vocab=[f"secret-token-{i}" for i in range(64)])
    assert pub.wait_connected(WAIT_S)
    for it in (10, 20):
        wait_for(f"handing off iter {it}", lambda: pub.publish(torch.randn(64, 8), it))
    return pub


@pytest.fixture
def wide_umask():
    old = os.umask(0)  # the worst case: nothing masked, so every mode below is the code's own
    yield
    os.umask(old)


def test_state_dir_results_log_and_report_are_private(start_daemon, tmp_path: Path, tcp_endpoint: str,
                                                       env: dict[str, str], wide_umask) -> None:
    state, log_file = tmp_path / "state", tmp_path / "logs" / "daemon.log"
    d = start_daemon("--no-wandb", "--state-dir", str(state), "--log-file", str(log_file))
    pub = publish_two(tcp_endpoint, "private-run")
    d.wait_results("private-run", 2)
    pub.close()
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait_exit() == 0
    written = {"state": modes_under(state), "results": modes_under(d.results_dir)}
    assert any(name.endswith(".bin") for name in written["state"]) and any(
        name.endswith("state.json") for name in written["state"])
    for where, entries in written.items():
        for name, m in entries.items():
            is_dir = (state if where == "state" else d.results_dir).joinpath(name).is_dir()
            assert m == (0o700 if is_dir else 0o600), f"{where}/{name} has mode {m:o}"
    assert mode(state) == 0o700 and mode(d.results_dir) == 0o700
    assert mode(log_file) == 0o600 and mode(log_file.parent) == 0o700 and "private-run" in log_file.read_text()
    # The report: private by default, readable by others only when asked.
    report = subprocess.run([sys.executable, "-m", "analysis_daemon", "report", str(d.results_dir / "private-run"),
                             "-o", str(tmp_path / "r.html")], env=env, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert mode(tmp_path / "r.html") == 0o600
    shared = subprocess.run([sys.executable, "-m", "analysis_daemon", "report", str(d.results_dir / "private-run"),
                             "-o", str(tmp_path / "shared.html"), "--mode", "0644"], env=env, capture_output=True,
                            text=True)
    assert shared.returncode == 0 and mode(tmp_path / "shared.html") == 0o644


def test_results_mode_shares_results_when_asked(start_daemon, tcp_endpoint: str, wide_umask) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--results-mode", "0644")
    pub = publish_two(tcp_endpoint, "shared-run")
    d.wait_results("shared-run", 2)
    pub.close()
    assert mode(d.results_dir / "shared-run" / "analysis.jsonl") == 0o644
    assert mode(d.results_dir / "shared-run") == 0o755 and mode(d.results_dir) == 0o755


def test_mode_option_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_mode("0600") == 0o600 and parse_mode("644") == 0o644 and parse_mode("0640") == 0o640
    assert dir_mode_for(0o600) == 0o700 and dir_mode_for(0o640) == 0o750 and dir_mode_for(0o644) == 0o755
    for bad in ("0400", "0666", "0755", "rw", "01600"):
        with pytest.raises(Exception, match="mode"):
            parse_mode(bad)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--results-mode", "0666"])
    assert exited.value.code == 2 and "--results-mode: mode 0666 must let the owner" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="another user needs root (setpriv)")
def test_another_user_reads_nothing_from_the_state_dir(start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:
    tmp_path.chmod(0o755)  # the test's own directory is open: only the daemon's modes protect what it wrote
    state = tmp_path / "state"
    d = start_daemon("--no-wandb", "--no-console", "--state-dir", str(state))
    pub = publish_two(tcp_endpoint, "victim")
    d.wait_results("victim", 2)
    pub.close()
    targets = [p for p in [*state.rglob("*"), *d.results_dir.rglob("*")] if p.is_file()]
    assert len(targets) >= 3
    probe = "import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'rb').read(1); print('READ', p)\n" \
            "    except OSError as e:\n        print('DENIED', e.errno)\n"
    out = subprocess.run(["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}", "--clear-groups",
                          "/usr/bin/python3", "-c", probe, *map(str, targets)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "READ" not in out.stdout and out.stdout.count("DENIED") == len(targets), out.stdout
