"""Same host, the default transport is one only the user can reach; a squatted port gets nothing (issue 21, item 8).

An unprivileged listener on the daemon's TCP port while the daemon was down received the hello
(vocabulary, W&B info), the publisher's secret and, after the fallback to inline payloads, whole
embedding matrices. Now the default endpoint (daemon, hook, callbacks, launch.sh) is an ipc socket in a
0700 directory of the user's, and a trainer that reaches a tcp/ipc listener without CurveZMQ first
checks who owns it: another user's gets not one byte after the handshake.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protocol.endpoints import (UnsafeEndpoint, check_listener, check_private_dir, default_endpoint,
                                ensure_private_dir, listener_owner)
from tests.conftest import free_tcp_port
from tests.test_attacks import ATTACKER_UID, SYSTEM_PYTHON, attacker_script, needs_root  # noqa: F401
from tests.test_daemon import WAIT_S, DaemonProc, env, wait_for  # noqa: F401
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private XDG_RUNTIME_DIR for this test (as /run/user/<uid> is), in this process and its children."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    return xdg


def test_default_endpoint_is_an_ipc_socket_in_a_private_directory(runtime_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_endpoint() == f"ipc://{runtime_dir}/embedding-monitor/daemon.sock"
    assert (runtime_dir / "embedding-monitor").stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    fallback = Path(f"/tmp/embedding-monitor-{os.geteuid()}")
    assert default_endpoint() == f"ipc://{fallback}/daemon.sock" and fallback.stat().st_mode & 0o777 == 0o700


def test_a_socket_directory_others_could_control_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(UnsafeEndpoint, match="has mode 755"):
        check_private_dir(open_dir)
    private = ensure_private_dir(tmp_path / "private")
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(UnsafeEndpoint, match="is a symlink"):
        check_private_dir(link)
    if os.geteuid() == 0:  # only root can give a directory away
        theirs = ensure_private_dir(tmp_path / "theirs")
        os.chown(theirs, ATTACKER_UID, ATTACKER_UID)
        with pytest.raises(UnsafeEndpoint, match=f"belongs to uid {ATTACKER_UID}"):
            ensure_private_dir(theirs)


def test_the_daemon_refuses_an_unsafe_default_directory_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "embedding-monitor").mkdir(parents=True)
    (xdg / "embedding-monitor").chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "analysis_daemon", "--no-wandb"], env=dict(env, XDG_RUNTIME_DIR=str(xdg)),
                          capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: socket directory") and "mode 755" in done.stderr


def test_listener_owner_of_tcp_and_ipc(tmp_path: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    assert listener_owner(f"tcp://127.0.0.1:{port}") == os.geteuid() == listener_owner(f"tcp://localhost:{port}")
    check_listener(f"tcp://127.0.0.1:{port}")  # ours: fine
    srv.close()
    with pytest.raises(UnsafeEndpoint, match="no listener of ours"):
        check_listener(f"tcp://127.0.0.1:{port}")  # gone after the handshake: nothing is sent
    path = tmp_path / "s.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    assert listener_owner(f"ipc://{path}") == os.geteuid()
    if os.geteuid() == 0:
        os.chown(path, ATTACKER_UID, ATTACKER_UID)  # as if another user had bound it
        with pytest.raises(UnsafeEndpoint, match=f"belongs to uid {ATTACKER_UID}"):
            check_listener(f"ipc://{path}")
    unix.close()


def test_daemon_and_trainer_meet_on_the_default_socket_through_shared_memory(runtime_dir: Path, tmp_path: Path,
                                                                            env: dict[str, str]) -> None:
    child_env = dict(env, XDG_RUNTIME_DIR=str(runtime_dir))
    out, err = tmp_path / "d.out", tmp_path / "d.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "analysis_daemon", "--no-wandb", "--no-console", "--threads", "1",
                                 "--nice", "0", "--results-dir", str(tmp_path / "runs")], stdout=o, stderr=e,
                                env=child_env, cwd=tmp_path)
    try:
        ready = wait_for("the ready line", lambda: "ready" in out.read_text() and out.read_text())
        sock_path = runtime_dir / "embedding-monitor" / "daemon.sock"
        assert f"ready on ipc://{sock_path}" in ready
        pub = EmbeddingPublisher(run="private", vocab=[f"t{i}" for i in range(64)])  # every default
        assert pub.endpoint == f"ipc://{sock_path}" and pub.wait_connected(WAIT_S)
        for it in (10, 20):
            wait_for(f"iter {it} handed off", lambda: pub.publish(torch.randn(64, 8), it))
        results = tmp_path / "runs" / "private" / "analysis.jsonl"
        wait_for("two results", lambda: results.exists() and results.read_text().count("\n") == 2)
        # Through shared memory: the daemon released the publisher's slots (the sender notices within 50 ms).
        assert pub._writer is not None
        wait_for("the daemon to release a shared-memory slot", lambda: pub._writer.released >= 1)
        pub.close()
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
    assert "rejected message" not in err.read_text()


@needs_root
def test_a_squatted_tcp_port_gets_nothing_and_the_daemon_is_served_after(attacker_script: Path, tmp_path: Path,
                                                                          env: dict[str, str],
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    port = free_tcp_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    squatter = subprocess.Popen(["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_UID}", "--clear-groups",
                                 SYSTEM_PYTHON, str(attacker_script), str(port), "squat", "6", "squat-victim"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    pub = None
    try:
        assert json.loads(squatter.stdout.readline()) == {"listening": port}
        caplog.set_level(logging.WARNING, logger="embedding_monitor.hook")
        pub = EmbeddingPublisher(endpoint, run="squat-victim", vocab=["secret-token"] * 64,
                                 wandb_info={"project": "private-project"})
        pub._sender.retry_after_refusal_s = 1.0  # noqa: SLF001 - retry often: several handshakes refused
        sent = [pub.publish(torch.randn(64, 8), it) for it in range(3)]
        seen = []  # a line per connection the trainer closed (all it sent counted); bounded: the squatter's 6 s
        while len(seen) < 2 and (line := squatter.stdout.readline()):
            seen.append(line)
        out = "".join(seen) + squatter.communicate("stop\n", timeout=WAIT_S)[0]
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if squatter.poll() is None:
            squatter.kill()
    assert result["uid"] == ATTACKER_UID and result["handshakes"] >= 2, result
    assert result["bytes_after_handshake"] == 0 and not result["saw_run_name"], result
    # Handed off or not (the first ones during the connect grace), none was sent: all three dropped.
    assert len(sent) == 3 and pub.published == 0 and pub.dropped == 3
    refusals = [r.getMessage() for r in caplog.records if "refused: the listener on" in r.getMessage()]
    assert len(refusals) == 1 and f"belongs to uid {ATTACKER_UID}" in refusals[0], refusals
    # The real daemon comes back on that port: the same publisher, untouched, is served again.
    d = DaemonProc(tmp_path, env, endpoint, "--no-wandb", "--no-console")
    try:
        wait_for("the publisher to trust the daemon", lambda: pub.connected, proc=d)
        wait_for("iter 10 handed off", lambda: pub.publish(torch.randn(64, 8), 10), proc=d)
        assert [r["iter"] for r in d.wait_results("squat-victim", 1)] == [10]
        assert any("is ours again" in r.getMessage() for r in caplog.records)
    finally:
        pub.close()
        d.kill()
