"""The whole pipeline on loopback: ``twistd -n sparkytrack`` between a sink and a fake Ingest.

Used by the end-to-end test and by ``make demo``. The SMTP sink (the upstream
"PMTA") and the fake Ingest API run in the calling process's reactor; sparkytrack
(embedded Redis, wrapper, tracker, feeder) and ``twistd etl`` run as real
subprocesses, started the way an operator starts them.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort

from sparkytwist.token import TokenCodec, new_key_spec
from tests.support.fake_ingest import FakeIngest, listen_fake_ingest
from tests.support.ports import free_port
from tests.support.processes import twistd
from tests.support.smtp_sink import SinkFactory

INGEST_KEY = "test-ingest-key"


class Pipeline:
    """Start with :meth:`start`; every resource goes through ``cleanup`` callbacks."""

    def __init__(self, cleanup: Callable[..., Any]) -> None:
        self._cleanup = cleanup
        # A short directory: the embedded Redis puts its unix socket here, where
        # `twistd etl` finds it too (a unix socket path holds at most 107 bytes).
        self.workdir = Path(tempfile.mkdtemp(prefix="sparky-e2e-"))
        cleanup(shutil.rmtree, self.workdir, ignore_errors=True)
        self.key = new_key_spec(3)
        self.codec = TokenCodec.from_specs([self.key])
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
        self.env["SPARKYTWIST_TOKEN_KEYS"] = self.key  # never on a command line
        self.ports = {name: free_port() for name in ("admin", "tracker", "wrapper")}
        self.base_url = f"http://127.0.0.1:{self.ports['tracker']}"
        self.sink = SinkFactory()
        self.ingest: FakeIngest
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, http: Any) -> None:
        """Sink, fake Ingest, then sparkytrack; returns once /healthz answers 200."""
        sink_port: IListeningPort = await TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(self.sink)
        self._cleanup(sink_port.stopListening)
        ingest_port, self.ingest = listen_fake_ingest(reactor, api_key=INGEST_KEY)
        self._cleanup(ingest_port.stopListening)
        self._cleanup(self.ingest.release_all)
        log = open(self.workdir / "sparkytrack.log", "wb")  # noqa: SIM115
        self._cleanup(log.close)
        ports = self.ports
        self.process = subprocess.Popen(
            twistd("sparkytrack", "--no-accounting",
                   "--redis-data-dir", str(self.workdir / "redis"),
                   "--admin-endpoint", f"tcp:{ports['admin']}:interface=127.0.0.1",
                   "--tracker-endpoint", f"tcp:{ports['tracker']}:interface=127.0.0.1",
                   "--wrapper-endpoint", f"tcp:{ports['wrapper']}:interface=127.0.0.1",
                   "--tracking-base-url", self.base_url,
                   "--upstream", f"127.0.0.1:{sink_port.getHost().port}",
                   "--upstream-tls", "off",
                   "--sparkpost-host", self.ingest.url, "--sparkpost-api-key", INGEST_KEY,
                   "--batch-max-age", "1s"),
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self._cleanup(self.stop)
        for _ in range(300):
            if self.process.poll() is not None:
                raise RuntimeError(f"sparkytrack exited:\n{self.log()}")
            try:
                response = await http.get(f"http://127.0.0.1:{ports['admin']}/healthz")
                await response.content()
                if response.code == 200:
                    return
            except Exception:  # not listening yet
                pass
            await task.deferLater(reactor, 0.1, lambda: None)
        raise RuntimeError(f"sparkytrack did not become healthy:\n{self.log()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    def log(self) -> str:
        return (self.workdir / "sparkytrack.log").read_text(errors="replace")

    def send(self, sender: str, rcpts: list[str], data: bytes) -> dict[str, Any]:
        """smtplib through the wrapper (blocking: call it in a thread)."""
        with smtplib.SMTP("127.0.0.1", self.ports["wrapper"], timeout=30) as client:
            return client.sendmail(sender, rcpts, data)

    def run_etl(self, lines: str) -> subprocess.CompletedProcess[bytes]:
        """``twistd -n etl`` fed ``lines`` on stdin, as PowerMTA's accounting pipe."""
        env = {**self.env,
               "SPARKYTWIST_REDIS_URL": f"unix://{self.workdir / 'redis' / 'redis.sock'}"}
        return subprocess.run(twistd("etl"), input=lines.encode(), capture_output=True,
                              env=env, cwd=self.workdir, timeout=60, check=False)


# -- the scenario both the test and the demo play --------------------------------------

GMAIL_PROXY_UA = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
                  "(via ggpht.com GoogleImageProxy)")
IPHONE_MAIL_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) "
                  "AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148")
DESKTOP_CHROME_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                     "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36")
ANDROID_CHROME_UA = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
                     "(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36")

SENDER = "bounces@sender.example"
RCPT = "fred@example.com"
LINK_A = "https://shop.example.com/sale?id=42&utm_source=mail"
LINK_B = "https://example.org/café/menü?q=a b"

ACCOUNTING = (
    "type,timeLogged,orig,rcpt,dsnStatus,dlvSourceIp,vmtaPool,jobId,"
    "header_x-sp-message-id,header_x-sp-subaccount-id\r\n"
    "d,2026-11-25 10:00:00+0000,news@sender.example,{rcpt},2.0.0 (success),192.0.2.25,"
    "pool-a,spring-sale,{msg},7\r\n"
)


def scenario_message() -> bytes:
    """A multipart/alternative newsletter: two links (one with &amp;, one non-ASCII)."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = "News <news@sender.example>"
    msg["To"] = RCPT
    msg["Subject"] = "Spring sale"
    msg.set_content("Our spring sale is on.")
    msg.add_alternative(
        "<html><head><title>Sale</title></head><body>"
        f'<p><a href="{LINK_A.replace("&", "&amp;")}">Shop now</a></p>'
        f"<p><a href='{LINK_B}'>Lunch</a> or <a href=\"mailto:help@sender.example\">"
        "write to us</a></p></body></html>", subtype="html", cte="quoted-printable")
    return msg.as_bytes()
