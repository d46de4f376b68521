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

CLASSES = ("monosemantic", "surface", "broad", "polysemantic")
# monosemantic: role-pure AND it knows the role beyond the token context; surface: role-pure, but within its
# contexts it ranks the role no better than chance (a reader of the tokens under it would do as well)
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


def context_keys(ids: np.ndarray, previous: np.ndarray, width: int = 2) -> np.ndarray:
    """Each token's surface context as one integer: its id and the ``width - 1`` ids before it in its
    document (-1 beyond the document's start). ``previous`` (-1 at a document's start) marks the documents."""
    ids = np.asarray(ids, dtype=np.int64)
    if width < 1:
        raise ValueError(f"context width {width}: must be at least 1 (the token itself)")
    if width == 1:
        return pd.factorize(ids)[0].astype(np.int64)
    document = np.cumsum(np.asarray(previous) == -1) - 1
    columns = [ids]
    for shift in range(1, width):
        before = np.full(len(ids), -1, np.int64)
        before[shift:] = np.where(document[shift:] == document[:-shift], ids[:-shift], -1)
        columns.append(before)
    return np.unique(np.stack(columns, 1), axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def shuffle_within_contexts(roles: Sequence[str], context: np.ndarray, seed: int = 0) -> np.ndarray:
    """Roles permuted among the tokens that share a context (``context_keys``): what the tokens under a
    feature tell about the roles is kept exactly, anything the model's state adds is destroyed. A feature
    that only reads the surface keeps its score under it; a hidden-state detector loses it."""
    roles = np.asarray(roles)
    rng = np.random.default_rng(seed)
    shuffled = np.lexsort((rng.random(len(roles)), context))  # tokens grouped by context, random order inside
    out = np.empty_like(roles)
    out[np.argsort(context, kind="stable")] = roles[shuffled]  # each context's roles, dealt back in random order
    return out


def stratified_auroc(values: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> tuple[float, float, int]:
    """How well ``values`` rank the ``positive`` tokens above the others *within* each stratum (a context),
    pooled over strata: sum of the strata's Mann-Whitney U over the sum of their positive x negative pairs
    (ties half, at float16 resolution as everywhere here). Returns (AUROC, z, pairs): z is the pooled U's
    distance from chance in null standard deviations under permutation within strata (without the tie
    correction, so conservative); NaN when no stratum holds both kinds of token."""
    keys = np.asarray(strata, np.int64) * 65536 + ordered_keys(values)
    order = np.argsort(keys, kind="stable")
    keys, positive, strata = keys[order], np.asarray(positive, bool)[order], np.asarray(strata)[order]
    n = len(keys)
    if n == 0:
        return float("nan"), float("nan"), 0
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # tie groups (never across strata)
    size = np.diff(np.r_[first, n])
    group = np.repeat(np.arange(len(first)), size)
    stratum_first = np.flatnonzero(np.r_[True, strata[1:] != strata[:-1]])
    stratum = np.repeat(np.arange(len(stratum_first)), np.diff(np.r_[stratum_first, n]))
    rank = first[group] + (size[group] + 1) / 2 - stratum_first[stratum]  # 1-based average rank in its stratum
    n_pos = np.bincount(stratum, weights=positive, minlength=len(stratum_first))
    n_all = np.bincount(stratum, minlength=len(stratum_first)).astype(float)
    u = np.bincount(stratum, weights=rank * positive, minlength=len(stratum_first)) - n_pos * (n_pos + 1) / 2
    pairs = n_pos * (n_all - n_pos)
    total = pairs.sum()
    if total == 0:
        return float("nan"), float("nan"), 0
    variance = (pairs * (n_all + 1) / 12).sum()
    return float(u.sum() / total), float((u.sum() - total / 2) / np.sqrt(variance)), int(total)


def _cross_fit_rates(context: np.ndarray, ids: np.ndarray, half: np.ndarray, codes: np.ndarray, n_roles: int) -> Any:
    """P(role | context) for each token, estimated on the *other* half of the documents (a reader fit on
    one half, scored on the other cannot overfit rare contexts); a context unseen there backs off to the
    token id, then to the other half's role frequencies. Returns ``rates(tokens, role) -> [len(tokens)]``."""
    tables = []
    for other in (1, 0):  # rates for half h come from half 1 - h
        mask = half == other
        rates = {}
        for name, key in (("context", context), ("token", ids)):
            which, unique = pd.factorize(key[mask])
            counts = np.bincount(which * n_roles + codes[mask], minlength=len(unique) * n_roles).reshape(len(unique), n_roles)
            rates[name] = (pd.Index(unique), counts / np.maximum(counts.sum(1, keepdims=True), 1))
        marginal = np.bincount(codes[mask], minlength=n_roles) / max(int(mask.sum()), 1)
        tables.append((rates, marginal))

    def rates(tokens: np.ndarray, role: int) -> np.ndarray:
        out = np.empty(len(tokens))
        for h in (0, 1):
            chosen = tokens[half[tokens] == h]
            table, marginal = tables[h]
            value = np.full(len(chosen), marginal[role])
            for name, key in (("token", ids), ("context", context)):  # the more specific reader wins
                index, rate = table[name]
                where = index.get_indexer(key[chosen])
                value = np.where(where >= 0, rate[np.maximum(where, 0), role], value)
            out[half[tokens] == h] = value
        return out

    return rates


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
    sample_fraction: float | None = None,
    context_width: int = 2,
    seed: int = 0,
) -> pd.DataFrame:
    """Per feature: the most common role among its scored tokens (``role``, ``precision``), that role's
    AUROC over all tokens, and the same for role families (``family``, ``family_precision``).

    Scored tokens: the top-k (default), or, with ``sample_fraction``, k tokens drawn uniformly (seeded)
    from the feature's top ``sample_fraction`` of all tokens, a fixed design whose expected purity does
    not grow with the corpus as a top-k's does (delphi samples examples from activation quantiles for the
    same reason). Only tokens with a non-zero value count (zero: the feature did not fire); ``n_active``
    is how many were scored; none: NaN scores.

    ``tokens`` = (token ids, previous token ids; -1 at a document's start), one each per token. Then:
    ``identity_precision`` / ``bigram_precision`` and ``lift`` / ``bigram_lift``: what a reader of the token
    (and the one before) scores on the same tokens, in-sample, and the feature's precision above it; and the
    beyond-surface scores, over contexts of ``context_width`` tokens (the token and the ones before it):
    ``context_auroc`` (with ``context_z`` and ``context_pairs``), how well the feature ranks its role among
    tokens that share a context, pooled over contexts (``stratified_auroc``; 0.5: it knows nothing the
    tokens under it do not; NaN: its role is fixed by every context, nothing beyond the surface to know),
    computed on every token but the feature's own scored ones (they chose the role); and
    ``context_precision`` / ``context_lift``, the context reader's precision on the scored tokens when fit
    on the other half of the documents (even vs odd), and the feature's precision above it.

    ``quantile_precision``: the best role's share in each of ``quantiles`` equal-count bins of the
    feature's activating tokens (value > 0, at most the top ``quantile_top`` of all tokens), lowest first.

    Streamed: one pass for the top tokens, then the AUROCs from per-feature histograms over float16 values
    (exact for float16 stores), as many features per pass as ``histogram_bytes`` holds, and one pass per
    group of features for the context AUROCs (only tokens of contexts with more than one role are read).
    ``roles``: one per token, in the features' token order (strings, or a ``pd.Categorical``); ``top``: the
    features' ``top_features`` if already computed (with at least k columns)."""
    names = list(features.names)
    if isinstance(roles, pd.Categorical):  # one small integer a token: what a large store should pass
        codes, role_names = roles.codes, np.asarray(roles.categories)
    else:
        codes, role_names = pd.factorize(np.asarray(roles), sort=True)
        role_names = np.asarray(role_names)
    codes = np.asarray(codes, np.int64)
    fams = np.asarray([families[r] for r in role_names])
    if sample_fraction is not None and not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction {sample_fraction}: must be in (0, 1]")
    depth = k if sample_fraction is None else max(k, int(np.ceil(sample_fraction * len(codes))))
    if top is None or top[0].shape[1] < min(depth, len(codes)):
        top = top_features(features, depth)
    top_v, top_i = top[0][:, :depth], top[1][:, :depth]
    if top_i.shape[1] and top_i.max() >= len(codes):
        raise ValueError(f"{len(codes)} roles for at least {top_i.max() + 1} tokens: roles must cover every token")
    rng = np.random.default_rng(seed)
    active = []  # the scored tokens of each feature: where it fired, among its top-k or its sample
    for f in range(len(names)):
        fired = top_i[f][top_v[f] != 0]
        if sample_fraction is not None and len(fired) > k:
            fired = np.sort(rng.choice(fired, k, replace=False))
        active.append(fired[:k] if sample_fraction is None else fired)
    rows, best = [], np.empty(len(names), np.int64)
    for f, name in enumerate(names):
        row: dict[str, Any] = {"feature": name, "n_active": len(active[f]), "auroc": float("nan")}
        if len(active[f]) == 0:
            best[f] = -1
            rows.append(row | {"role": "", "precision": float("nan"), "family": "", "family_precision": float("nan")})
            continue
        counts = np.bincount(codes[active[f]], minlength=len(role_names))
        best[f] = int(np.argmax(counts))  # ties: the first role in sorted order
        top_fams, fam_counts = np.unique(fams[codes[active[f]]], return_counts=True)
        rows.append(
            row
            | {
                "role": str(role_names[best[f]]),
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
        _score_beyond_surface(features, rows, active, best, codes, ids, previous, context_width, histogram_bytes)
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


def _score_beyond_surface(
    features: Features,
    rows: list[dict[str, Any]],
    active: list[np.ndarray],
    best: np.ndarray,
    codes: np.ndarray,
    ids: np.ndarray,
    previous: np.ndarray,
    width: int,
    budget: int,
) -> None:
    """``context_auroc`` / ``context_z`` / ``context_pairs`` and ``context_precision`` / ``context_lift``
    into ``rows`` (see ``score_against_roles``)."""
    n_roles = int(codes.max()) + 1 if len(codes) else 1
    context = context_keys(ids, previous, width)
    half = (np.cumsum(previous == -1) - 1) % 2  # even and odd documents
    if half.min() == half.max():  # one document: its first and second halves
        half = (np.arange(len(half)) >= len(half) // 2).astype(np.int64)
    reader = _cross_fit_rates(context, np.asarray(ids, np.int64), half, codes, n_roles)
    for f in range(len(rows)):
        held_out = reader(active[f], best[f]).mean() if best[f] >= 0 else float("nan")
        rows[f]["context_precision"] = float(held_out)
        rows[f]["context_lift"] = rows[f]["precision"] - float(held_out)
        rows[f] |= {"context_auroc": float("nan"), "context_z": float("nan"), "context_pairs": 0}
    counts = np.bincount(context * n_roles + codes, minlength=(context.max() + 1) * n_roles).reshape(-1, n_roles)
    mixed_role = (counts > 0) & (counts < counts.sum(1, keepdims=True))  # [contexts, roles]: role varies there
    mixed = np.flatnonzero(mixed_role.any(1)[context])  # tokens whose context holds several roles
    if len(mixed) == 0:
        return
    scored = [f for f in range(len(rows)) if best[f] >= 0 and mixed_role[:, best[f]].any()]
    per_pass = max(1, budget // (len(mixed) * 4))
    for first in range(0, len(scored), per_pass):
        group = scored[first : first + per_pass]
        values = np.empty((len(mixed), len(group)), np.float32)
        offset = 0
        for block in features.blocks():  # gather the mixed tokens' values of this group
            inside = mixed[(mixed >= offset) & (mixed < offset + len(block))]
            values[np.searchsorted(mixed, inside)] = block[inside - offset][:, group]
            offset += len(block)
        for j, f in enumerate(group):
            keep = mixed_role[context[mixed], best[f]]
            keep &= ~np.isin(mixed, active[f])  # the tokens that chose the role do not judge it
            auc, z, pairs = stratified_auroc(values[keep, j], codes[mixed[keep]] == best[f], context[mixed[keep]])
            rows[f] |= {"context_auroc": auc, "context_z": z, "context_pairs": pairs}


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


BEYOND_AUROC = 0.6  # monosemantic needs context AUROC >= this (an effect a reader would notice) ...
BEYOND_P = 0.001  # ... and that far from chance at this one-sided p under roles shuffled within contexts


def classify_features(
    scores: pd.DataFrame,
    mono: float = 0.9,
    broad: float = 0.9,
    min_active: int = 1,
    beyond: float = BEYOND_AUROC,
    beyond_p: float = BEYOND_P,
) -> pd.Series:
    """monosemantic if the best role holds >= ``mono`` of the scored tokens and, where the scores have
    ``context_auroc`` (``score_against_roles`` with ``tokens``), the feature also ranks that role within
    its contexts: context AUROC >= ``beyond`` with one-sided p < ``beyond_p`` (its ``context_z``);
    ``surface`` if it is that pure but not beyond the tokens under it; else broad if the best family holds
    >= ``broad``; else polysemantic; ``rare`` (unclassified) if it fired on fewer than ``min_active`` of
    its scored tokens (``n_active``, where scored)."""
    from scipy.stats import norm

    pure = (scores["precision"] >= mono).to_numpy()
    knows = np.ones(len(scores), bool)
    if "context_auroc" in scores:
        z = norm.isf(beyond_p)
        knows = ((scores["context_auroc"] >= beyond) & (scores["context_z"] >= z)).to_numpy()
    rest = np.where(scores["family_precision"] >= broad, "broad", "polysemantic")
    classes = np.where(pure, np.where(knows, "monosemantic", "surface"), rest)
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
    sample_fraction: float | None = None,
    context_width: int = 2,
    beyond: float = BEYOND_AUROC,
    beyond_p: float = BEYOND_P,
    seed: int = 0,
) -> pd.DataFrame:
    """``score_against_roles`` and ``classify_features`` for each population (name -> features), stacked
    with a ``population`` column; ``tops``: their ``top_features`` where already computed; ``tokens``: the
    token ids and previous ids, for the identity and bigram baselines and the beyond-surface scores (then
    a pure feature that knows nothing beyond its tokens is classed ``surface``); ``sample_fraction``: score
    k tokens sampled from each feature's top fraction instead of its top-k (a design whose shares do not
    move with the corpus size); ``min_active``: fewest firing tokens among those to be classified (default
    k/5: 10 of 50), else ``rare``. ``unit``: what ``class_shares`` and ``compare_populations`` resample,
    the feature itself, or for ``SignedFeatures`` the read-out both polarities come from."""
    min_active = max(1, k // 5) if min_active is None else min_active
    tables = []
    for population, features in populations.items():
        table = score_against_roles(
            features,
            roles,
            families,
            k=k,
            top=(tops or {}).get(population),
            tokens=tokens,
            sample_fraction=sample_fraction,
            context_width=context_width,
            seed=seed,
        )
        table["class"] = classify_features(table, mono=mono, broad=broad, min_active=min_active, beyond=beyond, beyond_p=beyond_p)
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
        for name in CLASSES:
            hits, size = _unit_totals(group, (labels == name).astype(float))
            lo, hi = bootstrap_interval([hits, size], lambda h, s: h.sum() / s.sum(), n_resamples=n_resamples, seed=seed)
            rows.append(
                {
                    "population": population,
                    "class": name,
                    "share": (labels == name).mean(),
                    "n": len(labels),
                    "rare": len(everything) - len(group),
                    "units": len(size),
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


def _unit_totals(group: pd.DataFrame, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit of ``group`` (its ``unit`` column, else each feature its own): the sum of ``values`` over the
    unit's features (NaN left out) and their count, units in order of appearance."""
    keep = ~np.isnan(values)
    units = group["unit"].to_numpy() if "unit" in group else np.arange(len(group))
    which, names = pd.factorize(units[keep])
    return np.bincount(which, weights=values[keep], minlength=len(names)), np.bincount(which, minlength=len(names)).astype(float)


def clustered_difference(
    scored: pd.DataFrame, a: str, b: str, values: pd.Series, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` over population ``a``'s features minus ``b``'s, with a 95% interval that resamples
    whole units (an adapter's two polarities together: a cluster bootstrap, each population on its own)."""
    from paper_lib.statistics import bootstrap_distribution

    ratio = lambda s, c: s.sum() / c.sum()  # noqa: E731
    groups = [scored.loc[scored["population"] == p] for p in (a, b)]
    (sa, ca), (sb, cb) = (_unit_totals(g, values.loc[g.index].to_numpy(dtype=float)) for g in groups)
    if not len(sa) or not len(sb):
        return float("nan"), float("nan"), float("nan")
    da = bootstrap_distribution([sa, ca], ratio, n_resamples, seed=seed)
    db = bootstrap_distribution([sb, cb], ratio, n_resamples, seed=seed + 1)
    diff = da - db
    diff = diff[np.isfinite(diff)]
    return float(ratio(sa, ca) - ratio(sb, cb)), float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))


def compare_populations(scored: pd.DataFrame, a: str, b: str, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Population ``a`` vs ``b`` over the classified (not ``rare``) features: chi-square test of the class
    counts (features counted as independent: read it with the intervals); the difference in each class's
    share and in the mean of precision, AUROC and (where scored) the lifts and beyond-surface scores, with
    95% intervals that resample units (``clustered_difference``: an adapter's two polarities together),
    and a Mann-Whitney U test per score (over features). ``scored``: columns population, class, precision,
    auroc[, unit, lift, bigram_lift, context_auroc, context_lift]."""
    from scipy.stats import chi2_contingency, mannwhitneyu

    scored = classified(scored)
    table = pd.crosstab(scored["population"], scored["class"]).reindex(index=[a, b], columns=list(CLASSES), fill_value=0)
    table = table.loc[:, table.sum() > 0]
    out = {"chi2_p": float(chi2_contingency(table.to_numpy())[1]) if table.shape[1] > 1 else 1.0}
    for name in CLASSES:
        diff, lo, hi = clustered_difference(scored, a, b, (scored["class"] == name).astype(float), n_resamples, seed)
        out |= {f"{name}_share_diff": diff, f"{name}_share_diff_lo": lo, f"{name}_share_diff_hi": hi}
    columns = ("precision", "auroc", "lift", "bigram_lift", "context_auroc", "context_lift")
    for column in [c for c in columns if c in scored]:
        va = scored.loc[scored["population"] == a, column].dropna().to_numpy()
        vb = scored.loc[scored["population"] == b, column].dropna().to_numpy()
        if not len(va) or not len(vb):
            continue
        diff, lo, hi = clustered_difference(scored, a, b, scored[column], n_resamples, seed)
        out |= {
            f"{column}_mannwhitney_p": float(mannwhitneyu(va, vb).pvalue),
            f"{column}_diff": diff,
            f"{column}_diff_lo": lo,
            f"{column}_diff_hi": hi,
        }
    return out


class PrefixFeatures:
    """The first ``n_tokens`` tokens of a population (the first documents of a store): the same features on
    a smaller corpus, to check that a share does not move with its size."""

    def __init__(self, features: Features, n_tokens: int) -> None:
        self.base, self.n_tokens, self.names = features, n_tokens, list(features.names)

    def blocks(self) -> Iterator[np.ndarray]:
        seen = 0
        for block in self.base.blocks():
            if seen >= self.n_tokens:
                return
            yield block[: self.n_tokens - seen]
            seen += len(block)

    def rows(self, start: int, end: int) -> np.ndarray:
        return self.base.rows(start, min(end, self.n_tokens))


def scored_depth(n_tokens: int, k: int, sample_fraction: float | None) -> int:
    """How many top tokens per feature the scorer reads: k, or the top ``sample_fraction`` it samples from."""
    return k if not sample_fraction else max(k, int(np.ceil(sample_fraction * n_tokens)))


def shares_by_corpus_size(
    population: str,
    features: Features,
    roles: np.ndarray,
    tokens: tuple[np.ndarray, np.ndarray],
    document_tokens: Sequence[int],
    sizes: Sequence[int],
    families: Mapping[str, str],
    n_resamples: int = 2000,
    **design: Any,
) -> pd.DataFrame:
    """``class_shares`` of one population scored on its first ``n`` documents, for each ``n`` in ``sizes``
    (``document_tokens``: each document's token count, in store order; ``design``: ``score_populations``'
    keyword arguments), with a ``documents`` column: shares that move with ``n`` cannot be compared with
    a number measured on another corpus."""
    bounds = np.cumsum(document_tokens)
    tables = []
    for n in sizes:
        end = int(bounds[min(n, len(bounds)) - 1])
        cut = PrefixFeatures(features, end)
        scored = score_populations({population: cut}, roles[:end], families, tokens=tuple(t[:end] for t in tokens), **design)
        if isinstance(features, SignedFeatures):
            scored["unit"] = scored["feature"].str[:-1]
        tables.append(
            class_shares(scored, n_resamples=n_resamples, seed=design.get("seed", 0)).assign(documents=min(n, len(bounds)))
        )
    return pd.concat(tables, ignore_index=True)


# What notebooks 04 and 06 say and record about scored populations: built here from named numbers, so the
# notebooks hold calls, and the same numbers always read the same way.


def score_tags(row: Any) -> tuple[str, dict[str, Any]]:
    """A scored feature (a row of ``score_populations``) as the feature pages show it: a one-line summary
    and its tags (class, role and family filter the page; purity, AUROC and the beyond-surface AUROC sort it)."""
    summary = (
        f"{row['class']}: best role {row['role']} (purity {row['precision']:.2f}, AUROC {row['auroc']:.2f}, within its "
        f"contexts {row['context_auroc']:.2f}); family {row['family']} ({row['family_precision']:.2f})"
    )
    tags = {k: row[k] for k in ("class", "role", "family")}
    tags |= {k: round(float(row[c]), 3) for k, c in (("purity", "precision"), ("auroc", "auroc"), ("beyond", "context_auroc"))}
    return summary, tags


def population_slug(population: str) -> str:
    """A population's name in headline keys: its first word (``lora``, ``mlp``, ``random``, ``sae``), or the
    whole name for the untrained model's (``untrained_mlp_neuron``)."""
    return population.replace(" ", "_").lower() if population.startswith("untrained") else population.split(" ")[0].lower()


def control_summary(control: pd.DataFrame) -> pd.DataFrame:
    """Per version of the roles (column ``roles``: the real ones, shuffled globally, shuffled within
    contexts): each class's share of the classified features, the median beyond-surface AUROC and the mean
    held-out context lift (under the within-context shuffle both measure the scorer's own bias: ~0.5, ~0)."""
    kept = classified(control)
    shares = pd.crosstab(kept["roles"], kept["class"], normalize="index").reindex(columns=list(CLASSES), fill_value=0.0)
    shares["median_context_auroc"] = kept.groupby("roles")["context_auroc"].median()
    shares["mean_context_lift"] = kept.groupby("roles")["context_lift"].mean()
    shares["n"] = kept.groupby("roles").size()
    return shares.reindex(list(dict.fromkeys(control["roles"])))


def control_sentence(controls: pd.DataFrame) -> str:
    """What the two shuffles did to the LoRA features' classes, and the scorer's own bias."""
    real, globally, within = (controls.iloc[i] for i in range(3))
    return (
        f"**What we see (controls).** With the real roles {real['monosemantic']:.0%} of the LoRA features are "
        f"monosemantic and {real['surface']:.0%} surface; with roles shuffled globally {globally['monosemantic']:.0%} and "
        f"{globally['surface']:.0%}; with roles shuffled within contexts {within['monosemantic']:.0%} and "
        f"{within['surface']:.0%}: the surface readers keep their purity and the beyond-surface credit goes. The "
        f"scorer's own bias under the within-context shuffle: median beyond-surface AUROC {within['median_context_auroc']:.3f} "
        f"(0.5 is none), mean held-out context lift {within['mean_context_lift']:+.3f} (0 is none)."
    )


def population_comparison(
    shares: pd.DataFrame, tests: Mapping[str, Mapping[str, float]], a: str, b: str, word: str, margin: float
) -> str:
    """Figure 2's paragraph: every population's classes, then ``a`` vs ``b`` on the monosemantic share with
    its interval and verdict (``word``), and the AUROCs beside it."""
    from paper_lib.results import verdict_words

    share = shares.set_index(["population", "class"])
    t = tests[f"{a} vs {b}"]
    classes = "; ".join(
        f"{p} " + " / ".join(f"{share.loc[(p, c), 'share']:.0%}" for c in CLASSES) for p in dict.fromkeys(shares["population"])
    )
    return (
        f"**What we see.** Monosemantic / surface / broad / polysemantic: {classes} (the paper, by its judge: LoRA "
        f"16 / - / 40 / 44%, MLP 13 / - / 27 / 60%). {a} minus {b}, monosemantic share: {t['monosemantic_share_diff']:+.2f} "
        f"[{t['monosemantic_share_diff_lo']:+.2f}, {t['monosemantic_share_diff_hi']:+.2f}]; 'about as interpretable' "
        f"(within ±{margin:.2f}): {verdict_words(word)}. Beside it, AUROC {t['auroc_diff']:+.3f} "
        f"[{t['auroc_diff_lo']:+.3f}, {t['auroc_diff_hi']:+.3f}] and within contexts {t['context_auroc_diff']:+.3f} "
        f"[{t['context_auroc_diff_lo']:+.3f}, {t['context_auroc_diff_hi']:+.3f}]. Against random directions in the "
        f"same inputs, {a} minus random: {tests[f'{a} vs random direction']['monosemantic_share_diff']:+.2f} "
        f"[{tests[f'{a} vs random direction']['monosemantic_share_diff_lo']:+.2f}, "
        f"{tests[f'{a} vs random direction']['monosemantic_share_diff_hi']:+.2f}]."
    )


def untrained_sentence(shares: pd.DataFrame, tests: Mapping[str, Mapping[str, float]], n_traces: int) -> str:
    """What the untrained model's read-outs score, and the trained LoRA's margin over them."""
    share = shares.set_index(["population", "class"])["share"]
    parts = [
        f"{name.removeprefix('LoRA vs ')}s {share[(name.removeprefix('LoRA vs '), 'monosemantic')]:.0%} monosemantic "
        f"(LoRA minus them {t['monosemantic_share_diff']:+.2f} [{t['monosemantic_share_diff_lo']:+.2f}, "
        f"{t['monosemantic_share_diff_hi']:+.2f}]; beyond-surface AUROC {t['context_auroc_diff']:+.3f} "
        f"[{t['context_auroc_diff_lo']:+.3f}, {t['context_auroc_diff_hi']:+.3f}])"
        for name, t in tests.items()
    ]
    return (
        f"**What we see (untrained control, {n_traces} traces).** On an untrained model of the same shape: "
        + "; ".join(parts)
        + ". What the trained features score beyond these is what training put there."
    )


def record_scores(
    section: str, scored: pd.DataFrame, shares: pd.DataFrame, tests: Mapping[str, Mapping[str, float]], **extra: Any
) -> None:
    """The headline numbers of scored populations: each class's share (interval), the medians of every
    score, and each test's differences (intervals, Benjamini-Hochberg-adjusted Mann-Whitney p over all)."""
    from paper_lib.results import record_headline

    for _, r in shares.iterrows():
        key = f"{population_slug(r['population'])}_{r['class']}_share"
        record_headline(section, key, r["share"], unit="fraction of features", n=r["n"], ci95=[r["lo"], r["hi"]], **extra)
    columns = [c for c in ("precision", "auroc", "lift", "bigram_lift", "context_auroc", "context_lift") if c in scored]
    for name, group in classified(scored).groupby("population"):
        for column in columns:
            value = group[column].median()
            if np.isfinite(value):
                record_headline(section, f"{population_slug(name)}_median_{column}", value, unit="score", n=len(group))
    p_values = {f"{pair}|{k}": v for pair, t in tests.items() for k, v in t.items() if k.endswith("_p")}
    adjusted = adjusted_p_values(p_values)
    for pair, t in tests.items():
        key = "_vs_".join(population_slug(p) for p in pair.split(" vs "))
        record_headline(
            section, f"{key}_chi2_p", t["chi2_p"], unit="p-value", n=len(scored), bh_adjusted=adjusted[f"{pair}|chi2_p"]
        )
        for measure in [m.removesuffix("_diff") for m in t if m.endswith("_diff") and np.isfinite(t[m])]:
            tested = (
                {"mannwhitney_p_bh_adjusted": adjusted[f"{pair}|{measure}_mannwhitney_p"]}
                if f"{measure}_mannwhitney_p" in t
                else {}
            )
            record_headline(
                section,
                f"{key}_{measure}_diff",
                t[f"{measure}_diff"],
                unit="difference of means",
                n=len(scored),
                ci95=[t[f"{measure}_diff_lo"], t[f"{measure}_diff_hi"]],
                **tested,
            )


def sae_comparison(shares: pd.DataFrame, test: Mapping[str, float], word: str, n_live: int, min_active: int) -> str:
    """Notebook 06's paragraph: SAE latents vs raw adapter features on the same scorer, with the verdict
    (``word``) on the monosemantic share's difference and AUROCs beside it."""
    from paper_lib.results import verdict_words

    share = shares.set_index(["population", "class"])
    sae, lora = (share.loc[p] for p in ("SAE feature", "LoRA"))
    return (
        f"**What we see.** Of {n_live} live SAE latents, {int(sae['n'].iloc[0])} are classified ({int(sae['rare'].iloc[0])} fire "
        f"on fewer than {min_active} tokens): {sae.loc['monosemantic', 'share']:.0%} monosemantic and "
        f"{sae.loc['surface', 'share']:.0%} surface, against {lora.loc['monosemantic', 'share']:.0%} and "
        f"{lora.loc['surface', 'share']:.0%} of the raw adapter features (the paper: ~62% vs ~22%, by its judge). SAE minus "
        f"LoRA, monosemantic share: {test['monosemantic_share_diff']:+.2f} [{test['monosemantic_share_diff_lo']:+.2f}, "
        f"{test['monosemantic_share_diff_hi']:+.2f}]; 'the SAE's features are more often monosemantic': {verdict_words(word)}. "
        f"Beside it, AUROC {test['auroc_diff']:+.3f} [{test['auroc_diff_lo']:+.3f}, {test['auroc_diff_hi']:+.3f}] and within "
        f"contexts {test['context_auroc_diff']:+.3f} [{test['context_auroc_diff_lo']:+.3f}, {test['context_auroc_diff_hi']:+.3f}]."
    )


def record_share_claim(section: str, key: str, test: Mapping[str, float], word: str, n: int, **extra: Any) -> None:
    """A claim about two populations' monosemantic shares, recorded with its clustered interval and verdict."""
    from paper_lib.results import record_headline

    record_headline(
        section,
        key,
        test["monosemantic_share_diff"],
        unit="difference of monosemantic shares",
        n=n,
        ci95=[test["monosemantic_share_diff_lo"], test["monosemantic_share_diff_hi"]],
        verdict=word,
        **extra,
    )
