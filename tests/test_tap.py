"""twistd plugins, the service tree, and `twistd -n sparkytrack` as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.config import describe
from sparkytwist.service import OrderedService
from tests.support.http import get_status, wait_for_status
from tests.support.ports import free_port
from tests.support.processes import twistd, venv_script


class HelpTests(SynchronousTestCase):
    def test_twistd_lists_both_plugins(self) -> None:
        out = subprocess.run([venv_script("twistd"), "--help"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        self.assertRegex(out, r"\n\s+sparkytrack\s+Engagement tracking")
        self.assertRegex(out, r"\n\s+etl\s+PowerMTA accounting")

    def test_every_setting_has_an_option_with_its_default(self) -> None:
        out = subprocess.run([venv_script("twistd"), "sparkytrack", "--help"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        flat = " ".join(out.split())
        for info in describe():
            self.assertIn(f"--{info.option}=", out)
        for part in ("wrapper", "tracker", "accounting", "feeder"):
            self.assertIn(f"--no-{part}", out)
        self.assertIn("[default: tcp:5587:interface=127.0.0.1]", flat)
        self.assertIn("[default: 127.0.0.0/8, ::1/128]", flat)

    def test_plugin_scan_imports_nothing_heavy(self) -> None:
        """twistd imports plugins before it installs a reactor: keep them light."""
        code = ("import sys; from twisted.plugin import getPlugins; "
                "from twisted.application.service import IServiceMaker; "
                "[p for p in getPlugins(IServiceMaker)]; "
                "bad = [m for m in ('txredisapi', 'twisted.internet.reactor', 'twisted.mail') "
                "if m in sys.modules]; print(bad)")
        out = subprocess.run([venv_script("python"), "-c", code], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        self.assertEqual(out.strip(), "[]")


class Recorder(Service):
    def __init__(self, name: str, log: list[str], delay: float = 0) -> None:
        self.name = name
        self.log = log
        self.delay = delay

    def startService(self) -> None:
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if not self.delay:
            self.log.append(f"stop {self.name}")
            return defer.succeed(None)
        d = task.deferLater(reactor, self.delay, self.log.append, f"stop {self.name}")
        return d.addCallback(lambda _: None)


class Exploding(Service):
    def startService(self) -> None:
        raise RuntimeError("port busy")


class OrderedServiceTests(TestCase):
    async def test_stops_in_reverse_order_one_at_a_time(self) -> None:
        log: list[str] = []
        top = OrderedService()
        Recorder("redis", log).setServiceParent(top)
        Recorder("feeder", log, delay=0.05).setServiceParent(top)
        top.startService()
        await top.stopService()
        self.assertEqual(log, ["start redis", "start feeder", "stop feeder", "stop redis"])

    def test_failed_start_stops_what_started(self) -> None:
        log: list[str] = []
        top = OrderedService()
        Recorder("redis", log).setServiceParent(top)
        Exploding().setServiceParent(top)
        self.assertRaises(RuntimeError, top.startService)
        self.assertEqual(log, ["start redis", "stop redis"])
        self.assertFalse(top.running)


class RunTests(SynchronousTestCase):
    """`twistd -n sparkytrack` with the embedded Redis, the way `make run` starts it."""

    no_mta = free_port()  # nothing listens there: "no upstream MTA"

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], Path, int]:
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        admin_port = free_port()
        log = open(workdir / "twistd.log", "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
        process = subprocess.Popen(
            twistd("sparkytrack", "--admin-endpoint", f"tcp:{admin_port}:interface=127.0.0.1",
                   "--tracker-endpoint", f"tcp:{free_port()}:interface=127.0.0.1",
                   "--wrapper-endpoint", f"tcp:{free_port()}:interface=127.0.0.1",
                   "--upstream", f"127.0.0.1:{self.no_mta}", *args),
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process, workdir, admin_port

    def test_healthz_then_clean_sigterm(self) -> None:
        process, workdir, admin_port = self.start()
        status, body = wait_for_status(f"http://127.0.0.1:{admin_port}/healthz", 200, 15)
        output = (workdir / "twistd.log").read_text()
        self.assertEqual((status, body), (200, b"ok\n"), output)
        redis_pid = int((workdir / "var" / "redis" / "redis.pid").read_text())

        status, metrics = get_status(f"http://127.0.0.1:{admin_port}/metrics")
        self.assertEqual(status, 200)
        # every part registered its series, known label values at 0 from the start
        for series in (b'sparkytwist_wrapper_messages_total{outcome="copy_refused"} 0.0',
                       b'sparkytwist_tracker_events_dropped_total{reason="rate_limit"} 0.0',
                       b'sparkytwist_tracker_hit_class_total{class="person"} 0.0'):
            self.assertIn(series, metrics)

        process.send_signal(signal.SIGTERM)
        # twistd ends by re-raising SIGTERM once it has stopped cleanly (systemd counts
        # that as a clean exit).
        self.assertIn(process.wait(20), (0, -signal.SIGTERM))
        output = (workdir / "twistd.log").read_text()
        self.assertIn("Embedded redis-server (pid", output)
        self.assertIn("admin listening on", output)
        self.assertIn("Embedded redis-server stopped", output)
        # without an MTA or an Ingest key it says what is missing, and serves the rest
        self.assertIn(f"the upstream MTA at 127.0.0.1:{self.no_mta} does not answer", output)
        self.assertIn("feeder: not started: no SparkPost API key", output)
        self.assertIn("running tracker, wrapper", output)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(Path(f"/proc/{redis_pid}").exists(), "redis-server left behind")
        self.assertTrue((workdir / "var" / "token_keys").exists())

    def test_busy_port_exits_and_leaves_no_redis(self) -> None:
        import socket

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            process, workdir, _ = self.start("--admin-endpoint",
                                             f"tcp:{port}:interface=127.0.0.1")
            self.assertNotEqual(process.wait(30), 0)
        output = (workdir / "twistd.log").read_text()
        self.assertIn(f"admin: cannot listen on tcp:{port}", output)
        pidfile = workdir / "var" / "redis" / "redis.pid"
        if pidfile.exists():
            self.assertFalse(Path(f"/proc/{int(pidfile.read_text())}").exists())
