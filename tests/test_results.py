import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from paper_lib.paths import figures_dir
from paper_lib.plotting import save_figure
from paper_lib.results import headline_path, load_headlines, record_headline
from paper_lib.statistics import bootstrap_interval, wilson_interval


def test_record_headline_needs_unit_or_n_and_a_finite_value():
    with pytest.raises(ValueError, match="unit or an n"):
        record_headline("t", "x", 1.0)
    with pytest.raises(ValueError, match="not finite"):
        record_headline("t", "x", math.nan, unit="fraction")


def test_record_headline_merges_sections_and_keys():
    record_headline("t_a", "acc", 0.5, unit="fraction", n=10)
    record_headline("t_b", "minutes", 2, unit="min")
    record_headline("t_a", "acc", 0.75, unit="fraction", n=12)
    data = load_headlines()
    assert data["t_a"]["acc"] == {"value": 0.75, "unit": "fraction", "n": 12}
    assert data["t_b"]["minutes"]["value"] == 2.0
    assert json.loads(headline_path().read_text()) == data


def test_save_figure_writes_png_pdf_and_csv():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    data = pd.DataFrame({"x": [0, 1], "y": [1, 0]})
    paths = save_figure(fig, "unit_test_figure", data)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-"
    assert pd.read_csv(paths["csv"]).equals(data)
    assert paths["png"].parent == figures_dir()
    with pytest.raises(ValueError):
        save_figure(fig, "bad/name", data)


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 30)[0] == 0.0 and wilson_interval(30, 30)[1] == 1.0


def test_bootstrap_interval_covers_the_mean_and_pairs_arrays():
    import numpy as np

    x = np.r_[np.ones(60), np.zeros(40)]
    lo, hi = bootstrap_interval(x)
    assert lo < 0.6 < hi and hi - lo < 0.25
    y = x.copy()
    lo, hi = bootstrap_interval([x, y], statistic=lambda a, b: float(np.mean(a - b)))
    assert lo == hi == 0.0  # paired resampling: identical arrays differ by exactly zero


def _hand_rolled_bootstrap(arrays, statistic, n_resamples=2000, seed=0):
    """The loop every interval used before it moved onto scipy.stats.bootstrap (paired percentile, undefined
    resamples dropped): kept here as the reference the new intervals must match."""
    import numpy as np

    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
        value = statistic(*(a[idx] for a in arrays))
        if np.isfinite(value):
            stats.append(value)
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def test_bootstrap_runs_on_scipy_and_matches_the_old_intervals():
    """One helper on scipy.stats.bootstrap for every interval: where no resample is undefined it is scipy's
    percentile interval to the digit, and on the organism's kinds of data (an accuracy, a paired gain
    recovered with undefined resamples, two independent groups) it agrees with the hand-rolled loops it
    replaced within the Monte Carlo error of 2,000 resamples."""
    import numpy as np
    from scipy.stats import bootstrap

    from paper_lib.statistics import bootstrap_distribution

    rng = np.random.default_rng(7)
    acc = (rng.random(30) < 0.7).astype(float)
    ours = bootstrap_interval(acc, seed=3)
    theirs = bootstrap(
        [acc], np.mean, n_resamples=2000, method="percentile", vectorized=False, rng=np.random.default_rng(3)
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=1e-12)
    assert ours == pytest.approx(_hand_rolled_bootstrap([acc], np.mean), abs=0.04)

    # gain recovered on 30 questions, where some resamples have full == base (0/0, dropped)
    base, lora, full = ((rng.random(30) < p).astype(float) for p in (0.1, 0.3, 0.35))

    def gain(b, r, f):
        return (r.mean() - b.mean()) / (f.mean() - b.mean()) if f.mean() != b.mean() else np.nan

    ours = bootstrap_interval([base, lora, full], gain)
    old = _hand_rolled_bootstrap([base, lora, full], gain)
    scale = old[1] - old[0]
    assert np.isfinite(ours).all() and abs(ours[0] - old[0]) < 0.15 * scale and abs(ours[1] - old[1]) < 0.15 * scale
    assert len(bootstrap_distribution([base, lora, full], gain, n_resamples=500)) == 500

    # two independent groups of other sizes (compare_populations): resampled each on its own
    a, b = rng.normal(0.6, 0.1, 40), rng.normal(0.5, 0.1, 25)
    lo, hi = bootstrap_interval([a, b], lambda x, y: x.mean() - y.mean(), paired=False)
    assert lo < a.mean() - b.mean() < hi and 0.05 < hi - lo < 0.15
    with pytest.raises(ValueError, match="aligned"):
        bootstrap_interval([a, b], lambda x, y: x.mean() - y.mean())


