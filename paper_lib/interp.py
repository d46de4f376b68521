"""Interpreting scalar features: exact top-k examples, and scoring features against known token roles.

A *feature* here is one scalar per token read one way: an adapter's activation ``a`` with positive or
negative polarity (``+a`` / ``-a``), an MLP neuron, or a random direction (the control). All populations
go through the same functions with the same k and context, so their scores are comparable.

Organism scorer: every token of an organism trace has a known role (``organism.token_roles``). A
feature's best-matching role is the most common role among its top-k tokens; precision@k is that share,
AUROC how well the feature's value separates that role from all other tokens. Classes (stated
thresholds, parameters of ``classify_features``): monosemantic if one role holds >= ``mono`` of the top-k,
broad if one *family* of roles (``ROLE_FAMILIES``) does, polysemantic otherwise. Only tokens where the
feature fires (a non-zero value) count: a sparse SAE latent that fires on 5 tokens is scored on those 5,
not on 45 zero-valued tokens that fill its top 50, and one that fires on too few is ``rare``,
unclassified. So that purity is not mistaken for meaning, each feature is also scored against readers
of the surface tokens (the token alone, the token and the one before: ``lift``, ``bigram_lift``) and
across activation quantiles, and notebooks run a shuffled-roles control; intervals resample whole units
(an adapter's two polarities).

Everything streams: a population is a ``Features`` object (names, ``blocks()`` over all tokens in order,
``rows(start, end)``), e.g. ``ActivationStore.features``, so that no [tokens x features] array is ever
held; memory is one block plus per-feature state (top-k, histograms), whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from paper_lib.statistics import bootstrap_interval

CLASSES = ("monosemantic", "broad", "polysemantic")
RARE = "rare"  # fires on too few tokens to classify: left out of the class shares and tests


class Features(Protocol):
    """Scalar features over a sequence of tokens, readable without holding them all."""

    names: list[str]

    def blocks(self) -> Iterator[np.ndarray]:
        """Every token's values ``[rows, n_features]`` (float32), in token order, a block at a time."""

    def rows(self, start: int, end: int) -> np.ndarray:
        """The values ``[end - start, n_features]`` of tokens ``start:end``."""


class ArrayFeatures:
    """Features held in an in-memory ``[tokens, F]`` array (small data and tests)."""

    def __init__(self, values: np.ndarray, names: Sequence[str], block: int = 32768) -> None:
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != len(names):
            raise ValueError(f"values {values.shape} do not match {len(names)} names")
        self.values, self.names, self.block = values, list(names), block

    def blocks(self) -> Iterator[np.ndarray]:
        for i in range(0, len(self.values), self.block):
            yield np.asarray(self.values[i : i + self.block], dtype=np.float32)

    def rows(self, start: int, end: int) -> np.ndarray:
        return np.asarray(self.values[start:end], dtype=np.float32)


class SignedFeatures:
    """Both polarities of each feature: ``F -> 2F`` features named ``name+`` and ``name-`` (``-a`` read as a
    feature of its own, as the paper does), computed block by block."""

    def __init__(self, features: Features) -> None:
        self.base = features
        self.names = [f"{n}+" for n in features.names] + [f"{n}-" for n in features.names]

    def blocks(self) -> Iterator[np.ndarray]:
        for block in self.base.blocks():
            yield np.concatenate([block, -block], axis=1)

    def rows(self, start: int, end: int) -> np.ndarray:
        values = self.base.rows(start, end)
        return np.concatenate([values, -values], axis=1)


