"""The shipped configuration files: they must be valid for the tools that read them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.processes import venv_script

ETC = Path(__file__).parent.parent / "etc"


class SystemdTests(SynchronousTestCase):
    def test_units_verify(self) -> None:
        """systemd-analyze verify, with ExecStart pointed at this checkout's twistd."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        units = Path(self.mktemp())
        units.mkdir()
        for unit in (ETC / "systemd").iterdir():
            text = unit.read_text().replace("/opt/sparkytwist/.venv/bin/twistd",
                                            venv_script("twistd"))
            (units / unit.name).write_text(text)
        names = [str(units / n) for n in ("sparkytrack.service", "sparkytrack-tracker@.socket",
                                          "sparkytrack-tracker@.service")]
        # A template is verified through an instance name.
        names = [n.replace("@.", "@1.") for n in names]
        for template in units.glob("*@.*"):
            (units / template.name.replace("@.", "@1.")).write_text(template.read_text())
        result = subprocess.run([analyze, "verify", *names], capture_output=True, text=True,
                                timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Unknown", result.stderr)


class SampleFilesTests(SynchronousTestCase):
    def test_grafana_dashboard_names_only_real_series(self) -> None:
        """Every sparkytwist_* series a panel queries is one the code registers."""
        dashboard = json.loads((ETC / "grafana" / "sparkytwist.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        self.assertGreater(len(exprs), 15)
        code = "\n".join(p.read_text() for p in
                         (Path(__file__).parent.parent / "sparkytwist").rglob("*.py"))
        # metrics.counter("name", "documentation", ...) and its aliases
        registered = set(re.findall(r"""\(\s*["']([a-z][a-z_]+)["'],\s*["']""", code))
        for expr in exprs:
            for series in re.findall(r"sparkytwist_([a-z_]+)", expr):
                base = re.sub(r"_(total|bucket|sum|count)$", "", series)
                self.assertIn(base, registered, f"{series} in {expr}")
