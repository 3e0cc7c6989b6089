"""The README's Results come from the benchmark runner (issue #9): every suite of the `readme` profile
has its region, and every plot a region links to exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.report import section_names
from benchmarks.suites import resolve_profile

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_readme_suite_has_its_region():
    suites = set(resolve_profile("readme").suites)
    regions = set(section_names(README))
    assert suites - regions == set(), f"suites of the readme profile with no README region: {suites - regions}"
    assert regions - suites - {"published"} == set(), f"README regions no suite fills: {regions - suites}"


def test_every_image_the_readme_links_exists():
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert links, "the README shows no plot"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert missing == []
