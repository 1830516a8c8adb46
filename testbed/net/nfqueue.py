"""A minimal netfilter NFQUEUE client on a raw netlink socket (no libnetfilter_queue).

Why not the NetfilterQueue package: the delay line needs three things it does not expose,
and each matters at hundreds of Mbit/s in Python:
- ``NFQA_CFG_F_GSO``: GSO super-packets (up to 64 KB) are queued whole instead of being
  cut into MTU-sized segments first, so a 1 Gbit/s flow costs a few thousand messages/s;
- ``NFQNL_MSG_VERDICT_BATCH``: one message accepts every packet of a queue up to an id. The
  delay line releases each queue in arrival order, so one batch verdict per wake-up suffices,
  and a packet whose notification was lost (socket buffer full) is still released by the
  next batch instead of being held forever;
- copy mode META: only ids are needed (the queue number tells the source), no payload copies.

Kernel interface: include/uapi/linux/netfilter/nfnetlink_queue.h. All integers in nfnetlink
attributes are big-endian.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_TIMESTAMP = 1, 2, 4
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 1 << 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (queue number, big-endian)
_NLATTR = struct.Struct("=HH")  # len, type (host order)
_PKT_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook
_TSTAMP = struct.Struct("!QQ")  # seconds, microseconds (wall clock) of the packet's arrival


class NfqueueError(OSError):
    """The kernel refused a queue configuration (e.g. queue already bound by another process)."""


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class NfQueueSocket:
    """One netlink socket bound to several NFQUEUE queue numbers of the current network namespace.

    ``packets()`` drains what the kernel has queued without blocking and yields
    ``(queue_num, packet_id)``; ``accept_upto(queue_num, packet_id)`` releases every packet
    of that queue with an id <= packet_id (ids grow by one per packet within a queue).
    """

    def __init__(self, rcvbuf_bytes: int = 16 << 20):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        # a big receive buffer absorbs bursts; lost notifications are recovered by batch verdicts
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf_bytes)  # SO_RCVBUFFORCE (needs root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self._seq = 0
        self._buf = bytearray(65536)
        self.queues: set[int] = set()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, msg_type: int, queue_num: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> int:
        self._seq += 1
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue_num) + attrs
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self._seq, 0)
        self.sock.send(hdr + body)
        return self._seq

    def _config(self, queue_num: int, attrs: bytes) -> None:
        """Send a config message and wait for its acknowledgement (raises NfqueueError on refusal)."""
        seq = self._send(NFQNL_MSG_CONFIG, queue_num, attrs, NLM_F_REQUEST | NLM_F_ACK)
        self.sock.setblocking(True)
        while True:
            n = self.sock.recv_into(self._buf)
            for msg_type, mseq, data in _messages(memoryview(self._buf)[:n]):
                if msg_type == NLMSG_ERROR and mseq == seq:
                    err = -struct.unpack_from("=i", data)[0]
                    if err:
                        raise NfqueueError(err, f"NFQUEUE config of queue {queue_num}: {os.strerror(err)}")
                    return

    def bind(self, queue_num: int, maxlen_packets: int = 65536) -> None:
        """Take packets of queue ``queue_num``: metadata only, GSO packets whole, a long kernel queue."""
        self._config(queue_num, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
        self._config(queue_num, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META) + b"\0" * 3)
                     + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen_packets))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)))
        self.queues.add(queue_num)

    def unbind(self, queue_num: int) -> None:
        """Stop taking packets of a queue (the kernel drops what is still queued there)."""
        self._config(queue_num, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, socket.AF_INET)))
        self.queues.discard(queue_num)

    def packets(self) -> Iterator[tuple[int, int, float | None]]:
        """Yield (queue_num, packet_id, arrival) for every waiting notification; never blocks.

        ``arrival`` is the kernel's receive time (wall clock, seconds) when packets are being
        timestamped (see ``enable_rx_timestamps``), else None.
        """
        self.sock.setblocking(False)
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS is off, but be safe: lost notifications are released by batches
                if e.errno == errno.ENOBUFS:
                    continue
                raise
            view = memoryview(self._buf)[:n]
            for msg_type, _seq, data in _messages(view):
                if msg_type != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                queue_num = _NFGENMSG.unpack_from(data)[2]
                packet_id, arrival = _packet_info(data[_NFGENMSG.size:])
                if packet_id is not None:
                    yield queue_num, packet_id, arrival

    def accept_upto(self, queue_num: int, packet_id: int) -> None:
        """Accept every packet of ``queue_num`` with id <= ``packet_id`` (one message)."""
        self._send(NFQNL_MSG_VERDICT_BATCH, queue_num, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)))

    def close(self) -> None:
        self.sock.close()


def _messages(view: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Split a netlink datagram into (type, seq, payload) messages."""
    off = 0
    while off + _NLMSGHDR.size <= len(view):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(view, off)
        if length < _NLMSGHDR.size:
            return
        yield msg_type, seq, view[off + _NLMSGHDR.size: off + length]
        off += (length + 3) & ~3


def _packet_info(attrs: memoryview) -> tuple[int | None, float | None]:
    """(packet id, arrival wall-clock seconds or None) from a packet message's attributes."""
    off, packet_id, arrival = 0, None, None
    while off + _NLATTR.size <= len(attrs):
        length, kind = _NLATTR.unpack_from(attrs, off)
        if length < _NLATTR.size:
            break
        kind &= 0x3FFF
        if kind == NFQA_PACKET_HDR:
            packet_id = _PKT_HDR.unpack_from(attrs, off + _NLATTR.size)[0]
        elif kind == NFQA_TIMESTAMP:
            sec, usec = _TSTAMP.unpack_from(attrs, off + _NLATTR.size)
            arrival = sec + usec * 1e-6
        off += (length + 3) & ~3
    return packet_id, arrival


def enable_rx_timestamps() -> socket.socket:
    """Make the kernel timestamp every received packet (a global switch held while the socket lives).

    Any socket asking for SO_TIMESTAMPNS turns receive timestamps on for the whole kernel; the
    NFQUEUE messages then carry each packet's arrival time, so the delay line measures the hold
    from the true arrival and not from when it got round to reading the notification.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
    return s
