"""The PrometheusRule's alerts, checked and unit-tested by Prometheus's own promtool on synthetic
series (Debian's prometheus package ships it; CI installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (CI installs prometheus)")
PAIR = 'small="mobilenet",large="xception"'
MINUTES = 7 * 60
SUMMARY = "mobilenet agrees with xception less than the build's test figures allow."


def rules_file(tmp_path: Path) -> Path:
    """The rule groups of the PrometheusRule, as a plain Prometheus rules file."""
    resource = yaml.safe_load((ROOT / "k8s/monitoring/prometheusrule.yaml").read_text())
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": resource["spec"]["groups"]}))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_the_rules_are_valid_promql(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(rules_file(tmp_path)))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def shadow_case(agree_per_min: int, disagree_per_min: int, fires: bool) -> dict[str, object]:
    return {
        "interval": "1m",
        "input_series": [
            {
                "series": f'catdog_shadow_comparisons_total{{{PAIR},outcome="agree",pod="a"}}',
                "values": f"0+{agree_per_min}x{MINUTES}",
            },
            {
                "series": f'catdog_shadow_comparisons_total{{{PAIR},outcome="disagree",pod="a"}}',
                "values": f"0+{disagree_per_min}x{MINUTES}",
            },
            {"series": f'catdog_shadow_expected_agreement{{{PAIR},pod="a"}}', "values": f"0.95x{MINUTES}"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "7h",
                "alertname": "CatdogServeShadowAgreementLow",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "ticket", "small": "mobilenet", "large": "xception"},
                        "exp_annotations": {"summary": SUMMARY},
                    }
                ]
                if fires
                else [],
            }
        ],
    }


@pytest.mark.parametrize(
    "agree, disagree, fires",
    [(8, 2, True), (99, 1, False), (0, 0, False)],
    ids=["80 % agreement under a 95 % floor", "99 % agreement", "no comparisons"],
)
def test_shadow_agreement_alert(tmp_path: Path, agree: int, disagree: int, fires: bool) -> None:
    rules = rules_file(tmp_path)
    tests = tmp_path / "tests.yml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules.name],
                "evaluation_interval": "1m",
                "tests": [shadow_case(agree, disagree, fires)],
            }
        )
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