def test_feature_page_is_self_contained_and_shows_examples(tmp_path, monkeypatch):
    import re

    from paper_lib.pages import feature_page_html, readable_token, save_html

    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path))
    features = [
        {
            "name": "L0.gate_proj+",
            "summary": "best role <step_result>",
            "examples": [{"tokens": ["3", "x", "2", "=", "6", "\n"], "values": [0, 0.1, 0.2, 0, 1.5, 0], "center": 4}],
            "histogram": {"edges": [0, 1, 2], "counts": [5, 1]},
            "logits": [["6", 1.25]],
            "tags": {"class": "monosemantic", "precision": 0.98},
        },
        {"name": "L1.q_proj-", "examples": [], "tags": {"class": "broad", "precision": 0.5}},
    ]
    page = feature_page_html(
        features, "Features", "intro", run={"notebook": "04_x", "commit": "abc123", "parameters": {"TOP_K": 50}}
    )
    path = save_html(page, "features_page")
    assert path.name == "features_page.html" and path.read_text() == page
    assert not re.search(r"(src|href)=\"?https?://", page)  # nothing fetched from the network
    assert page.count('<section id="f') == 2 and page.count("<tr data-id=") == 2
    assert "&lt;step_result&gt;" in page and "↵" in page  # escaped text, visible newlines
    assert 'class="c"' in page and "rgba(230,80,0,1.00)" in page  # the activating token, strongest colour
    assert "(no activating examples)" in page and "+1.250" in page and 'class="bar"' in page
    assert "polarity: +" in page and "polarity: -" in page  # read from the names
    assert 'data-tag="class"' in page and "<option>precision</option>" in page  # a filter and a sort key
    assert "commit abc123" in page and "TOP_K=50" in page and 'class="legend"' in page
    assert readable_token("a\tb\x00\u200b") == "a⇥b\\x00\\x200b"


def test_feature_page_sorts_and_filters_in_headless_chromium(tmp_path):
    """The page works with no server and no network: Chromium runs its script; the URL's hash filters by a
    tag and sorts by a score, and the first feature left is shown."""
    import re
    import shutil
    import subprocess

    from paper_lib.pages import feature_page_html

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium); the structure test above still runs")
    features = [
        {
            "name": f"latent {i}",
            "summary": f"feature {i}",
            "tags": {"class": "broad" if i % 2 else "monosemantic", "precision": [0.2, 0.9, 0.5, 0.7][i]},
            "examples": [{"tokens": ["a", "b", str(i)], "values": [0.0, 0.5, 1.0], "center": 2}],
        }
        for i in range(4)
    ]
    page = tmp_path / "page.html"
    page.write_text(feature_page_html(features, "Dashboard"))

    def dom(url):
        return subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout

    plain = dom(page.as_uri())
    assert 'id="f0" class="feat" style="display: block;"' in plain
    assert 'id="f1" class="feat" style="display: none;"' in plain and "4 of 4 features" in plain
    filtered = dom(page.as_uri() + "#class=broad&sort=precision&desc=1")
    assert "2 of 4 features" in filtered
    assert 'id="f1" class="feat" style="display: block;"' in filtered  # broad ones: 1 (0.9) before 3 (0.7)
    order = re.findall(r'<tr data-id="(f\d)"[^>]*style="(?:display: ?;?)?"', filtered)
    assert order == ["f1", "f3"], order


def test_a_run_writes_its_headline_section_whole_with_its_parameters(tmp_path, monkeypatch):
    """A variant run never leaves a section half default, half variant: its first number replaces the
    section, which records the run's commit and parameters."""
    from paper_lib import results

    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setattr(results, "_RUNS", {})
    results.record_headline("02_x", "old_key", 1.0, unit="u")
    results.record_headline("02_x", "shared", 1.0, unit="u")
    results.start_run("02_x", tmp_path / "run", {"MAX_TOKENS": 256})
    results.record_headline("02_x", "shared", 2.0, unit="u")
    results.record_headline("02_x", "new_key", 3.0, unit="u")
    section = results.load_headlines()["02_x"]
    assert set(section) == {"_run", "shared", "new_key"} and section["shared"]["value"] == 2.0
    assert section["_run"]["parameters"] == {"MAX_TOKENS": 256} and section["_run"]["commit"]
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    assert config["notebook"] == "02_x" and config["parameters"] == {"MAX_TOKENS": 256}


