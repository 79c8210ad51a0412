"""Say trial's last line (``PASSED (successes=N)``) as ``N passed, M failed``.

CI reads that plain form; trial's own form it does not know.
"""

from __future__ import annotations

import re
import sys


def summary(last_line: str) -> str:
    def count(kind: str) -> int:
        return sum(int(v) for v in re.findall(rf"\b{kind}=(\d+)", last_line))

    failed = count("failures") + count("errors") + count("unexpectedSuccesses")
    return f"{count('successes')} passed, {failed} failed"


if __name__ == "__main__":
    lines = sys.stdin.read().strip().splitlines()
    print(summary(lines[-1] if lines else ""))
