"""A hostile local user, for tests/test_attacks.py: standard library only (the system python3, no msgpack,
no pyzmq), so it runs as an unprivileged uid under `setpriv` exactly as another user on the host would.

    python3 tests/attacker.py PORT COMMAND [ARGS...]

It speaks ZMTP 3.0 (NULL mechanism) by hand and packs msgpack by hand. Commands print one JSON line
of what they did and exit 0; the test judges the daemon, not the attacker.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import struct
import sys
import time

# ------------------------------------------------------------------ msgpack (the subset headers use)


def pack(obj) -> bytes:
    """msgpack encoding of None/bool/int/float/str/list/dict."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj < 128:
            return bytes([obj])
        if obj < 0:
            return b"\xd3" + struct.pack(">q", obj)
        return b"\xcf" + struct.pack(">Q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        n = len(data)
        head = bytes([0xA0 | n]) if n < 32 else b"\xd9" + bytes([n]) if n < 256 else (
            b"\xda" + struct.pack(">H", n) if n < 65536 else b"\xdb" + struct.pack(">I", n))
        return head + data
    if isinstance(obj, (list, tuple)):
        n = len(obj)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 65536 else b"\xdd" + struct.pack(">I", n)
        return head + b"".join(pack(x) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(pack(k) + pack(v) for k, v in obj.items())
    raise TypeError(type(obj))


# ------------------------------------------------------------------ ZMTP 3.0, NULL mechanism, as a PUSH peer

GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


def _command(name: bytes, body: bytes) -> bytes:
    data = bytes([len(name)]) + name + body
    return (bytes([0x04, len(data)]) if len(data) < 256 else b"\x06" + struct.pack(">Q", len(data))) + data


def connect(port: int, handshake: bool = True, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the daemon, with the ZMTP greeting and READY exchanged when `handshake`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if handshake:
        s.sendall(GREETING + _command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"))
        # The daemon's greeting, then its READY (sent once our connection passed its ZAP check): a
        # message sent before that would be taken for a handshake command, as libzmq peers never do.
        got = _recv_exact(s, 64 + 2)
        _recv_exact(s, got[65])
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        got += chunk
    return got


def frame(data: bytes, more: bool) -> bytes:
    """One ZMTP message frame."""
    flags = 0x01 if more else 0x00
    if len(data) < 256:
        return bytes([flags, len(data)]) + data
    return bytes([flags | 0x02]) + struct.pack(">Q", len(data)) + data


def send(s: socket.socket, frames: list[bytes]) -> None:
    """Send one multipart message."""
    s.sendall(b"".join(frame(f, i < len(frames) - 1) for i, f in enumerate(frames)))


def hello(run: str, publisher: str, host: str = "h", vocab=None, rank: int = 0, world: int = 1,
          meta=None, wandb=None) -> bytes:
    return pack({"v": 1, "kind": "hello", "run": run, "seq": 0, "publisher": publisher, "pid": os.getpid(),
                 "host": host, "vocab": vocab, "wandb": wandb, "meta": meta or {}, "rank": rank, "world_size": world})


def snapshot(run: str, publisher: str, it: int, shape, dtype="float32", shm=None, global_shape=None,
             offset=None) -> bytes:
    itemsize = {"float32": 4, "float16": 2}[dtype]
    part = {} if global_shape is None else {"global_shape": list(global_shape), "offset": list(offset)}
    return pack({"v": 1, "kind": "snapshot", "run": run, "seq": it, "publisher": publisher, "iter": it,
                 "name": "wte", "dtype": dtype, "shape": list(shape), "nbytes": shape[0] * shape[1] * itemsize,
                 "sent_at": time.time(), "shm": shm, **part})


def heartbeat(run: str, publisher: str, seq: int) -> bytes:
    return pack({"v": 1, "kind": "heartbeat", "run": run, "seq": seq, "publisher": publisher})


# ------------------------------------------------------------------ attacks

SLOT_HEADER = struct.Struct("<QQQQ")
MAGIC = int.from_bytes(b"EMONSLT1", "little")


def _segment(secret: str, index: int) -> str:
    return f"emon-{os.getpid()}-{hashlib.sha256(secret.encode()).hexdigest()[:24]}-{index}-1"


def shm_truncate(port: int, rounds: int) -> dict:
    """Our own, correctly named segment: world-writable; then 0600 but truncated before and while it is read."""
    secret = "attacker-secret"
    publisher = f"h/{os.getpid()}/{secret}"
    rows, cols = 256, 64
    nbytes = rows * cols * 4
    name = _segment(secret, 0)
    path = "/dev/shm/" + name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    os.fchmod(fd, 0o666)
    s = connect(port)
    send(s, [hello("shm-attack", publisher)])
    ref = {"segment": name, "offset": 64}

    def offer(seq: int, size: int) -> None:
        os.ftruncate(fd, 64 + nbytes)
        os.pwrite(fd, SLOT_HEADER.pack(MAGIC, 2, seq, nbytes), 0)
        os.ftruncate(fd, size)
        send(s, [snapshot("shm-attack", publisher, seq, (rows, cols), shm=dict(ref, slot_seq=seq))])

    offer(2, 64 + nbytes)  # phase 1: writable by others
    time.sleep(0.5)
    os.fchmod(fd, 0o600)
    offer(4, 64 + 1000)  # phase 2: the size announced does not fit the file any more
    time.sleep(0.5)
    sent = 2
    for seq in range(6, 6 + 2 * rounds, 2):  # phase 3: shrunk while the daemon may be reading it
        os.ftruncate(fd, 64 + nbytes)
        os.pwrite(fd, SLOT_HEADER.pack(MAGIC, 2, seq, nbytes), 0)
        send(s, [snapshot("shm-attack", publisher, seq, (rows, cols), shm=dict(ref, slot_seq=seq))])
        time.sleep(0.0005 * (seq % 7))
        os.ftruncate(fd, 64 + (seq * 37) % nbytes)
        time.sleep(0.01)
        sent += 1
    time.sleep(0.5)
    s.close()
    os.close(fd)
    os.unlink(path)
    return {"sent": sent, "segment": name}


def shm_theft(port: int, victim_segment: str, slot_seq: int) -> dict:
    """Name another run's segment from a run of our own (with a publisher id we made up)."""
    s = connect(port)
    pid = victim_segment.split("-")[1]
    publisher = f"h/{pid}/guessed-secret"  # same pid as the victim: only the secret is unknown
    send(s, [hello("thief", publisher)])
    send(s, [snapshot("thief", publisher, 1, (500, 32), shm={"segment": victim_segment, "offset": 64,
                                                                "slot_seq": slot_seq})])
    time.sleep(0.5)
    s.close()
    return {"segment": victim_segment}


def starve(port: int, rows: int, cols: int) -> dict:
    """One small inline snapshot whose analysis costs V^2 pairs."""
    s = connect(port)
    send(s, [hello("starve", "h/1/x")])
    # Every value 1.0 (float16 0x3c00): valid rows, so nothing is skipped as an all-zero row.
    send(s, [snapshot("starve", "h/1/x", 1, (rows, cols), dtype="float16"), b"\x00\x3c" * (rows * cols)])
    time.sleep(0.5)
    s.close()
    return {"bytes": rows * cols * 2}


def big_vocab(port: int, tokens: int) -> dict:
    """A hello carrying a huge vocabulary."""
    s = connect(port)
    body = hello("vocab-bomb", "h/1/x", vocab=["%d" % (i % 100) for i in range(tokens)])
    send(s, [body])
    time.sleep(1.0)
    s.close()
    return {"wire_bytes": len(body)}


_stdin_open = True


def _stop_asked() -> bool:
    """Whether the test wrote `stop` to our stdin (it has seen what it needed): a flood ends early. End of
    file or no stdin (a benchmark's terminal) leaves only the time bound."""
    global _stdin_open
    try:
        if not _stdin_open or not select.select([sys.stdin], [], [], 0)[0]:
            return False
        line = sys.stdin.readline()
    except (OSError, ValueError):
        line = ""
    _stdin_open = bool(line)
    return line.strip() == "stop"


def _pause(seconds: float) -> None:
    """Sleep `seconds`, or less if the test says stop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not _stop_asked():
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def idle_peers(port: int, count: int, hold: float) -> dict:
    """`count` connections that send the greeting and READY (where the daemon accepts them), then nothing for
    `hold` seconds (or until `stop` on stdin)."""
    socks, failed = [], 0
    for _ in range(count):  # non-blocking connects: a full accept backlog must not stall us
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    time.sleep(1.0)
    for s in socks:  # then silence: not even a reply to the daemon's heartbeat PINGs
        try:
            s.send(GREETING + _command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"))
        except OSError:
            failed += 1  # still in the accept backlog, or already dropped: idle all the same
    print(json.dumps({"opened": len(socks), "greeting_not_sent": failed}), flush=True)
    _pause(hold)  # or until the test has measured what it needed
    alive = 0
    for s in socks:
        try:
            while True:  # read what the daemon sent; b"" (or a reset) means it closed the connection
                if s.recv(65536) == b"":
                    break
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.close()
    return {"opened": len(socks), "still_open_at_end": alive}


def oversized(port: int, count: int) -> dict:
    """`count` peers that announce a 4 GiB frame and send only its first bytes."""
    socks = []
    for _ in range(count):
        s = connect(port)
        s.sendall(b"\x02" + struct.pack(">Q", 4 * 1024**3) + b"\0" * 65536)
        socks.append(s)
    time.sleep(1.0)
    return {"peers": len(socks)}


def flood(port: int, count: int) -> dict:
    """`count` malformed messages, and a hello whose host and run try to forge log lines and escape codes."""
    s = connect(port)
    for i in range(count):
        send(s, [b"\x00garbage" + str(i).encode()])
    send(s, [hello("inject\u202e", "h/1/x", host="evil\n2026-01-01 00:00:00 analysis-daemon INFO forged line\x1b[31mRED")])
    time.sleep(0.5)
    s.close()
    return {"sent": count + 1}


def fat_hellos(port: int, count: int) -> dict:
    """`count` hellos under fresh run names, each ~12 MB of nested `meta` and `wandb` maps (no vocabulary)."""
    s = connect(port)
    text = "x" * 3000
    wide = {f"k{i}": text for i in range(4000)}  # 12 MB of strings in one map
    shapes = [("meta", {"a": {"b": wide}}), ("wandb", {"project": {"nested": wide}}),
              ("meta", {"l": [[[[[[[[1]]]]]]]] * 1000, "s": text * 20}), ("wandb", {f"k{i}": text for i in range(4000)})]
    wire = 0
    for i in range(count):
        field, value = shapes[i % len(shapes)]
        body = hello(f"fat-{i}", f"h/{i}/x", **{field: value})
        send(s, [body])
        wire += len(body)
    time.sleep(1.0)
    s.close()
    return {"hellos": count, "wire_bytes": wire}


def squat(port: int, seconds: float, marker: str) -> dict:
    """Listen on the daemon's port while it is down, complete the ZMTP handshake as a PULL peer with every
    trainer that connects, and count what each sends after it (a hello would carry `marker`, its run name).
    A line after each connection the trainer closed says how many there were; `stop` on stdin ends it early."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    srv.settimeout(0.2)
    print(json.dumps({"listening": port}), flush=True)
    handshakes = after = 0
    seen_marker = False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not _stop_asked():
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(0.5)
        try:
            conn.sendall(GREETING + _command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PULL"))
            _recv_exact(conn, 64)  # its greeting
            head = _recv_exact(conn, 2)
            size = head[1] if head[0] == 0x04 else struct.unpack(">Q", head[1:] + _recv_exact(conn, 7))[0]
            _recv_exact(conn, size)  # its READY: the handshake is complete on both sides now
            handshakes += 1
            data = b""
            while time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                data += chunk
            after += len(data)
            seen_marker = seen_marker or marker.encode() in data
            print(json.dumps({"handshakes": handshakes}), flush=True)
        except (OSError, ConnectionError) as exc:
            print("squat:", repr(exc), file=sys.stderr, flush=True)
        finally:
            conn.close()
    srv.close()
    return {"handshakes": handshakes, "bytes_after_handshake": after, "saw_run_name": seen_marker}


def read_secrets(port: int, directory: str, seconds: float) -> dict:
    """Try, for `seconds`, to read every *.key_secret file appearing in `directory` (the keygen race)."""
    tried = stolen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if "key_secret" in name:
                tried += 1
                try:
                    with open(os.path.join(directory, name), "rb") as f:
                        stolen += b"secret-key" in f.read()
                except OSError:
                    pass
    return {"tried": tried, "stolen": stolen}


def _hold(port: int, count: int, seconds: float, greet: bool) -> dict:
    """Keep `count` connections open for `seconds` (or until stdin closes), reopening each one the daemon
    drops; with `greet` they send the ZMTP greeting and READY (idle ZeroMQ peers), else nothing at all."""
    def opened() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        return s

    socks = [opened() for _ in range(count)]
    greeted: set[int] = set()
    total, reopened = count, 0
    deadline = time.monotonic() + seconds
    announced = False
    while time.monotonic() < deadline and not (announced and _stop_asked()):  # bounded: `seconds`
        time.sleep(0.2)
        for i, s in enumerate(socks):
            dropped = False
            try:
                if greet and id(s) not in greeted:
                    s.send(GREETING + _command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"))
                    greeted.add(id(s))
                while True:
                    if s.recv(65536) == b"":
                        dropped = True
                        break
            except BlockingIOError:
                pass
            except OSError:
                dropped = True
            if dropped:
                s.close()
                socks[i] = opened()
                total += 1
                reopened += 1
        if not announced:
            print(json.dumps({"holding": count}), flush=True)
            announced = True
    for s in socks:
        s.close()
    return {"connections_opened": total, "reopened": reopened}


def raw_flood(port: int, count: int, seconds: float) -> dict:
    """Connections that never send a ZMTP greeting, reopened when dropped."""
    return _hold(port, count, seconds, greet=False)


def idle_flood(port: int, count: int, seconds: float) -> dict:
    """ZeroMQ peers that greet and fall silent, reopened when dropped."""
    return _hold(port, count, seconds, greet=True)


def hellos(port: int, count: int, mode: str) -> dict:
    """`count` hellos on one connection: each under a fresh run name (mode "names"), or all for one run."""
    s = connect(port)
    me = f"h/{os.getpid()}/attacker"
    for i in range(count):
        run = f"flood-{i}" if mode == "names" else mode
        send(s, [hello(run, f"{me}-{i}", host="attacker-host")])
    time.sleep(1.0)
    s.close()
    return {"hellos": count}


def join(port: int, run: str, seconds: float) -> dict:
    """Claim ranks of another user's run: rank-claiming hellos (300, fresh publisher ids), a part and a
    whole snapshot with our own numbers, then heartbeats for the run for `seconds`."""
    s = connect(port)
    me = f"h/{os.getpid()}/joiner"
    for i in range(300):
        send(s, [hello(run, f"{me}-{i}", rank=1 + i % 3, world=4, vocab=["<img src=x onerror=alert(1)>"] * 4,
                       meta={"run_token": "0" * 32})])
    rows, cols = 300, 16
    for it in (10, 20, 30):
        send(s, [snapshot(run, f"{me}-0", it, (rows // 4, cols), global_shape=(rows, cols), offset=(rows // 4, 0)),
                 b"\0" * (rows // 4 * cols * 4)])
        send(s, [snapshot(run, f"{me}-0", it, (rows, cols)), struct.pack("<f", 1.0) * (rows * cols)])
    seq, deadline, gone = 0, time.monotonic() + seconds, False
    while time.monotonic() < deadline and not gone:  # bounded: `seconds`
        try:
            for i in range(4):
                send(s, [heartbeat(run, f"{me}-{i}", seq)])
        except OSError:
            gone = True  # the daemon closed the connection: it exited while we still heartbeat
        seq += 1
        time.sleep(0.5)
    s.close()
    return {"heartbeat_rounds": seq, "daemon_gone": gone}


def names(port: int, count: int, rows: int, cols: int) -> dict:
    """`count` fresh run names, each with one small but slow inline snapshot (float16 rows x cols)."""
    s = connect(port)
    payload = b"".join(struct.pack("<e", 1.0 + (i % 97) / 97.0) for i in range(rows * cols))
    me = f"h/{os.getpid()}/names"
    for i in range(count):
        run = f"slow-{i}"
        send(s, [hello(run, me)])
        send(s, [snapshot(run, me, 1, (rows, cols), dtype="float16"), payload])
    time.sleep(0.5)
    s.close()
    return {"runs": count}


def parts(port: int, count: int, rows: int, cols: int) -> dict:
    """`count` fresh run names, each with the first half of a sharded iteration that never completes."""
    s = connect(port)
    me = f"h/{os.getpid()}/parts"
    half = rows // 2
    for i in range(count):
        run = f"shard-{i}"
        send(s, [hello(run, me, rank=0, world=2)])
        send(s, [snapshot(run, me, 1, (half, cols), dtype="float16", global_shape=(rows, cols), offset=(0, 0)),
                 b"\x00\x3c" * (half * cols)])
    time.sleep(1.0)
    s.close()
    return {"assemblies": count, "bytes_each": rows * cols * 2}


COMMANDS = {"read-secrets": (read_secrets, [str, float]), "shm-truncate": (shm_truncate, [int]), "shm-theft": (shm_theft, [str, int]),
            "starve": (starve, [int, int]), "big-vocab": (big_vocab, [int]), "idle-peers": (idle_peers, [int, float]),
            "oversized": (oversized, [int]), "flood": (flood, [int]),
            "raw-flood": (raw_flood, [int, float]), "idle-flood": (idle_flood, [int, float]),
            "hellos": (hellos, [int, str]), "join": (join, [str, float]), "names": (names, [int, int, int]),
            "parts": (parts, [int, int, int]), "fat-hellos": (fat_hellos, [int]), "squat": (squat, [float, str])}


def main() -> int:
    port, command, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    fn, types = COMMANDS[command]
    result = fn(port, *(t(a) for t, a in zip(types, args)))
    result["uid"] = os.getuid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
