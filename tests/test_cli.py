"""The sparkytwist command as support staff use it."""

from __future__ import annotations

import json
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.token import TokenCodec, parse_key_spec
from tests.support.processes import venv_script
from tests.test_token import GO_GOLDEN


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_script("sparkytwist"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


class CliTests(SynchronousTestCase):
    def test_keygen(self) -> None:
        result = run("keygen", "--kid", "12")
        self.assertEqual(result.returncode, 0)
        kid, key = parse_key_spec(result.stdout.strip())
        self.assertEqual((kid, len(key)), (12, 64))

    def test_decode_a_tracking_url(self) -> None:
        spec = run("keygen").stdout.strip()
        token = TokenCodec.from_specs([spec]).encode(
            "c", "0123456789abcdef0123", "fred@example.com", "https://example.com/?a=1&b=é")
        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[token]\nkeys = {spec}\n")
        result = run("-c", ini, "token", "decode", f"https://t.example.com/{token}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {
            "event_type": "click", "action": "c", "message_id": "0123456789abcdef0123",
            "rcpt": "fred@example.com", "url": "https://example.com/?a=1&b=é"})

    def test_decode_legacy_url(self) -> None:
        result = run("token", "decode", f"https://t.example.com/tracking/click/{GO_GOLDEN}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["url"], "https://thetucks.com")

    def test_forged_token(self) -> None:
        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[token]\nkeys = {run('keygen').stdout.strip()}\n")
        result = run("-c", ini, "token", "decode", "AgfuYEZwmhob-w9AAGyuhEX9NSXd4KVxACkPDS5em7bT")
        self.assertEqual(result.returncode, 1)
        self.assertIn("not a valid token", result.stderr)

    def test_sample_config(self) -> None:
        result = run("sample-config")
        self.assertEqual(result.returncode, 0)
        self.assertIn("[wrapper]", result.stdout)
