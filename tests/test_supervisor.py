"""The supervisor's checks, without starting a worker."""

import socket

import pytest

from claudeflare.supervisor import ServeError, check_mitmdump_args, reserve_port


@pytest.mark.parametrize("arg", ["--listen-port", "--listen-host", "-p", "listen_port=9", "listen_host=0.0.0.0"])
def test_the_listening_address_is_the_supervisors_to_give(arg):
    with pytest.raises(ServeError, match="is set by `claudeflare serve`"):
        check_mitmdump_args(["--set", "flow_detail=0", arg])


def test_other_mitmdump_arguments_pass():
    check_mitmdump_args(["--set", "flow_detail=0", "--mode", "reverse:https://api.anthropic.com"])


def test_a_reserved_port_is_free_for_the_workers_and_no_one_else():
    reserved = reserve_port("127.0.0.1", 0)
    try:
        port = reserved.getsockname()[1]
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))  # as asyncio's start_server(reuse_port=True) does
        worker.listen()
        worker.close()
        other = socket.socket()
        with pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # a program without SO_REUSEPORT
        other.close()
    finally:
        reserved.close()


def test_a_port_another_program_listens_on_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            reserve_port("127.0.0.1", taken.getsockname()[1])