def top_k_indices(values: np.ndarray, k: int, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per column of ``values`` ``[tokens, F]``: (values [F, k'], token indices [F, k']) in
    descending order, k' = min(k, tokens); among equal values the lower token index comes first, also at
    the k-th place (what a stable sort gives; ``argpartition`` alone picks arbitrary ties there, and float16
    stores have many). O(tokens) per column, ``block`` columns at a time to bound memory."""
    values = np.asarray(values)
    n_tokens, n_features = values.shape
    k = min(k, n_tokens)
    out_v = np.empty((n_features, k), values.dtype)
    out_i = np.empty((n_features, k), np.int64)
    if k == 0:
        return out_v, out_i
    for first in range(0, n_features, block):
        v = values[:, first : first + block]
        kth = -np.partition(-v, k - 1, axis=0)[k - 1]  # the k-th largest value of each column
        greater, equal = v > kth, v == kth
        need = k - greater.sum(0)
        chosen = greater | (equal & (np.cumsum(equal, axis=0, dtype=np.int64) <= need))
        idx = np.nonzero(chosen.T)[1].reshape(-1, k)  # exactly k per column, ascending index
        vals = np.take_along_axis(v.T, idx, axis=1)
        order = np.lexsort((idx, -vals), axis=1)  # by value descending, then index ascending
        out_i[first : first + block] = np.take_along_axis(idx, order, axis=1)
        out_v[first : first + block] = np.take_along_axis(vals, order, axis=1)
    return out_v, out_i


def top_k_streaming(chunks: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``top_k_indices`` over an array given in consecutive chunks (e.g. activation shards), holding only
    k rows per feature plus one chunk in memory. Indices are global token indices."""
    best_v = best_i = None
    offset = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32)
        v, i = top_k_indices(chunk, k)
        i = i + offset
        offset += len(chunk)
        if best_v is None:
            best_v, best_i = v, i
            continue
        v, i = np.concatenate([best_v, v], axis=1), np.concatenate([best_i, i], axis=1)
        order = np.lexsort((i, -v), axis=1)[:, :k]
        best_v, best_i = np.take_along_axis(v, order, axis=1), np.take_along_axis(i, order, axis=1)
    if best_v is None:
        raise ValueError("no chunks")
    return best_v, best_i


