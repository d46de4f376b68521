"""The README's claims table says what the run's numbers say: every verdict written in it is the verdict the
notebooks recorded beside that number (``headline_numbers.json``), by the one rule of ``results.claim_verdict``,
and every verdict a notebook recorded appears in it."""

import json
import re

from paper_lib.paths import REPO_ROOT
from paper_lib.results import VERDICTS

HEADLINES = json.loads((REPO_ROOT / "figures" / "headline_numbers.json").read_text())
README = (REPO_ROOT / "README.md").read_text()
MARKED = re.compile(r"\*\*(" + "|".join(VERDICTS) + r")\*\*\s*<!-- ([0-9a-z_]+)\.([0-9a-z_]+) -->")


def recorded_verdicts():
    return {
        (section, key): entry["verdict"]
        for section, entries in HEADLINES.items()
        for key, entry in entries.items()
        if isinstance(entry, dict) and entry.get("verdict") in VERDICTS
    }


def test_every_verdict_in_the_readme_is_the_runs():
    marked = MARKED.findall(README)
    assert marked, "the README's claims table marks no verdict"
    recorded = recorded_verdicts()
    for word, section, key in marked:
        assert (section, key) in recorded, f"README cites {section}.{key}, which the run gave no verdict"
        assert word == recorded[(section, key)], (
            f"README says {word!r} for {section}.{key}; the run says {recorded[(section, key)]!r}"
        )


def test_every_verdict_the_run_gave_is_in_the_readme():
    cited = {(section, key) for _, section, key in MARKED.findall(README)}
    assert set(recorded_verdicts()) <= cited, sorted(set(recorded_verdicts()) - cited)


def test_the_rule_is_one_rule():
    from paper_lib.results import claim_verdict

    assert claim_verdict(0.38, 0.82, 0.73, 0.90) == "cannot decide"  # only touches the range
    assert claim_verdict(0.43, 0.72, 0.73, 0.90) == "not reproduced"  # wholly below it
    assert claim_verdict(0.75, 0.88, 0.73, 0.90) == "reproduced"
    assert claim_verdict(-0.05, 0.07, -0.1, 0.1) == "reproduced"  # equivalence within a margin
    assert claim_verdict(-0.01, 0.11, low=0.0) == "cannot decide"  # no difference found is not a claim held
    assert claim_verdict(0.01, 0.11, low=0.0) == "reproduced"
    assert claim_verdict(float("nan"), 0.5, low=0.0) == "cannot decide"
