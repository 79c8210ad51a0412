"""Tracking tokens: the documented vectors, round trips, and clean rejection of forgeries."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.token import (
    TokenCodec,
    TokenError,
    Tracking,
    decode_legacy,
    new_key_spec,
    parse_key_spec,
)

#: The key of docs/token.md's test vectors: bytes 0..63, key id 7.
VECTOR_KEY = bytes(range(64))
VECTOR_MSG = "6745c3a0aabbccddeeff"
VECTORS = [
    (("o", VECTOR_MSG, "fred@example.com", None),
     "AgfuYEZwmhob-w9AAGyuhEX9NSXd4KVxACkPDS5em7bTBmsiHskf_Ax3t1YAazINy5l1DUw2o8gMFTHOh4-5g_CfyV4ZH1cMDBx79T4"),
    (("c", VECTOR_MSG, "fred@example.com", "https://example.com/a?b=1&c=%C3%A9#top"),
     "Agf-6V7Xke0QQwtJbVf3k0HfJcBLXkmnFPrW_qXoE7PqgzBm01stIvnsDUDkIseFqv41ioj-3MPxlXkolE_7WPT5"
     "Jtu4VdbDC4_30MNepN9unuKQvek0JS8Blw4K3IkTJGBqR2aS3d4lmH_v_XIFth90cjfJsJX8-9g"),
    (("i", VECTOR_MSG, "Fred.Bloggs+news@Example.COM", None),
     "AgfjEOzzwtNywVsAtLvy7AMCRxeXIKjsyt2klk6rzG3M2WNd6eP6F3TbCXXH79IGvgyf78Uf2FfRMOrFQmrpMAtPEcQ3"
     "lt2X4sV5unTOX45bgHUi2XZmruA"),
    (("h", VECTOR_MSG, "fred@example.com", None),
     "AgcHrCE5po6ax1yphPiDqEdBYX0wQilGNTbiM1R9BTB68PhsefpBi83YzR8gAf7Gj3tKPwqeKgRm2cUJSv7DjW1pejlV"
     "ZbZFKHe_3X4"),
]
GO_GOLDEN = (
    "eJxUzLEOQiEMRuF3-WciGAaTTr4JwbaIUSKBMhnf_Ybxnv18P2Q2EBgOltb4gFDN-iTvraotfs8Lfxsc2nyml4AQdqJZ"
    "HqqlhCDXGG9wGNw3VYbK_fT-jwAAAP__f2Mg1g=="
)

message_ids = st.from_regex(r"\A[0-9a-f]{20}\Z")
rcpts = st.text(min_size=1, max_size=80)
urls = st.text(max_size=300).map(lambda s: "https://example.com/" + s)
actions = st.sampled_from(["o", "i", "c", "h", "ao", "ai", "ac"])


def codec(*kids: int, legacy: bool = False) -> TokenCodec:
    return TokenCodec([(k, bytes([k]) * 64) for k in kids], accept_legacy=legacy)


class VectorTests(SynchronousTestCase):
    def test_documented_vectors(self) -> None:
        """docs/token.md's vectors: the exact bytes other implementations must produce."""
        c = TokenCodec([(7, VECTOR_KEY)])
        for (action, msg, rcpt, url), token in VECTORS:
            self.assertEqual(c.encode(action, msg, rcpt, url), token)
            self.assertEqual(c.decode(token), Tracking(action, msg, rcpt, url))

    def test_vectors_are_in_the_docs(self) -> None:
        from pathlib import Path

        doc = (Path(__file__).parent.parent / "docs" / "token.md").read_text()
        for _, token in VECTORS:
            self.assertIn(token, doc)
        self.assertIn(base64.b64encode(VECTOR_KEY).decode(), doc)

    def test_go_golden_vector(self) -> None:
        self.assertEqual(
            decode_legacy(GO_GOLDEN),
            Tracking("c", "00000deadbeeff00d1337", "fred@thetucks.com", "https://thetucks.com"),
        )

    def test_legacy_only_when_enabled(self) -> None:
        self.assertRaises(TokenError, codec(1).decode_legacy, GO_GOLDEN)
        self.assertEqual(codec(1, legacy=True).decode_legacy(GO_GOLDEN).rcpt, "fred@thetucks.com")

    def test_header_layout(self) -> None:
        raw = base64.urlsafe_b64decode(VECTORS[0][1] + "==")
        self.assertEqual(raw[:2], b"\x02\x07")  # version 2, key id 7
        # header + 16-byte SIV tag + the JSON {"a":"o","m":...,"r":...}
        plain = b'{"a":"o","m":"6745c3a0aabbccddeeff","r":"fred@example.com"}'
        self.assertEqual(len(raw), 2 + 16 + len(plain))


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(action=actions, msg=message_ids, rcpt=rcpts, url=urls)
    def test_round_trip(self, action: str, msg: str, rcpt: str, url: str) -> None:
        c = codec(3)
        needs_url = action in ("c", "ac")
        token = c.encode(action, msg, rcpt, url if needs_url else None)
        self.assertRegex(token, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(c.decode(token), Tracking(action, msg, rcpt, url if needs_url else None))

    def test_deterministic(self) -> None:
        c = codec(3)
        self.assertEqual(c.encode("c", VECTOR_MSG, "a@b.c", "https://x/"),
                         c.encode("c", VECTOR_MSG, "a@b.c", "https://x/"))
        self.assertNotEqual(c.encode("c", VECTOR_MSG, "a@b.c", "https://x/"),
                            c.encode("c", VECTOR_MSG, "b@b.c", "https://x/"))

    def test_rotation(self) -> None:
        """The first key seals; every key in the ring opens."""
        old, new = codec(1), codec(2, 1)
        old_token = old.encode("o", VECTOR_MSG, "a@b.c")
        new_token = new.encode("o", VECTOR_MSG, "a@b.c")
        self.assertEqual(new.decode(old_token).rcpt, "a@b.c")
        self.assertEqual(base64.urlsafe_b64decode(new_token + "==")[1], 2)
        with self.assertRaises(TokenError) as caught:
            old.decode(new_token)
        self.assertIn("unknown key id 2", str(caught.exception))

    def test_click_needs_url(self) -> None:
        self.assertRaises(ValueError, codec(1).encode, "c", VECTOR_MSG, "a@b.c")
        self.assertRaises(ValueError, codec(1).encode, "x", VECTOR_MSG, "a@b.c")


class ForgeryTests(SynchronousTestCase):
    token = VECTORS[1][1]

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_any_flipped_bit_is_rejected(self, data: st.DataObject) -> None:
        raw = bytearray(base64.urlsafe_b64decode(self.token + "=="))
        bit = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
        forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        self.assertRaises(TokenError, TokenCodec([(7, VECTOR_KEY)]).decode, forged)

    def test_every_truncation_is_rejected(self) -> None:
        c = TokenCodec([(7, VECTOR_KEY)])
        for n in range(len(self.token)):
            self.assertRaises(TokenError, c.decode, self.token[:n])

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=200), st.binary(max_size=150).map(
        lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode())))
    def test_random_input_is_rejected_cleanly(self, text: str) -> None:
        c = TokenCodec([(7, VECTOR_KEY)], accept_legacy=True)
        self.assertRaises(TokenError, c.decode, text)
        self.assertRaises(TokenError, c.decode_legacy, text)

    def test_oversized_token(self) -> None:
        self.assertRaises(TokenError, codec(1).decode, "A" * 20_000)

    def test_legacy_zip_bomb_is_bounded(self) -> None:
        import zlib

        bomb = base64.urlsafe_b64encode(zlib.compress(b"{" + b" " * 10_000_000)).decode()
        self.assertRaises(TokenError, decode_legacy, bomb)


class KeySpecTests(SynchronousTestCase):
    def test_new_key_spec_parses(self) -> None:
        kid, key = parse_key_spec(new_key_spec(9))
        self.assertEqual((kid, len(key)), (9, 64))

    def test_urlsafe_base64_accepted(self) -> None:
        spec = "4:" + base64.urlsafe_b64encode(b"\xfb" * 64).decode()
        self.assertEqual(parse_key_spec(spec), (4, b"\xfb" * 64))

    def test_bad_specs(self) -> None:
        for spec, reason in [
            ("nokid", "kid:base64key"),
            ("x:" + base64.b64encode(bytes(64)).decode(), "not a number"),
            ("256:" + base64.b64encode(bytes(64)).decode(), "0 to 255"),
            ("1:" + base64.b64encode(bytes(32)).decode(), "needs 64"),
            ("1:not base64!", "not valid base64"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_key_spec(spec)
            self.assertIn(reason, str(caught.exception))
