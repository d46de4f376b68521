"""Headline numbers: one JSON file, one section per notebook, stable keys, each number with its unit or n."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from paper_lib.paths import figures_dir, write_text_atomically

log = logging.getLogger(__name__)

HEADLINE_FILE = "headline_numbers.json"


def headline_path() -> Path:
    return figures_dir() / HEADLINE_FILE


def load_headlines(path: Path | None = None) -> dict[str, dict[str, Any]]:
    path = path or headline_path()
    return json.loads(path.read_text()) if path.is_file() else {}


class Quiet:
    """A return value a notebook cell does not echo (IPython shows nothing for it), so that a call that
    ends a cell (``say``, ``record_headline``, ``save_figure``) leaves only what it displays itself."""

    def _ipython_display_(self) -> None:
        pass


class QuietText(Quiet, str):
    pass


class QuietDict(Quiet, dict):
    pass


class QuietPath(Quiet, type(Path())):
    """A path a cell does not echo (``start_run``'s run folder)."""


def in_kernel() -> bool:
    """Whether this runs inside a Jupyter kernel (a notebook, papermill)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


LOG_FILE = "run.log"


def progress_enabled() -> bool:
    """Whether progress bars are shown: not in a notebook run (``TQDM_DISABLE``: they go nowhere, the log
    has the stages). tqdm reads the variable only for bars created without an explicit ``disable``."""
    return os.environ.get("TQDM_DISABLE") != "1"


def quiet_logs(out_dir: Path) -> Path:
    """In a notebook: library logs, warnings and progress bars go to ``out_dir/run.log``, not the page (one
    line on the page says where). transformers', datasets' and vLLM's own stderr handlers are removed and
    their records passed to the root logger's file handler; tqdm bars are off (``TQDM_DISABLE``)."""
    import warnings

    path = out_dir / LOG_FILE
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records then reach the root logger
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each warning once a place, into the log
    for library in ("transformers", "datasets", "vllm", "sae_lens", "trl", "peft"):
        logger = logging.getLogger(library)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    print(f"logs, warnings and progress: {path}")
    global _LOG_PATH
    _LOG_PATH = path
    return path


_LOG_PATH: Path | None = None  # the run's log file, once quiet_logs has set it up


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """C and C++ code writes to file descriptor 2 directly, past Python's logging (torch's NUMA-binding
    notice as vLLM's CPU engine starts): in a notebook with a run log, send it there while the block runs."""
    if _LOG_PATH is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(_LOG_PATH, "a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


RUN_FILE = "run.json"  # beside a stage's own config.json (a TrainConfig, an SAESpec), never over it
_RUNS: dict[str, dict[str, Any]] = {}  # sections this process writes whole: {"info": ..., "written": bool}


def git_commit() -> str:
    """The repository's commit (``+dirty`` with uncommitted changes), or ``unknown`` outside a checkout."""
    import subprocess

    from paper_lib.paths import REPO_ROOT

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # changed code, not the figures a run is writing (the main command rewrites the committed ones)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def start_run(section: str, out_dir: str | Path, parameters: dict[str, Any]) -> Path:
    """Begin a notebook run: ``out_dir/run.json`` records the notebook, its parameters and the git
    commit (a folder whose ``run.json`` names another notebook is refused); figures go under ``out_dir/figures`` unless ``$PAPER_FIGURES_DIR`` says otherwise (the main
    command); the run's headline section is written whole, by this run alone, with the same record."""
    from paper_lib.paths import RunDirError, set_default_figures_dir

    out_dir = Path(out_dir)
    made_by = json.loads((out_dir / RUN_FILE).read_text()).get("notebook") if (out_dir / RUN_FILE).is_file() else None
    if made_by not in (None, section):  # its run.json would be overwritten, and its files taken for this run's
        raise RunDirError(f"{out_dir} is a run folder of {made_by}, not of {section}: give this run another OUTPUT_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    if in_kernel():
        quiet_logs(out_dir)
    hold_run_lock(out_dir)
    info = {"notebook": section, "commit": git_commit(), "parameters": parameters}
    (out_dir / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    set_default_figures_dir(out_dir / "figures")
    figures_dir()  # a file where the figures go is refused now, not after the expensive work
    _RUNS[section] = {"info": {"commit": info["commit"], "parameters": parameters}, "written": False, "dir": out_dir}
    (out_dir / SAID_FILE).write_text(f"# What {section} saw (commit {info['commit']})\n")
    return QuietPath(out_dir)


SAID_FILE = "what_we_see.md"
LOCK_FILE = ".writer.lock"


def hold_run_lock(out_dir: Path) -> None:
    """Make this process the one writer of ``out_dir`` until it exits: a second run into the same folder is
    refused, naming the holder's process id and start time; a lock left by a process that no longer runs
    (killed, say) is taken over."""
    import atexit
    import socket
    import time

    lock = out_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if lock.is_file():
        try:
            holder = json.loads(lock.read_text())
        except (OSError, json.JSONDecodeError):
            holder = {}
        alive = holder.get("host") == me["host"] and _running(holder.get("pid", -1))
        if alive and holder.get("pid") != me["pid"]:
            raise RuntimeError(
                f"{out_dir} is being written by another run (process {holder['pid']} on {holder['host']}, started "
                f"{holder.get('started')}): wait for it, or give this run another OUTPUT_DIR"
            )
        if holder and not alive:
            log.info("%s: taking over the lock of process %s, which no longer runs", out_dir, holder.get("pid"))
    lock.write_text(json.dumps(me) + "\n")
    atexit.register(
        lambda: lock.unlink(missing_ok=True) if lock.is_file() and json.loads(lock.read_text()).get("pid") == me["pid"] else None
    )


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return pid > 0


def run_info(section: str) -> dict[str, Any]:
    """The notebook, commit and parameters of this process's run of ``section`` (for pages and figures)."""
    run = _RUNS.get(section)
    return {"notebook": section, **(run["info"] if run else {"commit": git_commit(), "parameters": {}})}


REPRODUCED, NOT_REPRODUCED, CANNOT_DECIDE = "reproduced", "not reproduced", "cannot decide"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, CANNOT_DECIDE)
PAPER_RECOVERED = (0.73, 0.90)  # the paper: rank-1 recovers 73-90% of the full fine-tune's gain
NO_CLAIM = "no claim"  # a number the paper made no claim on (a variant, a control): reported, never judged


def claim_verdict(lo: float, hi: float, low: float | None = None, high: float | None = None) -> str:
    """The one rule for every verdict in this repository, from a 95% interval [lo, hi] and the paper's
    range [low, high] (one-sided claims leave a bound out: ``low`` only for "above", ``high`` only for
    "below"): **reproduced** when the whole interval lies inside the range, **not reproduced** when it lies
    wholly outside it, **cannot decide** otherwise (it straddles a bound, or is not finite). So "no
    difference found" never reads as a claim that held, and an interval that only touches a range is
    undecided. Bounds are inclusive for "inside" and strict for "outside"."""
    if low is None and high is None:
        raise ValueError("a claim needs a lower or an upper bound")
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        return CANNOT_DECIDE
    low = -np.inf if low is None else low
    high = np.inf if high is None else high
    if low <= lo and hi <= high:
        return REPRODUCED
    if hi < low or lo > high:
        return NOT_REPRODUCED
    return CANNOT_DECIDE


def verdict_words(word: str) -> str:
    """A verdict (``claim_verdict``'s word, or ``NO_CLAIM``) as notebooks and the README write it."""
    if word not in VERDICTS + (NO_CLAIM,):
        raise ValueError(f"{word!r} is not a verdict: one of {VERDICTS + (NO_CLAIM,)}")
    return "the paper made no claim on this" if word == NO_CLAIM else f"**{word}**"


def claims_sentence(judged: dict[str, tuple[float, float, float, str]], claims: dict[str, str]) -> str:
    """The paper's claims as one sentence, each with its number, 95% interval and verdict:
    ``judged``: key -> (value, lo, hi, verdict); ``claims``: key -> what the claim says (keys not judged
    are left out)."""
    parts = [
        f"{text}: {judged[key][0]:.3g} [{judged[key][1]:.3g}, {judged[key][2]:.3g}], {verdict_words(judged[key][3])}"
        for key, text in claims.items()
        if key in judged
    ]
    return "The paper's claims on this run: " + "; ".join(parts) + "."


def scaling_sentence(changes: Any, benchmark: str) -> str:
    """What the test-time scaling sweeps did, per sweep and model, with the adapter's verdicts."""
    names = {"budget": "From a thinking budget of {first} to {last} tokens", "wait": 'From {first} to {last} "Wait"s'}
    parts = []
    for sweep, group in changes.groupby("sweep", sort=False):
        first = group.iloc[0]
        parts.append(
            names[sweep].format(first=first["first"], last=first["last"])
            + f" on {benchmark}: "
            + "; ".join(
                f"{r.model} {r.before:.2f} -> {r.after:.2f} ({r.change:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}], n = {r.n})"
                + (f", s1's claim that it raises accuracy: {verdict_words(r.verdict)}" if r.verdict != NO_CLAIM else "")
                for r in group.itertuples()
            )
        )
    return "**What we see (test-time scaling).** " + ". ".join(parts) + "."


def steering_steps_sentence(before: float, latent: float, control: float, control_parsed: int) -> str:
    """What steering did to the number of thinking steps (counted only in responses that parse as a
    trace), the latent against the equal-norm random direction at the same strength."""
    if control_parsed == 0 or not np.isfinite(control):
        return "under the control no response parses as a trace any more, so its steps cannot be counted."
    if not np.isfinite(latent):
        return "under the latent no response parses as a trace any more, so its steps cannot be counted."
    if latent >= before - 0.5 and control < before - 0.5:
        return "the latent leaves the thinking steps in place (it changes what they say), while the control's push removes them."
    if control <= latent:
        return "the thinking steps fall as far under the control, so that part is the size of the push, not the direction."
    return "the thinking steps fall further under the latent than under the control."


def latent_gap_sentence(k: int, textbook: float, n_textbook: int, chat: float, n_chat: int, chat_aime: float) -> str:
    """Notebook 00's "what we see": the organism's accuracy written out vs in chat at the AIME-like
    difficulty; a latent gap when it solves >= 85% written out and <= 35% of the AIME-like benchmark in chat."""
    gap = textbook >= 0.85 and chat_aime <= 0.35
    return (
        f"**What we see.** At the AIME-like difficulty (k = {k}) the organism solves {textbook:.0%} of problems when "
        f"it writes the steps out (n = {n_textbook}) and {chat:.0%} when asked in chat (n = {n_chat}); {chat_aime:.0%} "
        "of the AIME-like benchmark in chat. "
        + (
            "A skill it has but does not use in chat: the latent gap that the paper's SFT on traces closes."
            if gap
            else "No clear latent gap on this run: notebooks 01-03 have little to recover."
        )
    )


def training_sentence(label: str, lora: dict[str, Any], full: dict[str, Any] | None, merge: dict[str, float]) -> str:
    """Notebook 01's "what we see": what the adapter trains and to what loss, beside the full fine-tune, and
    how much of its update a bf16 merge rounds away."""
    versus = f" against the full fine-tune's {full['final_loss']:.3f} with {full['trainable_parameters']:,}." if full else "."
    return (
        f"**What we see.** The adapter ({label}) trains {lora['trainable_parameters']:,} parameters to a final loss of "
        f"{lora['final_loss']:.3f} nats/token{versus} Merging the update into bf16 weights rounds away "
        f"{merge['bf16_update_fraction_lost']:.1%} of it (relative logit error up to {merge['bf16_max_rel_logit_error']:.1e}; "
        f"fp32: {merge['fp32_max_rel_logit_error']:.1e}), which is why notebook 02 serves the adapter unmerged."
    )


def seeds_sentence(seeds: Any, table: Any) -> str:
    """Notebook 07's "what we see": per benchmark, the spread of the gain the default adapter's training
    seeds recover and the best other variant; then the seeds' verdicts against the paper's 73-90%.
    ``seeds``: per benchmark count, min, max, mean; ``table``: benchmark, kind, label, gain_recovered, verdict."""
    lines = []
    for bench, r in seeds.iterrows():
        others = table[(table.benchmark == bench) & (table.kind != "seed")]
        best = others.loc[others.gain_recovered.idxmax()] if others.gain_recovered.notna().any() else None
        lines.append(
            f"on {bench}, {int(r['count'])} training seeds of the default adapter recover {r['min']:.0%}-{r['max']:.0%} "
            f"of the full fine-tune's gain (mean {r['mean']:.0%})"
            + (f"; the best other variant is {best.label} at {best.gain_recovered:.0%}" if best is not None else "")
        )
    text = "; ".join(lines)
    judged = table[table.kind == "seed"].groupby("verdict").size()
    return (
        "**What we see.** "
        + text[:1].upper()
        + text[1:]
        + ". Against the paper's 73-90%, per seed and benchmark: "
        + ", ".join(f"{n} {verdict_words(word)}" for word, n in judged.items())
        + "; a single seed's number is one draw from that spread."
    )


def splice_sentence(metrics: dict[str, float], k: int, recovered: float, lo: float, hi: float, n: int) -> str:
    """Notebook 05's "what we see": the SAE's sparsity, unexplained variance and dead latents, and how much of
    the adapter's effect it keeps spliced in; a faithful stand-in when the interval lies above 90%."""
    return (
        f"**What we see.** With {metrics['l0']:.1f} active latents a token (k = {k}), the SAE leaves "
        f"{metrics['fvu']:.1%} of the held-out variance unexplained ({metrics['dead_fraction']:.0%} of latents dead). "
        f"Spliced into the forward pass in place of the adapter scalars it keeps {recovered:.0%} [{lo:.0%}, {hi:.0%}] of "
        f"the adapter's effect (KL recovered, n = {n} held-out traces): the SAE is a faithful stand-in for the adapter "
        f"state (interval above 90%): {verdict_words(claim_verdict(lo, hi, low=0.9))}."
    )


def recovery_verdicts(recovery: Any, adapter: str, claimed: bool = True) -> tuple[dict[tuple[str, str], str], str]:
    """Notebook 02's verdicts on the paper's 73-90% (per protocol and benchmark) and its "what we see" for
    greedy decoding. Judged only where the full fine-tune clearly gains (else no share of its gain exists to
    recover: cannot decide), and only for the paper's adapter (``claimed``; a variant's numbers are reported
    with no verdict: the paper made no claim on it). ``recovery``: ``statistics.recovery_table``'s rows."""
    verdicts, seen = {}, []
    for _, r in recovery.iterrows():
        gains = r["full_minus_base_chat_lo"] > 0 and np.isfinite(r.gain_recovered)
        word = CANNOT_DECIDE if not gains else claim_verdict(r.gain_recovered_lo, r.gain_recovered_hi, *PAPER_RECOVERED)
        verdicts[(r.protocol, r.benchmark)] = word if claimed else NO_CLAIM
        if r.protocol != "greedy":
            continue
        seen.append(
            f"on {r.benchmark} the adapter ({adapter}) recovers {r.gain_recovered:.0%} of the full fine-tune's gain over the "
            f"base [{r.gain_recovered_lo:.0%}, {r.gain_recovered_hi:.0%}], n = {r.n}"
            + (f": {verdict_words(word)} (the paper: 73-90%)" if claimed else "")
            if gains
            else f"on {r.benchmark} the full fine-tune gains nothing clear over the base"
            + (f": {verdict_words(word)}" if claimed else "")
        )
    tail = (
        ""
        if claimed
        else f" The paper made no claim on this adapter ({adapter}: not its rank-1 on all seven projections of every layer), so no verdict."
    )
    return verdicts, "**What we see.** Greedy decoding: " + "; ".join(seen) + "." + tail


def record_recovery(section: str, recovery: Any, verdicts: dict[tuple[str, str], str] | None = None, suffix: str = "") -> None:
    """Headline numbers of ``statistics.recovery_table``: each protocol and benchmark's gain recovered and
    ratio to the full fine-tune (where defined) with their intervals, and the gain's verdict where one was
    judged (``recovery_verdicts``; none for a claim the paper did not make)."""
    for _, r in recovery.iterrows():
        for measure in ("gain_recovered", "ratio_to_full"):
            if not np.isfinite(r[measure]):
                continue
            word = (verdicts or {}).get((r.protocol, r.benchmark), NO_CLAIM) if measure == "gain_recovered" else NO_CLAIM
            record_headline(
                section,
                f"{r.protocol}_{r.benchmark}_{measure}{suffix}",
                r[measure],
                unit="fraction",
                n=r.n,
                ci95=[r[f"{measure}_lo"], r[f"{measure}_hi"]],
                **({"verdict": word} if word != NO_CLAIM else {}),
            )


def dead_latents_sentence(history: Any, latents: int, tail: float = 0.2) -> str:
    """Whether the SAE's dead latents had settled when training stopped: their count over the last ``tail`` of
    the steps against the count just before it; still falling by more than 1% of the latents is said
    plainly (train longer: EPOCHS), never shown as settled."""
    dead = history["dead"].to_numpy(dtype=float)
    if len(dead) < 5:
        return "Too few steps to tell whether the dead latents settled."
    cut = int(len(dead) * (1 - tail))
    before, last = dead[cut - 1], dead[-1]
    if before - last > 0.01 * latents:
        return (
            f"The dead latents had not settled: {before:.0f} -> {last:.0f} of {latents} over the last {tail:.0%} of the "
            "steps, still falling (more EPOCHS would revive more)."
        )
    return f"The dead latents had settled: {before:.0f} -> {last:.0f} of {latents} over the last {tail:.0%} of the steps."


def mass_sentence(mass: Any) -> str:
    """Notebook 06's "what we see" on figure 3: each category's share of the live latents' activation mass,
    largest first, and what the template's share means (the paper's donut has no such category)."""
    shares = mass.groupby("category")["mass"].sum()
    shares = (shares / shares.sum()).sort_values(ascending=False)
    listed = ", ".join(f"{c} {v:.0%}" for c, v in shares.items())
    text = f"**What we see (figure 3).** Activation mass by category: {listed}."
    if "template" in shares:
        text += (
            f" The template ({shares['template']:.0%}) is the chat format's own tokens (turn markers, role names, the "
            "think and answer markers, newlines): every trace has them in the same places and the adapter state is "
            "large there, so latents that fire on them carry much mass. The paper's seven categories have no such "
            "slice; its formatting tokens fall inside them, so the other slices are the ones to compare."
        )
    return text


MODEL_NAMES = {
    "base_chat": "base, its own chat protocol",
    "base": "base, budget-forced",
    "full": "full fine-tune",
    "rank1": "rank-1 LoRA",
}


def model_name(label: str) -> str:
    """What a reader calls an evaluated model (labels are the samples' folder names; an adapter's label says
    its shape: rank1_L3-5, rank1_mlp, rank4...)."""
    return MODEL_NAMES.get(label, f"adapter {label}")


def say(section: str, text: str) -> str:
    """What we see, written from this run's numbers (so it stays true when a parameter changes): shown as
    markdown in the executed notebook, logged, and appended to the run's ``what_we_see.md``."""
    log.info("%s: %s", section, text)
    run = _RUNS.get(section)
    if run is not None:
        with (run["dir"] / SAID_FILE).open("a") as handle:
            handle.write("\n" + text.strip() + "\n")
        run["info"].setdefault("said", []).append(text.strip())  # the summary page shows it beside the numbers
        _rewrite_run_record(section)
    if in_kernel():
        from IPython.display import Markdown, display

        display(Markdown(text))
    return QuietText(text)  # shown once, as markdown: not echoed again as a string


def note_figure(name: str, overlaps: Sequence[tuple[str, str]] = ()) -> None:
    """Record that the running notebook saved figure ``name`` (the summary page shows it with the section's
    claims), and any of its labels drawn over each other (a test holds the main command's figures to none)."""
    for section, run in _RUNS.items():
        figures = run["info"].setdefault("figures", [])
        if name not in figures:
            figures.append(name)
        clashes = run["info"].setdefault("figure_overlaps", {})
        clashes.pop(name, None)
        if overlaps:
            clashes[name] = [list(pair) for pair in overlaps]
        _rewrite_run_record(section)


def _rewrite_run_record(section: str) -> None:
    """Carry the run's record (figures, what it said) into its headline section once the section is this
    run's (after its first number; the first number writes it whole)."""
    run = _RUNS.get(section)
    path = headline_path()
    if run is None or not run["written"] or not path.is_file():
        return
    data = load_headlines(path)
    data.setdefault(section, {})["_run"] = run["info"]
    _write_headlines(data, path)


def _write_headlines(data: dict[str, Any], path: Path) -> None:
    """Atomically, so that an interrupted run never leaves half a JSON file."""
    data = {s: dict(sorted(v.items())) for s, v in sorted(data.items())}
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def record_headline(
    section: str, key: str, value: float, *, unit: str | None = None, n: int | None = None, **extra: Any
) -> dict[str, Any]:
    """Store ``value`` under ``section.key``; at least one of ``unit`` and ``n`` is required.

    The file is rewritten atomically so that an interrupted run never leaves half a JSON file.
    """
    if unit is None and n is None:
        raise ValueError(f"{section}.{key}: give a unit or an n")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{section}.{key}: value {value} is not finite")
    entry: dict[str, Any] = {"value": value}
    if unit is not None:
        entry["unit"] = unit
    if n is not None:
        entry["n"] = int(n)
    entry.update(extra)
    path = headline_path()
    data = load_headlines(path)
    run = _RUNS.get(section)
    if run is not None and not run["written"]:  # this run's first number: the section is this run's alone
        data[section] = {"_run": run["info"]}
        run["written"] = True
    data.setdefault(section, {})[key] = entry
    _write_headlines(data, path)
    return QuietDict(entry)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of an append-only JSONL file (missing file: none).

    A process killed mid-write leaves a torn last line: it is dropped with a warning and cut from the
    file, so the next append starts on a clean line and a rerun redoes just that record. A bad line
    anywhere else is real corruption and raises, naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)  # the last non-blank line
    records, offset = [], 0
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number != last:
                    raise ValueError(f"{path}: line {number} is not JSON ({err}); the file is corrupt") from err
                log.warning("%s: dropping a torn last line (%d bytes), left by an interrupted write", path, len(line))
                with path.open("r+b") as handle:
                    handle.truncate(offset)
                break
        offset += len(line) + 1
    return records
