"""The node process itself: its command line, the addresses it prints, and clean stops."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest

from testbed.node.server import main

READY = "testbed-node listening on "


def start_node(*listen: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "testbed.node"] + [a for addr in listen for a in ("--listen", addr)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_listens_on_every_given_address_prints_them_and_stops_on_signal():
    procs = {sig: start_node("127.0.0.1:0", "127.0.0.2:0") for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig, proc in procs.items():
            lines = [proc.stdout.readline().strip() for _ in range(2)]
            assert all(line.startswith(READY) for line in lines), lines
            addresses = [line[len(READY):] for line in lines]
            assert [a.rsplit(":", 1)[0] for a in addresses] == ["127.0.0.1", "127.0.0.2"]
            for addr in addresses:  # each one really serves
                with grpc.insecure_channel(addr) as ch:
                    grpc.channel_ready_future(ch).result(timeout=10)
            proc.send_signal(sig)
        for proc in procs.values():
            assert proc.wait(timeout=20) == 0
            assert "stopped" in proc.stderr.read()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_bad_listen_address_is_refused_by_name(capsys):
    assert main(["--listen", "127.0.0.1:99999"]) == 2
    assert "listen: got '127.0.0.1:99999'" in capsys.readouterr().err
    assert main(["--listen", "192.0.2.1:0"]) == 2  # not an address of this host
    assert "listen" in capsys.readouterr().err


def test_testbed_cli_dispatches_to_the_node(capsys):
    from testbed.cli import main as testbed_main

    with pytest.raises(SystemExit) as info:
        testbed_main(["node", "--help"])
    assert info.value.code == 0 and "--listen" in capsys.readouterr().out


def test_the_server_never_hangs_up_on_a_client_for_pinging_too_often():
    """A node under a CPU quota (time dilation, slow devices) reads its sockets in bursts, so its
    clients' keepalive pings reach it bunched up, closer together than the 5 s it allows. gRPC's
    default answer after two such strikes is GOAWAY too_many_pings, which fails the calls in
    flight; our server must bear any number. Here a client pings every second during a 6 s call."""
    import time

    from testbed.comm.channels import CONTROL_CHANNEL_OPTIONS, make_server

    def slow(request, context):
        time.sleep(6)
        return request

    server = make_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
        "Slow": grpc.unary_unary_rpc_method_handler(slow)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    eager = dict(CONTROL_CHANNEL_OPTIONS) | {"grpc.keepalive_time_ms": 1000,
                                             "grpc.http2.min_ping_interval_without_data_ms": 1000}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=list(eager.items())) as ch:
            call = ch.unary_unary("/t.T/Slow", request_serializer=None, response_deserializer=None)
            assert call(b"ok", timeout=30) == b"ok"
    finally:
        server.stop(0).wait()
