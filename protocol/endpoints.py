"""Where trainer and daemon meet on one host, and whether the listener a trainer reached is to be trusted.

On a shared host a TCP port is open to every user: whoever listens on it while the daemon is down or
restarting receives the trainer's hello (vocabulary, W&B info), its publisher secret and, over the
socket, whole embedding matrices. So the default endpoint is an ipc:// socket in a directory only the
user can enter (mode 0700, owned by the user, not a symlink):

    $XDG_RUNTIME_DIR/embedding-monitor/daemon.sock    (the user's runtime dir, /run/user/<uid>)
    /tmp/embedding-monitor-<uid>/daemon.sock          (without one)

Explicit tcp:// endpoints keep working. Before a trainer sends anything to a listener it reached
without CurveZMQ (where the server key proves the daemon), it checks who owns the listening socket
(`listener_owner`: /proc/net/tcp{,6} on Linux, the socket file's owner for ipc) and refuses one owned
by another user (root excepted: root can read every process's memory anyway).

    python -m protocol.endpoints      prints the default endpoint (creating its directory); launch.sh uses it
"""
from __future__ import annotations

import ipaddress
import os
import stat
import sys
from pathlib import Path
from typing import Final

SOCKET_NAME: Final[str] = "daemon.sock"
_DIR_NAME: Final[str] = "embedding-monitor"
_LISTEN: Final[str] = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


class UnsafeEndpoint(ValueError):
    """A socket directory or a listener that another user could control; the text says which and why."""


def private_dir() -> Path:
    """The directory of the default socket: $XDG_RUNTIME_DIR/embedding-monitor, else /tmp/embedding-monitor-<uid>."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / _DIR_NAME
    return Path("/tmp") / f"{_DIR_NAME}-{os.geteuid()}"


def check_private_dir(directory: Path) -> Path:
    """Raise UnsafeEndpoint unless `directory` is a real directory (no symlink), ours, mode 0700 or tighter."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise UnsafeEndpoint(f"socket directory {directory} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeEndpoint(f"socket directory {directory} is a symlink: refusing it (another user may have "
                             "planted it); remove it and start again")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeEndpoint(f"socket directory {directory} is not a directory: remove it and start again")
    if st.st_uid != os.geteuid():
        raise UnsafeEndpoint(f"socket directory {directory} belongs to uid {st.st_uid}, not to us "
                             f"(uid {os.geteuid()}): refusing it; remove it, or set XDG_RUNTIME_DIR")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeEndpoint(f"socket directory {directory} has mode {stat.S_IMODE(st.st_mode):o}: other users "
                             f"could reach the socket; `chmod 700 {directory}`")
    return directory


def ensure_private_dir(directory: Path | None = None) -> Path:
    """Create the socket directory 0700 if missing (parents as the system made them), then check it."""
    directory = directory or private_dir()
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask (never widened, but be exact)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafeEndpoint(f"cannot create the socket directory {directory}: {exc.strerror or exc}") from None
    return check_private_dir(directory)


def default_endpoint(create: bool = True) -> str:
    """The private same-host endpoint, ipc://<private_dir()>/daemon.sock (its directory created and checked)."""
    directory = ensure_private_dir() if create else private_dir()
    return f"ipc://{directory / SOCKET_NAME}"


def ipc_path(endpoint: str) -> Path | None:
    """The file system path of an ipc:// endpoint (None for other transports and abstract sockets)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    return None if path.startswith("@") else Path(path)


def ipc_in_use(endpoint: str) -> bool:
    """True when something accepts connections on the ipc:// endpoint's socket file now (libzmq would
    silently take the path over from a running daemon; a stale file of a dead one is fine to replace)."""
    path = ipc_path(endpoint)
    if path is None or not path.is_socket():
        return False
    import socket
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:  # ECONNREFUSED: nobody listens, the file is stale
        return False
    finally:
        probe.close()
    return True


def _tcp_target(endpoint: str) -> tuple[str, int] | None:
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):].split(";", 1)[-1]  # "source;destination": the destination
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return host, int(port)
    except ValueError:
        return None


def _proc_address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return ipaddress.ip_address(words)


def _tcp_listeners(port: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] | None:
    """(address, uid) of every listening TCP socket on `port` in this network namespace; None if unknown."""
    found, readable = [], False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != _LISTEN:
                continue
            addr, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port:
                found.append((_proc_address(addr), int(fields[7])))
    return found if readable else None


def listener_owner(endpoint: str) -> int | None:
    """The uid owning the listener a loopback tcp:// or an ipc:// endpoint reaches, when this host can tell.

    For tcp, every listening socket on the port whose address the connection could reach (the loopback
    address itself, or a wildcard); when several users' sockets qualify, the first that is not ours.
    None: no such listener now, not Linux, or not a local endpoint.
    """
    path = ipc_path(endpoint)
    if path is not None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_uid if stat.S_ISSOCK(st.st_mode) else None
    target = _tcp_target(endpoint)
    if target is None:
        return None
    host, port = target
    listeners = _tcp_listeners(port)
    if not listeners:
        return None
    try:
        wanted = {ipaddress.ip_address(host)} if host != "localhost" else {
            ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    except ValueError:
        return None
    uids = [uid for addr, uid in listeners
            if addr in wanted or addr.is_unspecified
            or (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped in wanted)]
    foreign = [uid for uid in uids if uid != os.geteuid()]
    return foreign[0] if foreign else (uids[0] if uids else None)


def check_listener(endpoint: str) -> None:
    """Raise UnsafeEndpoint when the listener `endpoint` reaches is another user's (root is trusted), or
    when none is there any more (a squatter that accepted and closed its listener). A host that cannot
    tell (no /proc/net/tcp) is not judged."""
    uid = listener_owner(endpoint)
    if uid is None:
        target = _tcp_target(endpoint)
        knowable = ipc_path(endpoint) is not None or (target is not None and _tcp_listeners(target[1]) is not None)
        if knowable:
            raise UnsafeEndpoint(f"no listener of ours is on {endpoint} (it went away after the handshake): "
                                 "nothing is sent until one is")
        return
    if uid not in (os.geteuid(), 0):
        raise UnsafeEndpoint(f"the listener on {endpoint} belongs to uid {uid}, not to us (uid {os.geteuid()}): "
                             "another user may be squatting the daemon's address; nothing is sent to it. Use the "
                             "default private endpoint, or CurveZMQ keys (the daemon's key proves it)")


def main() -> int:
    """Print the default endpoint, creating its directory (for launch.sh); one-line error when unsafe."""
    try:
        print(default_endpoint())
    except UnsafeEndpoint as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
