"""The wire format between trainer and analysis daemon: messages, limits, shared memory, sockets, keys."""
from .messages import (
    DEFAULT_LIMITS,
    DTYPE_ITEMSIZE,
    KIND_END,
    KIND_HEARTBEAT,
    KIND_HELLO,
    KIND_SNAPSHOT,
    PROTOCOL_VERSION,
    End,
    Heartbeat,
    Hello,
    Limits,
    Message,
    ProtocolError,
    ShmRef,
    Snapshot,
    check_meta,
    check_metrics,
    check_wandb_info,
    check_run_name,
    check_tensor_name,
    decode,
    encode_end,
    encode_heartbeat,
    encode_hello,
    encode_snapshot,
    pack_token_counts,
    unpack_token_counts,
)
from .gate import Gate, key_fingerprint
from .security import CurveClient, CurveServer, generate_keypair
from .shm import ShmReader, ShmWriter, pid_alive, remove_segments_of, remove_stale_segments, segments_of, shm_available
from .tensors import snapshot_tensor, torch_dtype, wire_dtype
from .transport import DEFAULT_PEER_LIMITS, PeerLimits, bind_receiver, check_endpoint, connect_publisher, is_local_endpoint

__all__ = [
    "DEFAULT_LIMITS", "DTYPE_ITEMSIZE", "KIND_END", "KIND_HEARTBEAT", "KIND_HELLO", "KIND_SNAPSHOT", "PROTOCOL_VERSION",
    "End", "Heartbeat", "Hello", "Limits", "Message", "ProtocolError", "ShmRef", "Snapshot", "check_meta", "check_metrics",
    "check_run_name", "check_tensor_name", "check_wandb_info",
    "decode", "encode_end", "encode_heartbeat", "encode_hello", "encode_snapshot", "pack_token_counts", "unpack_token_counts", "CurveClient", "CurveServer",
    "generate_keypair", "ShmReader", "ShmWriter", "pid_alive", "remove_segments_of", "remove_stale_segments", "segments_of",
    "shm_available", "snapshot_tensor", "torch_dtype",
    "wire_dtype", "Gate", "key_fingerprint", "PeerLimits", "DEFAULT_PEER_LIMITS", "bind_receiver", "check_endpoint", "connect_publisher", "is_local_endpoint",
]
