"""Settings: sources and their precedence, validation with one clear line, the sample ini."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.config import ConfigError, Settings, load_settings, sample_ini
from sparkytwist.token import new_key_spec
from tests.support.processes import twistd

ROOT = Path(__file__).parent.parent


class SourcesTests(SynchronousTestCase):
    def ini(self, text: str) -> str:
        path = self.mktemp()
        Path(path).write_text(text)
        return path

    def test_defaults(self) -> None:
        s = load_settings(None, {}, {})
        self.assertEqual(s, Settings())
        self.assertEqual(s.acct_ttl, 10 * 86400)
        self.assertEqual(s.wrapper_endpoint, "tcp:5587:interface=127.0.0.1")
        self.assertTrue(s.enabled("feeder"))

    def test_precedence_ini_env_cli(self) -> None:
        path = self.ini("[tracker]\nbot_events = keep\nroot_redirect = https://ini.example\n"
                        "per_ip_burst = 7\n")
        env = {"SPARKYTWIST_BOT_EVENTS": "drop", "SPARKYTWIST_ROOT_REDIRECT": "https://env.example"}
        s = load_settings(path, env, {"root_redirect": "https://cli.example"})
        self.assertEqual(s.per_ip_burst, 7)  # ini only
        self.assertEqual(s.bot_events, "drop")  # env beats ini
        self.assertEqual(s.root_redirect, "https://cli.example")  # cli beats env

    def test_section_keys_short_and_long(self) -> None:
        path = self.ini("[wrapper]\nenabled = false\n[redis]\nurl = redis://h:1/2\n"
                        "redis_timeout = 500ms\n[feeder]\nbatch_max_bytes = 1MB\n")
        s = load_settings(path, {}, {})
        self.assertFalse(s.wrapper_enabled)
        self.assertEqual(s.redis_url, "redis://h:1/2")
        self.assertEqual(s.redis_timeout, 0.5)
        self.assertEqual(s.batch_max_bytes, 1_000_000)

    def test_go_compatible_environment(self) -> None:
        s = load_settings(None, {"SPARKPOST_API_KEY_INGEST": "k3y",
                                 "SPARKPOST_HOST_INGEST": "api.eu.sparkpost.com"}, {})
        self.assertEqual((s.sparkpost_api_key, s.sparkpost_host), ("k3y", "api.eu.sparkpost.com"))

    def test_secrets_never_shown(self) -> None:
        key = new_key_spec()
        s = load_settings(None, {"SPARKPOST_API_KEY_INGEST": "sekrit"}, {"token_keys": key})
        self.assertNotIn("sekrit", repr(s))
        self.assertNotIn(key.split(":")[1], repr(s))
        self.assertEqual(s.loggable()["sparkpost_api_key"], "***")

    def test_lists_and_durations(self) -> None:
        s = load_settings(None, {}, {"trusted_proxies": "10.0.0.0/8, 192.168.1.1",
                                     "acct_ttl": "2d", "claim_idle": "90s"})
        self.assertEqual(s.trusted_proxies, ("10.0.0.0/8", "192.168.1.1"))
        self.assertEqual((s.acct_ttl, s.claim_idle), (172800.0, 90.0))


class ValidationTests(SynchronousTestCase):
    def assertRejected(self, reason: str, config: str | None = None,
                       env: dict[str, str] | None = None, **cli: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_settings(config, env or {}, cli)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(reason, message)

    def test_unknown_key(self) -> None:
        path = self.mktemp()
        Path(path).write_text("[tracker]\nbogus = 1\n")
        self.assertRejected("tracker.bogus: unknown setting", path)

    def test_unknown_section(self) -> None:
        path = self.mktemp()
        Path(path).write_text("[trackers]\nenabled = 1\n")
        self.assertRejected("unknown section [trackers]", path)

    def test_unknown_env(self) -> None:
        self.assertRejected("SPARKYTWIST_BOGUS: unknown setting", env={"SPARKYTWIST_BOGUS": "1"})

    def test_port_out_of_range(self) -> None:
        self.assertRejected("tracker_endpoint: must be between 0 and 65535, got 70000",
                            tracker_endpoint="tcp:70000")
        self.assertRejected("upstream: must be between 1 and 65535", upstream="mx:0")

    def test_malformed_token_key(self) -> None:
        self.assertRejected("token_keys: key 1 has 16 bytes", token_keys="1:" + "A" * 22)

    def test_unreadable_cert(self) -> None:
        self.assertRejected("tls_cert: cannot read '/nonexistent/cert.pem'",
                            tls_cert="/nonexistent/cert.pem", tls_key="/nonexistent/key.pem")
        self.assertRejected("cannot read '/no/key.pem'",
                            tracker_endpoint="ssl:8443:privateKey=/no/key.pem")

    def test_bad_values_name_the_setting(self) -> None:
        self.assertRejected("bot_events: must be one of keep, flag, drop", bot_events="maybe")
        self.assertRejected("accept_legacy_tokens: expected true or false",
                            accept_legacy_tokens="perhaps")
        self.assertRejected("acct_ttl: expected a duration", acct_ttl="ten days")
        self.assertRejected("redis_url: expected a redis://", redis_url="http://x")
        self.assertRejected("trusted_proxies: '10.0.0.300' is not", trusted_proxies="10.0.0.300")
        self.assertRejected("batch_max_bytes: must be between", batch_max_bytes="6MB")

    def test_cross_checks(self) -> None:
        cert = self.mktemp()
        Path(cert).write_text("x")
        self.assertRejected("tls_cert and tls_key must be given together", tls_cert=cert)
        self.assertRejected("webhook_url: sink = webhook needs", sink="webhook")

    def test_twistd_exits_with_one_line(self) -> None:
        """What an operator sees: a single line naming the setting, and a failing exit."""
        result = subprocess.run(
            twistd("sparkytrack", "--tracker-endpoint", "tcp:99999"),
            capture_output=True, text=True, timeout=60, cwd=self.mktemp_dir(), check=False,
            env={**os.environ, "SPARKYTWIST_REDIS_URL": "redis://127.0.0.1:1"},
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip().splitlines(),
                         ["sparkytrack: tracker_endpoint: must be between 0 and 65535, "
                          "got 99999 (from --tracker-endpoint)"])

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path


class SampleIniTests(SynchronousTestCase):
    def test_etc_sample_documents_every_setting(self) -> None:
        """etc/sparkytrack.ini is generated from the declaration; it must not drift."""
        self.assertEqual((ROOT / "etc" / "sparkytrack.ini").read_text(), sample_ini())

    def test_sample_loads_when_uncommented(self) -> None:
        setting_line = re.compile(r"^# [a-z_]+ = ")
        lines = [line[2:] if setting_line.match(line) else line
                 for line in sample_ini().splitlines()]
        path = self.mktemp()
        Path(path).write_text("\n".join(lines))
        self.assertEqual(load_settings(path, {}, {}), Settings())
