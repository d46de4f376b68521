"""Interpreting scalar features: exact top-k examples, and scoring features against known token roles.

A *feature* here is one scalar per token read one way: an adapter's activation ``a`` with positive or
negative polarity (``+a`` / ``-a``), an MLP neuron, or a random direction (the control). All populations
go through the same functions with the same k and context, so their scores are comparable.

Organism scorer: every token of an organism trace has a known role (``organism.token_roles``). A
feature's best-matching role is the most common role among its top-k tokens; precision@k is that share,
AUROC how well the feature's value separates that role from all other tokens. Classes (stated
thresholds, parameters of ``classify_features``): monosemantic if one role holds >= ``mono`` of the top-k,
broad if one *family* of roles (``ROLE_FAMILIES``) does, polysemantic otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

CLASSES = ("monosemantic", "broad", "polysemantic")


def signed_features(values: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Both polarities of each column: ``[tokens, F] -> [tokens, 2F]``, named ``name+`` and ``name-`` (in the
    input's float dtype: float16 stores stay float16, halving memory at real scale)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"values {values.shape} do not match {len(names)} names")
    return np.concatenate([values, -values], axis=1), [f"{n}+" for n in names] + [f"{n}-" for n in names]


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


def context_window(token_index: int, doc_ids: np.ndarray, width: int) -> tuple[int, int]:
    """[start, end) of the tokens within ``width`` of ``token_index`` in the same document."""
    doc = doc_ids[token_index]
    start, end = max(0, token_index - width), min(len(doc_ids), token_index + width + 1)
    while doc_ids[start] != doc:
        start += 1
    while doc_ids[end - 1] != doc:
        end -= 1
    return start, end


def top_examples(values: Any, names: Sequence[str], token_ids: np.ndarray, doc_ids: np.ndarray,
                 decode: Any, k: int = 20, width: int = 8, min_value: float = 0.0,
                 top: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """For each feature, its top-k tokens (value > ``min_value``) with ±``width`` tokens of context:
    ``{"name", "examples": [{"tokens", "values", "center", "doc", "value"}]}``; ``decode`` maps a token
    id to its text. ``values`` is ``[tokens, F]`` or anything indexable as ``values[start:end, f]`` when
    ``top`` (values, indices ``[F, k]``, e.g. from ``top_k_streaming``) is given."""
    top_v, top_i = top if top is not None else top_k_indices(values, k)
    top_v, top_i = top_v[:, :k], top_i[:, :k]
    features = []
    for f, name in enumerate(names):
        examples = []
        for value, index in zip(top_v[f], top_i[f]):
            if value <= min_value:
                break
            start, end = context_window(int(index), doc_ids, width)
            examples.append({"tokens": [decode(int(t)) for t in token_ids[start:end]],
                             "values": np.asarray(values[start:end, f], dtype=float).round(4).tolist(),
                             "center": int(index - start), "doc": int(doc_ids[index]), "value": float(value)})
        features.append({"name": name, "examples": examples})
    return features


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (ties count half)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_against_roles(values: np.ndarray, names: Sequence[str], roles: Sequence[str], families: Mapping[str, str],
                        k: int = 50) -> pd.DataFrame:
    """Per feature: the most common role among its top-k tokens (``role``, ``precision``), that role's
    AUROC over all tokens, and the same for role families (``family``, ``family_precision``)."""
    roles = np.asarray(roles)
    fams = np.asarray([families[r] for r in roles])
    _, top_i = top_k_indices(values, k)
    rows = []
    for f, name in enumerate(names):
        top_roles, counts = np.unique(roles[top_i[f]], return_counts=True)
        role = top_roles[np.argmax(counts)]
        top_fams, fam_counts = np.unique(fams[top_i[f]], return_counts=True)
        family = top_fams[np.argmax(fam_counts)]
        rows.append({"feature": name, "role": str(role), "precision": counts.max() / top_i.shape[1],
                     "auroc": auroc(values[:, f], roles == role), "family": str(family),
                     "family_precision": fam_counts.max() / top_i.shape[1]})
    return pd.DataFrame(rows)


def classify_features(scores: pd.DataFrame, mono: float = 0.9, broad: float = 0.9) -> pd.Series:
    """monosemantic if the best role holds >= ``mono`` of the top-k; else broad if the best family holds
    >= ``broad``; else polysemantic."""
    return pd.Series(np.where(scores["precision"] >= mono, CLASSES[0],
                              np.where(scores["family_precision"] >= broad, CLASSES[1], CLASSES[2])),
                     index=scores.index, name="class")


def score_populations(populations: Mapping[str, tuple[np.ndarray, Sequence[str]]], roles: Sequence[str],
                      families: Mapping[str, str], k: int = 50, mono: float = 0.9, broad: float = 0.9) -> pd.DataFrame:
    """``score_against_roles`` and ``classify_features`` for each population (name -> (values [tokens, F],
    feature names)), stacked with a ``population`` column."""
    tables = []
    for population, (values, names) in populations.items():
        table = score_against_roles(values, names, roles, families, k=k)
        table["class"] = classify_features(table, mono=mono, broad=broad)
        tables.append(table.assign(population=population))
    return pd.concat(tables, ignore_index=True)


def class_shares(classes: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Share of each class per population with percentile-bootstrap 95% intervals (features resampled).
    ``classes``: columns population, class."""
    rng = np.random.default_rng(seed)
    rows = []
    for population, group in classes.groupby("population", sort=False):
        labels = group["class"].to_numpy()
        boot = rng.integers(0, len(labels), (n_resamples, len(labels)))
        for name in CLASSES:
            hits = labels == name
            shares = hits[boot].mean(axis=1)
            rows.append({"population": population, "class": name, "share": hits.mean(), "n": len(labels),
                         "lo": float(np.quantile(shares, 0.025)), "hi": float(np.quantile(shares, 0.975))})
    return pd.DataFrame(rows)


def compare_populations(scored: pd.DataFrame, a: str, b: str, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Population ``a`` vs ``b``: chi-square test of the class counts; for precision@k and AUROC, the
    Mann-Whitney U test and the difference in means with a bootstrap 95% interval. ``scored``: columns
    population, class, precision, auroc."""
    from scipy.stats import chi2_contingency, mannwhitneyu

    table = pd.crosstab(scored["population"], scored["class"]).reindex(index=[a, b], columns=list(CLASSES), fill_value=0)
    table = table.loc[:, table.sum() > 0]
    out = {"chi2_p": float(chi2_contingency(table.to_numpy())[1]) if table.shape[1] > 1 else 1.0}
    rng = np.random.default_rng(seed)
    for column in ("precision", "auroc"):
        va = scored.loc[scored["population"] == a, column].dropna().to_numpy()
        vb = scored.loc[scored["population"] == b, column].dropna().to_numpy()
        diffs = [rng.choice(va, len(va)).mean() - rng.choice(vb, len(vb)).mean() for _ in range(n_resamples)]
        out |= {f"{column}_mannwhitney_p": float(mannwhitneyu(va, vb).pvalue), f"{column}_diff": float(va.mean() - vb.mean()),
                f"{column}_diff_lo": float(np.quantile(diffs, 0.025)), f"{column}_diff_hi": float(np.quantile(diffs, 0.975))}
    return out