def test_without_a_figures_folder_set_a_run_writes_under_its_own_output_folder(tmp_path, monkeypatch):
    from paper_lib import paths, results

    monkeypatch.delenv("PAPER_FIGURES_DIR", raising=False)
    monkeypatch.setattr(paths, "_figures_default", None)
    monkeypatch.setattr(results, "_RUNS", {})
    assert paths.figures_dir() == paths.REPO_ROOT / "figures"
    results.start_run("03_x", tmp_path / "variant", {})
    assert paths.figures_dir() == tmp_path / "variant" / "figures"
    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path / "main"))  # the main command
    assert paths.figures_dir() == tmp_path / "main"


def test_what_we_see_is_written_from_the_run_and_kept_with_it(tmp_path, monkeypatch):
    """``say`` keeps each run's "what we see" with the run (a rerun starts the file afresh), so a variant's
    text describes the variant's numbers, not the default's."""
    from paper_lib import results

    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setattr(results, "_RUNS", {})
    results.start_run("05_x", tmp_path / "run", {})
    results.say("05_x", f"kept 42% [38%, 46%]: {results.verdict_words(results.claim_verdict(0.38, 0.46, low=0.9))}")
    text = (tmp_path / "run" / "what_we_see.md").read_text()
    assert "kept 42% [38%, 46%]: **not reproduced**" in text and text.startswith("# What 05_x saw")
    results.start_run("05_x", tmp_path / "run", {})
    results.say("05_x", f"kept 95% [92%, 97%]: {results.verdict_words(results.claim_verdict(0.92, 0.97, low=0.9))}")
    text = (tmp_path / "run" / "what_we_see.md").read_text()
    assert "42%" not in text and "**reproduced**" in text


def test_the_recovery_plot_keeps_its_axis_when_a_ratio_is_wild_or_undefined():
    """A benchmark where the full fine-tune gains nothing gives an undefined or wild ratio: it is marked,
    not drawn as a bar that squashes the others; values beyond the axis are written out."""
    import numpy as np
    import pandas as pd

    from paper_lib.plotting import RECOVERY_AXIS, plot_benchmark_accuracy

    accuracy = pd.DataFrame(
        {
            "protocol": "greedy",
            "benchmark": ["a", "b", "c"] * 3,
            "accuracy": 0.5,
            "lo": 0.4,
            "hi": 0.6,
            "n": 30,
            "model": ["base_chat"] * 3 + ["rank1"] * 3 + ["full"] * 3,
        }
    )
    recovery = pd.DataFrame(
        {
            "protocol": "greedy",
            "benchmark": ["a", "b", "c"],
            "n": 30,
            "gain_recovered": [0.8, 5.0, np.nan],
            "gain_recovered_lo": [0.6, -5.5, np.nan],
            "gain_recovered_hi": [0.95, 6.3, np.nan],
            "full_minus_base_chat": [0.3, 0.01, 0.0],
            "full_minus_base_chat_lo": [0.1, -0.05, 0.0],
            "full_minus_base_chat_hi": [0.5, 0.08, 0.0],
        }
    )
    fig = plot_benchmark_accuracy(accuracy, recovery=recovery)
    ax = fig.axes[-1]
    assert ax.get_ylim() == RECOVERY_AXIS
    from matplotlib.container import BarContainer

    heights = [p.get_height() for p in next(c for c in ax.containers if isinstance(c, BarContainer))]
    assert heights == [0.8, 0, 0]  # b (full - base not above 0) and c (undefined) draw no bar
    assert sum("undefined" in t.get_text() for t in ax.texts) == 2


def test_scaling_sweeps_are_judged_for_the_adapter_by_the_one_rule():
    import pandas as pd

    from paper_lib.evaluation import sweep_changes
    from paper_lib.results import NO_CLAIM, claim_verdict, scaling_sentence

    rows = []
    for model, rises in (("rank1", True), ("full", False)):
        for q in range(30):
            for setting, value in (("budget16", 0), ("budget64", int(rises or q % 2)), ("wait0", 1), ("wait4", int(q % 3 == 0))):
                rows.append({"model": model, "id": str(q), "setting": setting, "correct": value})
    changes = pd.concat([sweep_changes(pd.DataFrame(rows), s, 500, 0) for s in ("budget", "wait")], ignore_index=True)
    changes["verdict"] = [claim_verdict(r.lo, r.hi, low=0.0) if r.model == "rank1" else NO_CLAIM for r in changes.itertuples()]
    judged = changes.set_index(["model", "sweep"])["verdict"]
    assert judged[("rank1", "budget")] == "reproduced" and judged[("rank1", "wait")] == "not reproduced"
    assert judged[("full", "budget")] == NO_CLAIM
    text = scaling_sentence(changes, "aime24")
    assert "rank1 0.00 -> 1.00" in text and text.count("s1's claim") == 2


