"""Two simulated hosts, each a network namespace on a private /24, sharing Redis and
PostgreSQL across their links; one host's link is cut mid-job."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (
    Cluster,
    PrivatePostgres,
    elapsed,
    report_recovery,
    training_spec,
)
from tests.support import RedisServer, need, wait_for

pytestmark = pytest.mark.faults


class PasswordRedis(RedisServer):
    """A RedisServer that asks for a password: off loopback, protected mode refuses others."""

    password = secrets.token_hex(8)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.bind}:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", self.bind, "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--requirepass", self.password],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self.ping, timeout=10, what=f"redis on {self.bind}:{self.port}")

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.bind, port=self.port, password=self.password, socket_timeout=5)

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Hosts:
    """A bridge in this namespace (the services' side) and one namespace per host."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = field(default_factory=lambda: f"10.213.{secrets.randbelow(250) + 1}")
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"lrqbr{self.tag}"

    @property
    def service_address(self) -> str:
        return f"{self.subnet}.1"

    def make(self, count: int) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.service_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for index in range(count):
            namespace, outside, inside = (
                f"lrq-{self.tag}-{index}", f"lrq{self.tag}{index}h", f"lrq{self.tag}{index}n"
            )  # fmt: skip
            ip("netns", "add", namespace)
            self.namespaces.append(namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links.append(outside)
            ip("link", "set", inside, "netns", namespace)
            ip("link", "set", outside, "master", self.bridge)
            ip("link", "set", outside, "up")
            inns = ("netns", "exec", namespace, "ip")
            ip(*inns, "addr", "add", f"{self.subnet}.{10 + index}/24", "dev", inside)
            ip(*inns, "link", "set", inside, "up")
            ip(*inns, "link", "set", "lo", "up")

    def cut(self, index: int) -> None:
        ip("link", "set", self.links[index], "down")

    def remove(self) -> None:
        for namespace in self.namespaces:
            ip("netns", "del", namespace, check=False)
        for link in self.links:
            ip("link", "del", link, check=False)
        ip("link", "del", self.bridge, check=False)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        need("network namespaces need root and iproute2")
    made = Hosts()
    try:
        made.make(2)
    except subprocess.CalledProcessError as exc:
        made.remove()
        need(f"cannot make network namespaces: {exc.stderr.strip()}")
    yield made
    made.remove()


def test_cut_link_gets_the_job_reclaimed_by_the_other_host(
    hosts: Hosts,
    make_cluster: Callable[..., Cluster],
    make_private_postgres: Callable[..., PrivatePostgres],
    tmp_path: Path,
) -> None:
    # The services listen on the bridge's address only. PostgreSQL is an instance of the
    # test's own (the machine's listens on loopback): with no proxy in between, the server
    # itself sees the host vanish mid-session, as it would across a real network.
    postgres = make_private_postgres(host=hosts.service_address, clients=f"{hosts.subnet}.0/24")
    redis = PasswordRedis(tmp_path / "redis", bind=hosts.service_address)
    redis.start()
    try:
        cluster = make_cluster(postgres.url, redis.url)
        # Writing every epoch keeps a worker inside a transaction most of the time, so the cut
        # usually strands one holding the job's row lock (which the reclaim must get past).
        for index, namespace in enumerate(hosts.namespaces):
            cluster.start_worker(
                f"host{index}", netns=namespace, env={"LRQ_RECORD_EVERY_EPOCHS": "1"}
            )
        spec = training_spec("link-cut", epochs=10_000)
        job_id = cluster.submit(spec)
        job = cluster.wait_running(job_id, epochs=100)
        holder = int(job.worker.rpartition(":")[2])
        (cut,) = [i for i, w in enumerate(cluster.workers) if holder in w.pool_pids()]
        hosts.cut(cut)
        cut_time = time.monotonic()
        cut_at = cluster.job(job_id).epochs_done

        job = cluster.wait_finished(job_id, timeout=120)
        report_recovery("host link cut -> other host succeeded", elapsed(cut_time))
        assert job.attempts == 2
        assert cut_at < spec["epochs"]
        other = cluster.workers[1 - cut]
        assert int(job.worker.rpartition(":")[2]) in other.pool_pids()
        assert "'succeeded'" in other.text()
        assert "'succeeded'" not in cluster.workers[cut].text()
        cluster.assert_as_uninterrupted(job_id, spec)
    finally:
        redis.stop()