def top_features(features: Features, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every feature over all tokens, streamed (``top_k_streaming`` over the blocks):
    values and global token indices, ``[F, k]``."""
    return top_k_streaming(features.blocks(), k)


def feature_examples(
    features: Features,
    tokens: Any,
    decode: Any,
    top: tuple[np.ndarray, np.ndarray],
    k: int = 20,
    width: int = 8,
    columns: Sequence[int] | None = None,
    min_value: float = 0.0,
) -> list[dict[str, Any]]:
    """For each feature (``columns`` of ``features``, all by default), its top-k tokens (value >
    ``min_value``) with ±``width`` tokens of context in the same document: ``{"name", "examples":
    [{"tokens", "values", "center", "doc", "value"}]}``. ``top``: (values, indices) ``[F, >= k]`` from
    ``top_features``; ``tokens``: where token ids and documents live (an ``ActivationStore``: ``context``,
    ``token_ids``, ``document_of``); ``decode`` maps a token id to its text. Only the windows are read."""
    top_v, top_i = top
    out = []
    for f in range(len(features.names)) if columns is None else columns:
        examples = []
        for value, index in zip(top_v[f][:k], top_i[f][:k]):
            if value <= min_value:
                break
            examples.append(context_example(features, tokens, decode, int(f), int(index), width) | {"value": float(value)})
        out.append({"name": features.names[f], "examples": examples})
    return out


def context_example(features: Features, tokens: Any, decode: Any, feature: int, index: int, width: int) -> dict[str, Any]:
    """Token ``index`` with ±``width`` tokens of context in its document and the feature's values there:
    ``{"tokens", "values", "center", "doc"}``."""
    start, end = tokens.context(index, width)
    return {
        "tokens": [decode(int(t)) for t in tokens.token_ids(start, end)],
        "values": features.rows(start, end)[:, feature].astype(float).round(4).tolist(),
        "center": index - start,
        "doc": int(tokens.document_of(index)),
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (ties count half)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ordered_keys(values: np.ndarray) -> np.ndarray:
    """Each value rounded to float16, as an integer key in 0..65535 that sorts like the value (-0 and +0 share
    one key), for exact rank statistics from histograms."""
    bits = (np.asarray(values, dtype=np.float16) + np.float16(0)).view(np.uint16).astype(np.int64)  # -0 + 0 = +0
    return np.where(bits & 0x8000, 0xFFFF - bits, bits | 0x8000)


def auroc_from_histograms(positive: np.ndarray, total: np.ndarray) -> float:
    """AUROC (ties count half) from counts per ordered value (``ordered_keys``) of the positive tokens and
    of all tokens: the Mann-Whitney statistic, without any sort of the tokens."""
    positive, negative = positive.astype(np.float64), (total - positive).astype(np.float64)
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(negative) - negative
    return float((positive * (below + 0.5 * negative)).sum() / (n_pos * n_neg))


def score_against_roles(
    features: Features,
    roles: Sequence[str],
    families: Mapping[str, str],
    k: int = 50,
    histogram_bytes: int = 2**28,
    top: tuple[np.ndarray, np.ndarray] | None = None,
    tokens: tuple[np.ndarray, np.ndarray] | None = None,
    quantiles: int = 5,
    quantile_top: float = 0.1,
) -> pd.DataFrame:
    """Per feature: the most common role among its top-k tokens (``role``, ``precision``), that role's
    AUROC over all tokens, and the same for role families (``family``, ``family_precision``). Of the top-k,
    only the ``n_active`` tokens with a non-zero value count (zero means the feature did not fire; a sparse
    feature's top-k is padded with such tokens when it fires fewer than k times); none: NaN scores.

    ``tokens`` = (token ids, previous token ids; -1 at a document's start), one each per token: then
    ``identity_precision`` and ``bigram_precision`` are what a reader of the token alone, or of it and the
    token before, would score on the same top-k tokens (the mean of P(best role | token) over them), and
    ``lift`` / ``bigram_lift`` what the feature adds beyond them. ``quantile_precision``: the best role's
    share in each of ``quantiles`` equal-count bins of the feature's activating tokens (value > 0, at most
    the top ``quantile_top`` of all tokens), lowest bin first, as EleutherAI's delphi scores detection
    across activation quantiles rather than at the top alone.

    Streamed: one pass for the top-k, then the AUROCs from per-feature histograms over float16 values
    (exact for float16 stores; float32 features are ranked at float16 resolution), as many features per
    pass as ``histogram_bytes`` holds. ``roles``: one per token, in the features' token order (strings, or a
    ``pd.Categorical`` at scale); ``top``: the
    features' ``top_features`` if already computed (with at least k columns)."""
    names = list(features.names)
    if isinstance(roles, pd.Categorical):  # one small integer a token: what a large store should pass
        codes, role_names = roles.codes, np.asarray(roles.categories)
    else:
        codes, role_names = pd.factorize(np.asarray(roles), sort=True)
        role_names = np.asarray(role_names)
    fams = np.asarray([families[r] for r in role_names])
    top_v, top_i = top_features(features, k) if top is None else (top[0][:, :k], top[1][:, :k])
    if top_i.shape[1] and top_i.max() >= len(codes):
        raise ValueError(f"{len(codes)} roles for at least {top_i.max() + 1} tokens: roles must cover every token")
    rows, best = [], np.empty(len(names), np.int64)
    active = [top_i[f][top_v[f] != 0] for f in range(len(names))]  # the top-k tokens where each fired
    for f, name in enumerate(names):
        row: dict[str, Any] = {"feature": name, "n_active": len(active[f]), "auroc": float("nan")}
        if len(active[f]) == 0:
            best[f] = -1
            rows.append(row | {"role": "", "precision": float("nan"), "family": "", "family_precision": float("nan")})
            continue
        top_roles, counts = np.unique(role_names[codes[active[f]]], return_counts=True)
        role = top_roles[np.argmax(counts)]
        top_fams, fam_counts = np.unique(fams[codes[active[f]]], return_counts=True)
        best[f] = int(np.flatnonzero(role_names == role)[0])
        rows.append(
            row
            | {
                "role": str(role),
                "precision": counts.max() / len(active[f]),
                "family": str(top_fams[np.argmax(fam_counts)]),
                "family_precision": fam_counts.max() / len(active[f]),
            }
        )
    if tokens is not None:
        ids, previous = (np.asarray(a) for a in tokens)
        if len(ids) != len(codes) or len(previous) != len(codes):
            raise ValueError(f"{len(ids)} token ids and {len(previous)} previous ids for {len(codes)} roles")
        for column, context in (("identity_precision", ids), ("bigram_precision", previous.astype(np.int64) * (2**32) + ids)):
            which, rates = conditional_role_rates(context, codes, len(role_names))
            for f in range(len(names)):
                rows[f][column] = float(rates[which[active[f]], best[f]].mean()) if best[f] >= 0 else float("nan")
        for f in range(len(names)):
            rows[f]["lift"] = rows[f]["precision"] - rows[f]["identity_precision"]
            rows[f]["bigram_lift"] = rows[f]["precision"] - rows[f]["bigram_precision"]
    per_pass = max(1, histogram_bytes // (2 * 65536 * 8))
    for first in range(0, len(names), per_pass):
        group = np.arange(first, min(len(names), first + per_pass))
        total = np.zeros((len(group), 65536), np.int64)
        positive = np.zeros((len(group), 65536), np.int64)
        offset = 0
        for block in features.blocks():
            keys = ordered_keys(block[:, group])
            block_codes = codes[offset : offset + len(block)]
            offset += len(block)
            if len(block_codes) != len(block):
                raise ValueError(f"{len(codes)} roles for more tokens: roles must cover every token, in order")
            for j, f in enumerate(group):
                total[j] += np.bincount(keys[:, j], minlength=65536)
                positive[j] += np.bincount(keys[block_codes == best[f], j], minlength=65536)
        if offset != len(codes):
            raise ValueError(f"{len(codes)} roles for {offset} tokens: roles must cover every token, in order")
        for j, f in enumerate(group):
            rows[f]["auroc"] = auroc_from_histograms(positive[j], total[j])
            rows[f]["quantile_precision"] = quantile_precision(positive[j], total[j], quantiles, quantile_top)
    return pd.DataFrame(rows)


def conditional_role_rates(context: np.ndarray, codes: np.ndarray, n_roles: int) -> tuple[np.ndarray, np.ndarray]:
    """P(role | context): each token's context index ``[tokens]`` and the rates ``[contexts, n_roles]``; a
    context is any integer per token (its id, or a pair of ids packed in one integer)."""
    which, unique = pd.factorize(np.asarray(context), sort=False)
    counts = np.bincount(which * n_roles + codes, minlength=len(unique) * n_roles).reshape(len(unique), n_roles)
    return which, counts / counts.sum(1, keepdims=True)


def quantile_precision(positive: np.ndarray, total: np.ndarray, quantiles: int = 5, top: float = 0.1) -> list[float]:
    """The positive share in each of ``quantiles`` equal-count bins of the activating tokens (value > 0,
    at most the top ``top`` share of all), lowest bin first, from histograms over ``ordered_keys`` (bins
    meet at float16 resolution; a bin with no token is NaN)."""
    zero = int(ordered_keys(np.zeros(1))[0])
    rev_total, rev_positive = total[::-1][: 65535 - zero], positive[::-1][: 65535 - zero]  # keys above +0, highest first
    m = min(int(rev_total.sum()), int(top * total.sum()))
    if m == 0:
        return [float("nan")] * quantiles
    before = np.cumsum(rev_total) - rev_total
    inside = before < m
    bins = np.minimum(before * quantiles // m, quantiles - 1)
    out = []
    for q in range(quantiles - 1, -1, -1):
        chosen = inside & (bins == q)
        n = rev_total[chosen].sum()
        out.append(float(rev_positive[chosen].sum() / n) if n else float("nan"))
    return out


def classify_features(scores: pd.DataFrame, mono: float = 0.9, broad: float = 0.9, min_active: int = 1) -> pd.Series:
    """monosemantic if the best role holds >= ``mono`` of the top-k; else broad if the best family holds
    >= ``broad``; else polysemantic; ``rare`` (unclassified) if it fired on fewer than ``min_active`` of its
    top-k tokens (``n_active``, where scored)."""
    classes = np.where(
        scores["precision"] >= mono, CLASSES[0], np.where(scores["family_precision"] >= broad, CLASSES[1], CLASSES[2])
    )
    if "n_active" in scores:
        classes = np.where(scores["n_active"] < min_active, RARE, classes)
    return pd.Series(classes, index=scores.index, name="class")


def classified(scored: pd.DataFrame) -> pd.DataFrame:
    """The features with a class (not ``rare``): what shares, tests and figures are computed over."""
    return scored[scored["class"] != RARE] if "class" in scored else scored


def score_populations(
    populations: Mapping[str, Features],
    roles: Sequence[str],
    families: Mapping[str, str],
    k: int = 50,
    mono: float = 0.9,
    broad: float = 0.9,
    tops: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    tokens: tuple[np.ndarray, np.ndarray] | None = None,
    min_active: int | None = None,
) -> pd.DataFrame:
    """``score_against_roles`` and ``classify_features`` for each population (name -> features), stacked
    with a ``population`` column; ``tops``: their ``top_features`` where already computed; ``tokens``: the
    token ids and previous ids, for the identity and bigram baselines; ``min_active``: fewest firing tokens
    among the top-k to be classified (default k/5: 10 of 50), else ``rare``. ``unit``: what
    ``class_shares`` resamples, the feature itself, or for ``SignedFeatures`` the read-out both polarities
    come from."""
    min_active = max(1, k // 5) if min_active is None else min_active
    tables = []
    for population, features in populations.items():
        table = score_against_roles(features, roles, families, k=k, top=(tops or {}).get(population), tokens=tokens)
        table["class"] = classify_features(table, mono=mono, broad=broad, min_active=min_active)
        table["unit"] = table["feature"].str[:-1] if isinstance(features, SignedFeatures) else table["feature"]
        tables.append(table.assign(population=population))
    return pd.concat(tables, ignore_index=True)


def class_shares(classes: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Share of each class per population with percentile-bootstrap 95% intervals. ``classes``: columns
    population, class, and optionally ``unit``: features of one unit (an adapter's two polarities) are
    not independent, so units are resampled whole (a cluster bootstrap); without it, features are. Shares
    are of the classified features; ``rare``: how many were left out as firing too rarely."""
    rows = []
    for population, everything in classes.groupby("population", sort=False):
        group = classified(everything)
        labels = group["class"].to_numpy()
        units = group["unit"].to_numpy() if "unit" in group else np.arange(len(group))
        which, unit_names = pd.factorize(units)
        size = np.bincount(which).astype(float)
        for name in CLASSES:
            hits = np.bincount(which, weights=(labels == name).astype(float), minlength=len(unit_names))
            lo, hi = bootstrap_interval([hits, size], lambda h, s: h.sum() / s.sum(), n_resamples=n_resamples, seed=seed)
            rows.append(
                {
                    "population": population,
                    "class": name,
                    "share": (labels == name).mean(),
                    "n": len(labels),
                    "rare": len(everything) - len(group),
                    "units": len(unit_names),
                    "lo": lo,
                    "hi": hi,
                }
            )
    return pd.DataFrame(rows)


def quantile_curves(scored: pd.DataFrame) -> pd.DataFrame:
    """Per population and activation-quantile bin (1 = lowest): the median and quartiles over features of
    the best role's share in that bin (``score_against_roles``' ``quantile_precision``)."""
    rows = []
    for population, group in classified(scored).groupby("population", sort=False):
        values = np.asarray(group["quantile_precision"].tolist(), dtype=float)  # [features, bins]
        for q in range(values.shape[1]):
            column = values[:, q][np.isfinite(values[:, q])]
            if len(column):
                q25, median, q75 = np.percentile(column, [25, 50, 75])
                rows.append(dict(population=population, quantile=q + 1, median=median, q25=q25, q75=q75, n=len(column)))
    return pd.DataFrame(rows)


def adjusted_p_values(p_values: Mapping[str, float]) -> dict[str, float]:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) for a family of tests
    reported together, so that their number is accounted for."""
    from scipy.stats import false_discovery_control

    names = list(p_values)
    adjusted = false_discovery_control(np.asarray([p_values[n] for n in names], dtype=float)) if names else []
    return {n: float(a) for n, a in zip(names, adjusted)}


def compare_populations(scored: pd.DataFrame, a: str, b: str, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Population ``a`` vs ``b``: chi-square test of the class counts; for precision@k, AUROC and (where
    scored) the lifts over the token-identity and bigram baselines, the Mann-Whitney U test and the
    difference in means with a bootstrap 95% interval, over the classified (not ``rare``) features.
    ``scored``: columns population, class, precision, auroc[, lift, bigram_lift]."""
    from scipy.stats import chi2_contingency, mannwhitneyu

    scored = classified(scored)
    table = pd.crosstab(scored["population"], scored["class"]).reindex(index=[a, b], columns=list(CLASSES), fill_value=0)
    table = table.loc[:, table.sum() > 0]
    out = {"chi2_p": float(chi2_contingency(table.to_numpy())[1]) if table.shape[1] > 1 else 1.0}
    for column in [c for c in ("precision", "auroc", "lift", "bigram_lift") if c in scored]:
        va = scored.loc[scored["population"] == a, column].dropna().to_numpy()
        vb = scored.loc[scored["population"] == b, column].dropna().to_numpy()
        lo, hi = bootstrap_interval([va, vb], lambda x, y: x.mean() - y.mean(), n_resamples, seed=seed, paired=False)
        out |= {
            f"{column}_mannwhitney_p": float(mannwhitneyu(va, vb).pvalue),
            f"{column}_diff": float(va.mean() - vb.mean()),
            f"{column}_diff_lo": lo,
            f"{column}_diff_hi": hi,
        }
    return out