def test_the_donut_labels_do_not_overlap():
    """Figure 3 of a run: seven categories, some small, and 34 subcategories (the organism's roles). Its
    inner-ring labels piled on each other; the categories are now in a legend with their shares."""
    import numpy as np
    import pandas as pd

    from paper_lib.organism import ROLE_FAMILY
    from paper_lib.plotting import overlapping_labels, plot_feature_donut

    rng = np.random.default_rng(0)
    mass = pd.DataFrame(
        [{"category": family, "subcategory": role, "mass": float(rng.pareto(1.0) * 1000)} for role, family in ROLE_FAMILY.items()]
    )
    fig = plot_feature_donut(mass)
    assert overlapping_labels(fig) == []
    assert any("%" in t.get_text() for t in fig.findobj(plt.Text))  # shares, as the paper's donut


def test_the_summary_page_shows_every_claim_its_verdict_what_the_run_saw_and_its_figures(tmp_path, monkeypatch):
    """figures/index.html is made from the run's own record: the figures a notebook saved and what it said
    are kept in its headline section, so the page needs nothing else."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from paper_lib import pages, results
    from paper_lib.plotting import save_figure

    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setattr(results, "_RUNS", {})
    section = "02_evaluate_reasoning"
    results.start_run(section, tmp_path / "run", {})
    save_figure(plt.figure(), "benchmark_accuracy", pd.DataFrame({"x": [1]}))  # before the first number
    results.record_headline(section, "greedy_aime24_gain_recovered", 0.56, n=30, ci95=[0.35, 0.77], verdict="cannot decide")
    results.record_headline(section, "greedy_aime24_base_accuracy", 0.07, n=30)  # a number, not a claim
    results.say(section, "**What we see.** the adapter recovers 56%")
    save_figure(plt.figure(), "test_time_scaling", pd.DataFrame({"x": [1]}))  # after it
    page_path = pages.write_summary_page()
    page = page_path.read_text()
    assert page_path == tmp_path / "figures" / "index.html"
    assert "greedy_aime24_gain_recovered" in page and "[0.35, 0.77]" in page and "cannot decide" in page
    assert "greedy_aime24_base_accuracy" not in page  # only judged claims are listed
    assert "<b>What we see.</b> the adapter recovers 56%" in page
    assert 'src="benchmark_accuracy.png"' in page and 'src="test_time_scaling.png"' in page
    assert "02 · Evaluate reasoning" in page and "we measure how much, with intervals." in page  # its title, whole claim
    from paper_lib.paths import REPO_ROOT

    assert "figures/index.html" in (REPO_ROOT / "README.md").read_text()  # linked from the README


def test_figure_1_shows_more_than_its_strongest_cell_and_says_its_units():
    """One strong adapter (0.23 nats) set a linear colour scale and left every other cell uniformly dark;
    the single-adapter panel is on a log scale now, and every KL axis names its unit."""
    import numpy as np
    import pandas as pd
    from matplotlib.colors import LogNorm

    from paper_lib.plotting import overlapping_labels, plot_adapter_ablations

    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.uniform(1e-4, 5e-3, (7, 8)), index=["q", "k", "v", "o", "gate", "up", "down"], columns=range(8))
    table.iloc[6, 7] = 0.23
    groups = [f"layer {i}" for i in range(8)] + ["attention", "mlp"]
    summary = pd.DataFrame({"group": groups, "kl": 0.01, "lo": 0.005, "hi": 0.02})
    fig = plot_adapter_ablations(summary, table)
    heat = fig.axes[1].collections[0]
    assert isinstance(heat.norm, LogNorm)
    colours = heat.norm(table.to_numpy().ravel())
    assert np.ptp(np.sort(colours)[:-1]) > 0.3  # the other cells spread over the scale, not one dark block
    labels = [ax.get_ylabel() for ax in fig.axes] + [fig.axes[-1].get_ylabel()]
    assert sum("nats/token" in label for label in labels) >= 3 and not any(label == "KL" for label in labels)
    assert overlapping_labels(fig) == []


def test_the_notebook_page_shows_the_features_the_figure_counts_with_their_examples():
    from paper_lib.pages import features_html, pick_features

    def feature(name, cls, beyond):
        example = {"tokens": ["a", "7", ";"], "values": [0.1, 2.0, 0.0], "center": 1}
        return {"name": name, "tags": {"class": cls, "beyond": beyond}, "examples": [example] * 7}

    features = [
        feature("L1.q+", "surface", 0.99),
        feature("L2.up-", "monosemantic", 0.7),
        feature("L3.down+", "monosemantic", 0.9),
    ]
    assert [f["name"] for f in pick_features(features, 2)] == ["L3.down+", "L2.up-"]
    page = features_html(pick_features(features, 1), examples=5)
    assert "L3.down+" in page and page.count('class="c"') == 5 and "rgba(230,80,0,1.00)" in page


def test_the_role_table_counts_every_role_of_the_traces_with_its_family(organism_dir):
    from datasets import load_dataset

    from paper_lib.data import format_s1_text
    from paper_lib.organism import ROLE_FAMILY, load_organism, role_table, roles_html, token_roles

    _, tokenizer, _ = load_organism(organism_dir)
    rows = load_dataset(str(organism_dir / "s1K-1.1"), split="train").select(range(20))
    texts = [format_s1_text(tokenizer, r) for r in rows]
    table = role_table(tokenizer, texts)
    assert sum(r["tokens"] for r in table) == sum(len(token_roles(tokenizer, t)) for t in texts)
    assert all(r["family"] == ROLE_FAMILY[r["role"]] for r in table) and {"wait_word", "computed_value"} <= {
        r["role"] for r in table
    }
    page = roles_html(tokenizer, texts[0])
    assert page.count('title="') == len(token_roles(tokenizer, texts[0]))


def test_a_variant_adapter_gets_its_numbers_and_no_verdict_on_the_papers_claim():
    import pandas as pd

    from paper_lib.results import NO_CLAIM, recovery_verdicts

    recovery = pd.DataFrame(
        [
            dict(
                protocol="greedy",
                benchmark="aime24",
                gain_recovered=0.8,
                gain_recovered_lo=0.75,
                gain_recovered_hi=0.85,
                n=30,
                full_minus_base_chat_lo=0.2,
            ),
            dict(
                protocol="greedy",
                benchmark="math500",
                gain_recovered=0.3,
                gain_recovered_lo=0.2,
                gain_recovered_hi=0.4,
                n=500,
                full_minus_base_chat_lo=0.1,
            ),
        ]
    )
    verdicts, text = recovery_verdicts(recovery, "rank1")
    assert verdicts == {("greedy", "aime24"): "reproduced", ("greedy", "math500"): "not reproduced"}
    assert "**reproduced** (the paper: 73-90%)" in text
    verdicts, text = recovery_verdicts(recovery, "rank1_L3-5", claimed=False)
    assert set(verdicts.values()) == {NO_CLAIM} and "reproduced" not in text and "80%" in text
    assert "made no claim on this adapter" in text


def test_the_sae_page_says_whether_dead_latents_settled():
    import pandas as pd

    from paper_lib.results import dead_latents_sentence

    falling = pd.DataFrame({"dead": [100 - i for i in range(50)]})
    assert "had not settled" in dead_latents_sentence(falling, 400)
    flat = pd.DataFrame({"dead": [100 - i for i in range(40)] + [60] * 10})
    assert "had settled" in dead_latents_sentence(flat, 400) and "not" not in dead_latents_sentence(flat, 400)


def test_figure_3s_largest_slice_is_named_and_the_template_explained():
    import pandas as pd

    from paper_lib.results import mass_sentence

    mass = pd.DataFrame(
        {
            "category": ["template", "template", "computational operations"],
            "subcategory": ["a", "b", "c"],
            "mass": [30.0, 30.0, 40.0],
        }
    )
    text = mass_sentence(mass)
    assert "template 60%, computational operations 40%" in text and "chat format's own tokens" in text
    assert "template" not in mass_sentence(mass[mass.category != "template"])


def test_the_overlap_check_flags_piled_labels_not_parallel_rotated_ones_or_undrawn_ticks():
    from paper_lib.plotting import overlapping_labels

    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "template 40%")
    ax.text(0.52, 0.5, "values 30%")  # piled on each other, as the old donut's inner labels
    assert ("template 40%", "values 30%") in overlapping_labels(fig)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.set(xticks=[], yticks=[])
    ax.text(0.3, 0.3, "program_operator 6%", rotation=60, fontsize=10)
    ax.text(0.36, 0.3, "program_operand 4%", rotation=60, fontsize=10)  # side by side, parallel: their boxes meet
    assert overlapping_labels(fig) == []
    fig, ax = plt.subplots()
    ax.plot([0, 10_000], [0, 1])
    ax.set_xticks([-2000, 0, 5000, 10_000])  # a located tick outside the view is never drawn
    ax.set_xlim(0, 10_000)
    assert overlapping_labels(fig) == []
