"""gRPC channel and server options, all in one place, each with the reason it is set.

Used by the node server, the orchestrator (control plane) and the GrpcCommunicator
(data plane), so every side agrees on message sizes and keepalive.
"""

from __future__ import annotations

from concurrent import futures

import grpc

from testbed.errors import ConfigError

# Data-plane messages are cut into chunks of this many payload bytes. 1 MiB keeps the
# per-frame overhead of gRPC Python (~tens of microseconds) small against the copy
# time of the payload, while staying far below gRPC's 4 MiB default message limit.
CHUNK_BYTES = 1 << 20

# A data frame is one chunk plus a few header fields; the headroom covers them.
_FRAME_HEADROOM_BYTES = 64 << 10

# Control replies carry a rank's output tensor (e.g. logits for every prompt token:
# 1024 tokens x 50257 classes x 4 B = 206 MB); 1 GiB covers the models we run.
_CONTROL_MESSAGE_BYTES = 1 << 30

# Keepalive: a peer whose host vanishes without a TCP reset (link cut under
# emulation) must break the stream well before a collective's deadline. Pings every
# 10 s; the 20 s ack timeout leaves room for a ping queued behind megabytes of data
# on a slow shaped link (64 MB at 10 Mbit/s is 50 s, but the kernel queue ahead of a
# ping is only the socket buffer, a few MB at most: ~3 s at 10 Mbit/s). Links run
# slower under time dilation: a node is then started with a longer timeout, and the
# ping interval grows with it (testbed.backends.mininet).
KEEPALIVE_TIMEOUT_S = 20.0


def keepalive_options(timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    """Keepalive of a channel or server whose ack timeout is ``timeout_s`` (ping every half of it).

    The ping-rate limits stay at 5 s whatever the timeout: a server enforces them on the pings
    it receives too, and the orchestrator's control channels always ping every 10 s (a larger
    limit there gets them a GOAWAY "too_many_pings", which fails the calls in flight)."""
    t_ms = int(timeout_s * 1000)
    return [
        ("grpc.keepalive_time_ms", t_ms // 2),
        ("grpc.keepalive_timeout_ms", t_ms),
        ("grpc.keepalive_permit_without_calls", 1),  # streams idle between inferences
        ("grpc.http2.max_pings_without_data", 0),  # 0 = no limit: idle streams keep being checked
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),  # let the pings through
    ]


_KEEPALIVE = keepalive_options()

def data_channel_options(chunk_bytes: int = CHUNK_BYTES,
                         keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    """Options of a channel that carries peer frames of at most ``chunk_bytes`` payload."""
    frame = chunk_bytes + _FRAME_HEADROOM_BYTES
    return [("grpc.max_send_message_length", frame), ("grpc.max_receive_message_length", frame),
            *_DATA_CHANNEL_OPTIONS, *keepalive_options(keepalive_timeout_s)]


_DATA_CHANNEL_OPTIONS = [
    # Each channel gets its own TCP connection: gRPC otherwise shares one connection
    # between channels to the same address in a process (two ranks in one test
    # process, or the orchestrator and a peer), which would mix their traffic.
    ("grpc.use_local_subchannel_pool", 1),
    # Retries buffer every sent message until the call commits; a stream never
    # retries usefully, so the buffering would only cost memory and copies.
    ("grpc.enable_retries", 0),
]

CONTROL_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _CONTROL_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _CONTROL_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),  # a failed Infer must surface, never be re-run silently
    *_KEEPALIVE,
]

def server_options(keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", _CONTROL_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _CONTROL_MESSAGE_BYTES),
        # Linux gRPC sets SO_REUSEPORT by default: a second server on a busy explicit
        # port would then bind silently and steal half the connections. Fail instead.
        ("grpc.so_reuseport", 0),
        # Accept the clients' keepalive pings (the default minimum is 5 min and the
        # server would answer faster pings with GOAWAY "too_many_pings"); the fastest
        # client (the orchestrator, default keepalive) pings every 10 s.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        # ... but never hang up on a client for pinging more often: a node under a CPU quota
        # (time dilation, slow devices) reads its sockets in bursts and sees its clients' pings
        # bunched up; the default (GOAWAY after 2 strikes) then fails the calls in flight.
        ("grpc.http2.max_ping_strikes", 0),
        *keepalive_options(keepalive_timeout_s),
    ]

# Every peer stream holds one server worker thread for the job's life (N-1 per
# node), plus the control RPCs; 64 covers jobs of up to ~60 ranks.
SERVER_WORKERS = 64


def make_server(max_workers: int = SERVER_WORKERS, keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-worker"),
                       options=server_options(keepalive_timeout_s))


def split_hostport(address: str, field: str = "address") -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port). Raises ConfigError naming ``field``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(field, address, "HOST:PORT with PORT in 0..65535 (IPv6 as [ADDR]:PORT)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or a name, as in --listen) is a loopback address (127.0.0.0/8, ::1):
    a name counts only if every address it resolves to is one. Unresolvable: not loopback."""
    import ipaddress
    import socket

    def loop(ip: str) -> bool:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
        mapped = getattr(a, "ipv4_mapped", None)  # ::ffff:127.0.0.1
        return (mapped or a).is_loopback

    try:
        return loop(host)
    except ValueError:
        pass  # a name
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(loop(str(info[4][0])) for info in infos)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
