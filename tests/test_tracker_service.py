"""The tracker part in `twistd sparkytrack`: several worker processes on one port."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.config import Settings
from sparkytwist.listen import parse_tcp_endpoint
from sparkytwist.tracker.resource import PIXEL
from sparkytwist.workers import worker_admin, worker_environment
from tests.support.http import get_status, wait_for_status
from tests.support.ports import free_port
from tests.support.processes import twistd
from tests.test_tracker import KEY, token


def fetch(port: int, path: str) -> tuple[int, bytes, str]:
    """(status, body, serving pid) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("X-Sparky-Worker") or ""
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in \
        Path(f"/proc/{pid}/status").read_text().lower()


class HelpersTests(SynchronousTestCase):
    def test_each_worker_gets_its_own_admin_port(self) -> None:
        settings = Settings(tracker_workers=3, wrapper_workers=2,
                            admin_endpoint="tcp:9108:interface=127.0.0.1")
        self.assertEqual([worker_admin(settings, "tracker", n) for n in (1, 2)],
                         [{"admin_endpoint": "tcp:9109:interface=127.0.0.1"},
                          {"admin_endpoint": "tcp:9110:interface=127.0.0.1"}])
        self.assertEqual(worker_admin(settings, "wrapper", 1),
                         {"admin_endpoint": "tcp:9111:interface=127.0.0.1"})
        off = Settings(admin_enabled=False)
        self.assertEqual(worker_admin(off, "tracker", 1), {"admin_enabled": "false"})

    def test_parse_tcp_endpoint(self) -> None:
        self.assertEqual(parse_tcp_endpoint("tcp:8080:interface=127.0.0.1"),
                         ("127.0.0.1", 8080, 50))
        self.assertEqual(parse_tcp_endpoint("tcp:port=80:backlog=500"), ("", 80, 500))
        self.assertEqual(parse_tcp_endpoint("tcp6:8080:interface=\\:\\:1"), ("::1", 8080, 50))
        self.assertRaises(ValueError, parse_tcp_endpoint, "ssl:443")

    def test_worker_environment_round_trips_every_setting(self) -> None:
        from sparkytwist.config import load_settings

        settings = Settings(token_keys=(KEY,), per_ip_rate=5.0, trusted_proxies=("10.0.0.0/8",),
                            redis_timeout=0.5, sparkpost_api_key="secret")
        env = worker_environment(settings, "redis://127.0.0.1:7777/0",
                                 {"tracker_endpoint": "tcp:9999"})
        again = load_settings(None, env)
        self.assertEqual(again.redis_url, "redis://127.0.0.1:7777/0")
        self.assertEqual(again.tracker_endpoint, "tcp:9999")
        for name in ("token_keys", "per_ip_rate", "trusted_proxies", "redis_timeout",
                     "bot_events", "events_maxlen", "sparkpost_api_key"):
            self.assertEqual(getattr(again, name), getattr(settings, name), name)


class WorkersTests(SynchronousTestCase):
    def test_two_processes_serve_one_port_and_stop_together(self) -> None:
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        admin_port, port = free_port(span=2), free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
        env["SPARKY_TRACKER_WORKER_HEADER"] = "1"
        log = open(workdir / "twistd.log", "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        process = subprocess.Popen(
            twistd("sparkytrack", "--no-wrapper", "--no-feeder", "--no-accounting",
                   "--admin-endpoint", f"tcp:{admin_port}:interface=127.0.0.1",
                   "--tracker-endpoint", f"tcp:{port}:interface=127.0.0.1",
                   "--tracker-workers", "2", "--token-keys", KEY),
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        status, _ = wait_for_status(f"http://127.0.0.1:{admin_port}/healthz", 200, 20)
        self.assertEqual(status, 200, (workdir / "twistd.log").read_text())

        path = "/" + token("o").decode()
        pids: set[str] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            try:
                code, body, pid = fetch(port, path)
            except OSError:
                time.sleep(0.05)
                continue
            self.assertEqual((code, body), (200, PIXEL))
            pids.add(pid)
        output = (workdir / "twistd.log").read_text()
        self.assertEqual(len(pids), 2, output)
        self.assertIn(str(process.pid), pids)
        worker_pid = int(next(p for p in pids if p != str(process.pid)))

        # the worker has its own /metrics, on the admin port + 1, counting its own hits
        status, metrics = get_status(f"http://127.0.0.1:{admin_port + 1}/metrics")
        self.assertEqual(status, 200)
        served = re.search(rb'sparkytwist_tracker_hits_total\{outcome="served",type="open"\} '
                           rb"([0-9.]+)", metrics)
        assert served is not None, metrics
        self.assertGreater(float(served.group(1)), 0)

        # every answer is a 302 for a click, whichever process serves it
        for _ in range(20):
            code, _, _ = fetch(port, "/" + token("c", "https://example.com/").decode())
            self.assertEqual(code, 302)

        # a killed worker is replaced
        os.kill(worker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        replaced: set[str] = set()
        while not replaced and time.monotonic() < deadline:
            try:
                _, _, pid = fetch(port, path)
            except OSError:
                continue
            if pid not in (str(process.pid), str(worker_pid)):
                replaced.add(pid)
        self.assertTrue(replaced, (workdir / "twistd.log").read_text())
        new_worker = int(replaced.pop())

        process.send_signal(signal.SIGTERM)
        self.assertIn(process.wait(30), (0, -signal.SIGTERM))
        deadline = time.monotonic() + 10
        while alive(new_worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(alive(new_worker), "worker left behind")
        output = (workdir / "twistd.log").read_text()
        self.assertIn("SO_REUSEPORT", output)
        self.assertIn("tracker workers stopped", output)
