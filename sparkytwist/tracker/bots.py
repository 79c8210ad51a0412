# -*- test-case-name: tests.test_tracker_parts -*-
"""Who fetched it: a mail provider's image proxy, a link scanner, a crawler, or a person.

Flags (letters from :mod:`sparkytwist.trackevent`):

- ``p`` a mail provider's image proxy fetched the pixel on the reader's behalf:
  Gmail (``GoogleImageProxy``, via ggpht.com), Yahoo/AOL (``YahooMailProxy``), and
  Apple Mail Privacy Protection, whose proxy sends the bare user agent
  ``Mozilla/5.0`` and nothing else. These are real opens (Gmail fetches when the
  message is opened); Apple's are pre-fetched on delivery, which is why SparkPost
  reports ``is_proxy`` rather than hiding them.
- ``f`` prefetch: a ``HEAD`` request, or a known security scanner / link checker
  (Proofpoint, Mimecast, Barracuda, Microsoft Safe Links, ...) following the link
  before the person does.
- ``b`` a crawler by crawlerdetect's list (curl, python-requests and the like too),
  or no user agent at all; Outlook's and Thunderbird's own agents are exempted
  (crawlerdetect lists Outlook for its link previews, but its image loads are opens).
- ``h`` the hidden honeypot link was followed (decided by the token, not here).

crawlerdetect runs ~1,500 regular expressions (≈ 0.2 ms for an ordinary browser
user agent): the answer is cached per user-agent string in a bounded LRU per
instance. Mail traffic has few distinct agents, so nearly every hit is a cache hit.

:func:`apply_policy` turns flags into what gets recorded under ``bot_events``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from sparkytwist.trackevent import FLAG_BOT, FLAG_HONEYPOT, FLAG_PREFETCH, FLAG_PROXY

#: Mail providers' image proxies: their fetches are opens, flagged ``p``.
_PROXY = re.compile(r"GoogleImageProxy|YahooMailProxy|^Mozilla/5\.0$")
#: Security scanners and link checkers that fetch links ahead of the reader.
_SCANNER = re.compile(
    r"proofpoint|mimecast|barracuda|safelinks|urldefense|msoffice-linkscanner"
    r"|Microsoft-URLAnalyzer|ms-office.*scan|forcepoint|websense|ironport|trend ?micro"
    r"|symantec|bitdefender|sophos|zscaler|fortiguard|checkpoint|linkchecker"
    r"|W3C-checklink|LinkCheck|link ?validator|scanner",
    re.IGNORECASE)
#: Mail clients that crawlerdetect lists as crawlers (it means Office's link previews),
#: but whose image loads are the reader's own: never ``b``.
_MAIL_CLIENT = re.compile(r"Microsoft Outlook|Outlook-iOS|Outlook-Android|Thunderbird")
#: User agents remembered per classifier.
DEFAULT_CACHE_SIZE = 10_000

_BOT_LETTERS = FLAG_PREFETCH + FLAG_BOT + FLAG_HONEYPOT


class BotClassifier:
    """Flags for a user agent (``p``, ``f`` or ``b``), cached per agent string."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        from crawlerdetect import CrawlerDetect

        self._crawler: Any = CrawlerDetect()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def classify(self, user_agent: str) -> str:
        flags = self._cache.get(user_agent)
        if flags is not None:
            self._cache.move_to_end(user_agent)
            return flags
        self.misses += 1
        flags = self._classify(user_agent)
        if len(self._cache) >= self.cache_size:
            self._cache.popitem(last=False)
        self._cache[user_agent] = flags
        return flags

    def _classify(self, user_agent: str) -> str:
        agent = user_agent.strip()
        if _PROXY.search(agent):
            return FLAG_PROXY  # crawlerdetect calls these crawlers: they are not
        if _SCANNER.search(agent):
            return FLAG_PREFETCH
        if _MAIL_CLIENT.search(agent):
            return ""
        if not agent or self._crawler.isCrawler(agent):
            return FLAG_BOT
        return ""

    def flags(self, user_agent: str, *, head: bool = False, honeypot: bool = False) -> str:
        """All flags of one hit, in a stable order (``p``, ``f``, ``b``, ``h``)."""
        flags = self.classify(user_agent)
        if head and FLAG_PREFETCH not in flags:
            flags += FLAG_PREFETCH
        if honeypot:
            flags += FLAG_HONEYPOT
        return flags


def apply_policy(flags: str, policy: str) -> str | None:
    """The flags to record for a hit under ``bot_events``, or None: don't record it.

    - ``keep``: record every hit; only ``p`` is kept (b/f/h are not marked).
    - ``flag``: record every hit with all its flags (the default).
    - ``drop``: hits flagged b, f or h are not recorded; the rest as in ``flag``.
    ``p`` alone never drops a hit: a Gmail proxy open is a real open.
    """
    if not flags or flags == FLAG_PROXY:
        return flags
    if policy == "flag":
        return flags
    if policy == "keep":
        return FLAG_PROXY if FLAG_PROXY in flags else ""
    if any(letter in flags for letter in _BOT_LETTERS):
        return None
    return flags


class HoneypotMemory:
    """Who followed a message's hidden link: their other hits on it are a bot's too.

    Link scanners follow every link of a message, the hidden one included. Once a
    client (IP address) has taken a message's honeypot, its later hits on the same
    message within ``window`` seconds are flagged ``h``. Keyed by (IP, message) and
    not by IP alone: a scanner behind a company's gateway must not mark the people
    behind the same address. Bounded: the oldest entries go first.
    """

    def __init__(self, clock: Any, *, window: float = 600.0, capacity: int = 100_000) -> None:
        self._clock = clock
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def remember(self, ip: str, message_id: str) -> None:
        key = (ip, message_id)
        self._seen.pop(key, None)
        if len(self._seen) >= self.capacity:
            self._seen.popitem(last=False)
        self._seen[key] = self._clock.seconds() + self.window

    def caught(self, ip: str, message_id: str) -> bool:
        expires = self._seen.get((ip, message_id))
        if expires is None:
            return False
        if expires < self._clock.seconds():
            del self._seen[(ip, message_id)]
            return False
        return True
