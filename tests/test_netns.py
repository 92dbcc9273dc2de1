"""The throttled network namespace of the slow-link benchmarks: commands, cleanup, and real runs in it."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from benchmarks import netns
from hpctrain.errors import UserError
from hpctrain.h5log import read_log
from hpctrain.local_launch import run_mpi
from tests.helpers import REPO


def test_setup_commands_throttle_loopback_inside_the_namespace():
    commands = netns.setup_commands("ns1", "100mbit")
    assert commands[0] == ["ip", "netns", "add", "ns1"]
    assert commands[1] == ["ip", "netns", "exec", "ns1", "ip", "link", "set", "lo", "up"]
    assert commands[2][:8] == ["ip", "netns", "exec", "ns1", "tc", "qdisc", "add", "dev"]
    assert commands[2][commands[2].index("rate") + 1] == "100mbit"
    assert netns.teardown_command("ns1") == ["ip", "netns", "delete", "ns1"]


@pytest.mark.parametrize("rate, bits", [("1gbit", 1e9), ("100mbit", 1e8), ("2.5Mbit", 2.5e6), ("10mbps", 8e7)])
def test_parse_rate(rate, bits):
    assert netns.parse_rate(rate) == bits


@pytest.mark.parametrize("rate", ["fast", "100", "0mbit", "1gbits", ""])
def test_bad_rate_is_one_clear_error(rate):
    with pytest.raises(UserError, match="write e.g. 1gbit"):
        netns.setup_commands("ns1", rate)


@pytest.fixture
def netns_allowed():
    """Skip (with the reason) where `ip netns` is not permitted: probe by creating one."""
    try:
        with netns.throttled_namespace("1gbit"):
            pass
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable here: {exc}")


def test_namespace_is_removed_on_exception(netns_allowed):
    with pytest.raises(RuntimeError, match="boom"):
        with netns.throttled_namespace("1gbit") as ns:
            assert netns.exists(ns.name)
            raise RuntimeError("boom")
    assert not netns.exists(ns.name)


def test_namespace_is_removed_on_sigterm(netns_allowed):
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from benchmarks import netns\n"
              "with netns.throttled_namespace('1gbit') as ns:\n"
              "    print(ns.name, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        assert netns.exists(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert name.startswith(netns.PREFIX) and not netns.exists(name)


def test_stale_namespace_of_a_dead_process_is_removed(netns_allowed):
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netns.PREFIX}-{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.remove_stale()
        assert not netns.exists(name)
    finally:
        subprocess.run(netns.teardown_command(name), capture_output=True)


def _loopback_transfer_seconds(nbytes: int) -> float:
    """Time to push `nbytes` through one TCP connection on 127.0.0.1 (this thread's namespace)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        received = []

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                while sum(received) < nbytes:
                    received.append(len(conn.recv(1 << 16)))

        reader = threading.Thread(target=receive)
        reader.start()
        start = time.perf_counter()
        with socket.create_connection(server.getsockname()) as client:
            client.sendall(bytes(nbytes))
            reader.join(timeout=30)
        return time.perf_counter() - start


@pytest.mark.mpi
def test_two_ranks_train_inside_a_throttled_namespace(netns_allowed, tmp_path):
    """The link is really slow inside (a TCP transfer takes the time the rate predicts), training
    runs there, and afterwards the namespace is gone and the host's loopback is untouched."""
    with netns.throttled_namespace("50mbit") as ns, ns.entered():
        qdisc = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "50Mbit" in qdisc
        seconds = _loopback_transfer_seconds(2_000_000)
        assert 0.7 * 2_000_000 * 8 / 50e6 < seconds < 10     # unthrottled this takes milliseconds
        run_mpi(2, ["train", "--config", REPO / "configs" / "mnist1d.toml", "--set", "train.max_steps=3",
                    "--set", "data.num_samples=1000", "--set", "checkpoint.every_epochs=0",
                    "--set", f'run.out_dir="{tmp_path}"', "--set", 'compression.name="adacomp"',
                    "--set", "compression.warmup_steps=0"], timeout=60)
    assert not netns.exists(ns.name)
    assert "tbf" not in subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    log = read_log(tmp_path / "mnist1d" / "log.h5")
    assert list(log["steps"]["step"]) == [1, 2, 3]
    assert (log["steps"]["wire_bytes"] < log["steps"]["dense_bytes"]).all()
    assert len(log["evals"]["val_accuracy"]) == 1


def test_two_nodes_are_joined_by_one_throttled_link_and_removed_after(netns_allowed):
    """Node 1 reaches node 0's address over the veth pair, the kernel counts what node 1 sent,
    and both namespaces (and the link) are gone afterwards."""
    commands = netns.two_nodes_commands(("a", "b"), "100mbit")
    shaped = [c for c in commands if "tbf" in c]
    assert len(shaped) == 2 and all(c[c.index("rate") + 1] == "100mbit" for c in shaped)
    script = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).sendall(b'x' * 200000)"
    with netns.two_nodes("100mbit") as (first, second):
        assert netns.exists(first.namespace.name) and netns.exists(second.namespace.name)
        server = subprocess.Popen([*first.exec_prefix(), sys.executable, "-c",
                                   "import socket, sys; s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], "
                                   "flush=True); c, _ = s.accept(); n = 0\nwhile (b := c.recv(65536)): n += len(b)\nprint(n)",
                                   first.address], stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            before = second.sent_bytes()
            subprocess.run([*second.exec_prefix(), sys.executable, "-c", script, first.address, port], check=True, timeout=30)
            assert server.stdout.readline().strip() == "200000"
            assert second.sent_bytes() - before >= 200000
        finally:
            server.kill()
    assert not netns.exists(first.namespace.name) and not netns.exists(second.namespace.name)
