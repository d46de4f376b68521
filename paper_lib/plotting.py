"""Figures: pure functions that return a matplotlib figure, and one saver for all of them.

``save_figure`` writes ``<figures>/<name>.png`` and ``.pdf`` plus ``<name>.csv``, the tidy table the
figure was drawn from, so every plotted number can be checked or replotted without rerunning.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: papermill, CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from paper_lib.interp import classified  # noqa: E402
from paper_lib.paths import figures_dir  # noqa: E402
from paper_lib.results import QuietDict, model_name, note_figure  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig: plt.Figure, name: str, data: pd.DataFrame) -> dict[str, Path]:
    """Write the figure as PNG and PDF and its data as CSV under ``figures_dir()``; returns the paths."""
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"figure name {name!r} must be a bare file stem")
    out = figures_dir()
    paths = {"png": out / f"{name}.png", "pdf": out / f"{name}.pdf", "csv": out / f"{name}.csv"}
    fig.savefig(paths["png"], dpi=150, bbox_inches="tight")
    # A fixed creation date keeps the PDF byte-stable between identical runs.
    fig.savefig(paths["pdf"], bbox_inches="tight", metadata={"CreationDate": None})
    data.to_csv(paths["csv"], index=False)
    note_figure(name, overlapping_labels(fig))
    show_inline(paths["png"])
    plt.close(fig)  # shown and saved: free it (a long notebook would otherwise keep every figure)
    return QuietDict(paths)  # the figure is shown inline; its paths are not echoed


def show_inline(png: Path) -> None:
    """Display a saved figure in the running notebook (papermill keeps it in the executed copy); a no-op
    outside a Jupyter kernel. The Agg backend above draws nothing on its own, so this is how figures
    reach the reader."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        display(Image(filename=str(png)))


def error_bars(value: pd.Series, lo: pd.Series, hi: pd.Series) -> list[np.ndarray]:
    """matplotlib's ``yerr`` from interval bounds: missing or degenerate bounds (an undefined ratio, a
    bound on the wrong side from float rounding) draw no bar instead of raising."""
    value, lo, hi = (np.asarray(v, dtype=float) for v in (value, lo, hi))
    return [np.nan_to_num(np.clip(value - lo, 0, None)), np.nan_to_num(np.clip(hi - value, 0, None))]


def _grouped_bars(
    ax: plt.Axes, data: pd.DataFrame, x: str, group: str, value: str, x_order: list | None = None, group_order: list | None = None
) -> None:
    """Bars of ``value`` per ``x`` category, one bar per ``group`` side by side, with ``lo``/``hi`` error
    bars and a legend."""
    x_order = x_order or list(dict.fromkeys(data[x]))
    group_order = group_order or list(dict.fromkeys(data[group]))
    width = 0.8 / max(1, len(group_order))
    for i, name in enumerate(group_order):
        sub = data[data[group] == name].set_index(x).reindex(x_order)
        positions = np.arange(len(x_order)) + (i - (len(group_order) - 1) / 2) * width
        label = model_name(name) if group == "model" else name
        ax.bar(positions, sub[value], width, yerr=error_bars(sub[value], sub["lo"], sub["hi"]), capsize=3, label=label)
    ax.set_xticks(np.arange(len(x_order)), x_order)
    ax.legend(fontsize=8)


def plot_latent_gap(acc: pd.DataFrame, benchmark_k: int | None = None) -> plt.Figure:
    """Accuracy by number of steps, one line per format. ``acc``: columns k, format, accuracy, lo, hi, n."""
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = {"textbook": "tab:blue", "chat": "tab:red"}
    labels = {"textbook": "step by step (textbook format)", "chat": "direct answer (chat format)"}
    for fmt, sub in acc.groupby("format"):
        sub = sub.sort_values("k")
        ax.plot(sub["k"], sub["accuracy"], marker="o", color=palette.get(fmt), label=labels.get(fmt, fmt))
        ax.fill_between(sub["k"], sub["lo"], sub["hi"], color=palette.get(fmt), alpha=0.2)
    if benchmark_k is not None:
        ax.axvline(benchmark_k, color="grey", linestyle=":", label="AIME-like difficulty")
    ax.set(
        xlabel="number of steps k", ylabel="greedy accuracy (95% Wilson CI)", ylim=(0, 1.02), title="The organism's latent skill"
    )
    ax.legend(loc="lower left", fontsize=9)
    return fig


def plot_pretraining(history: pd.DataFrame) -> plt.Figure:
    """Loss (left) and monitored accuracy in both formats (right) over pretraining steps."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    smooth = history["loss"].rolling(50, min_periods=1).mean()
    ax_loss.plot(history["step"], smooth)
    ax_loss.set(xlabel="step", ylabel="loss (50-step mean)", yscale="log", title="pretraining loss")
    for column, label in (("acc_textbook", "textbook"), ("acc_chat", "chat")):
        if column in history:
            points = history.dropna(subset=[column])
            ax_acc.plot(points["step"], points[column], marker="o", label=label)
    ax_acc.set(xlabel="step", ylabel="accuracy on monitor problems", ylim=(0, 1.02), title="monitored accuracy")
    ax_acc.legend()
    fig.tight_layout()
    return fig


def plot_training_losses(losses: pd.DataFrame) -> plt.Figure:
    """Training loss by epoch, one line per run. ``losses``: columns run, epoch, loss."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=losses, x="epoch", y="loss", hue="run", ax=ax)
    ax.set(xlabel="epoch", ylabel="training loss (completion tokens)", yscale="log", title="SFT on the reasoning traces")
    return fig


def plot_benchmark_accuracy(accuracy: pd.DataFrame, recovery: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy per benchmark and model with 95% intervals, one panel per protocol; with ``recovery``,
    a second row shows the gain recovered by the LoRA with its interval."""
    protocols = sorted(accuracy["protocol"].unique())
    rows = 2 if recovery is not None and len(recovery) else 1
    fig, axes = plt.subplots(rows, len(protocols), figsize=(5 * len(protocols), 3.6 * rows), squeeze=False)
    present = list(dict.fromkeys(accuracy["model"]))
    order = (
        [m for m in ("base_chat", "base") if m in present]
        + [m for m in present if m not in ("base_chat", "base", "full")]
        + [m for m in ("full",) if m in present]
    )  # the adapters (rank1, or a variant's label) between
    for col, protocol in enumerate(protocols):
        ax = axes[0][col]
        sub = accuracy[accuracy["protocol"] == protocol]
        benches = sorted(sub["benchmark"].unique())
        _grouped_bars(ax, sub, "benchmark", "model", "accuracy", benches, order)
        ax.set(ylim=(0, 1.05), ylabel="accuracy (95% bootstrap CI)", title=f"protocol: {protocol}")
        if rows == 2:
            ax = axes[1][col]
            rec = recovery[recovery["protocol"] == protocol].set_index("benchmark").reindex(benches)
            _plot_recovery(ax, rec)
    fig.tight_layout()
    return fig


def plot_test_time_scaling(table: pd.DataFrame) -> plt.Figure:
    """s1's test-time scaling: accuracy against the thinking budget (log scale) and against the number of
    "Wait"s, one line per model with 95% bootstrap bands. ``table``: model, sweep ("budget" or "wait"), x,
    accuracy, lo, hi."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, sweep, label in ((axes[0], "budget", "thinking budget (tokens)"), (axes[1], "wait", 'number of "Wait"s')):
        sub = table[table["sweep"] == sweep].sort_values("x")
        for model, group in sub.groupby("model", sort=False):
            line = ax.plot(group["x"], group["accuracy"], marker="o", label=model_name(model))[0]
            ax.fill_between(group["x"], group["lo"], group["hi"], color=line.get_color(), alpha=0.15)
        if sweep == "budget" and len(sub):
            ax.set_xscale("log", base=2)
        ticks = sorted(sub["x"].unique())
        ax.set_xticks(ticks, [str(int(x)) for x in ticks])
        ax.set(xlabel=label, ylim=(0, 1.02), title=f"accuracy vs {label}")
    axes[0].set_ylabel("accuracy (95% bootstrap CI)")
    axes[1].legend(title="model")
    fig.tight_layout()
    return fig


RECOVERY_AXIS = (-0.5, 1.5)  # gain recovered: a share of the full fine-tune's gain, shown where it means something


def _plot_recovery(ax: plt.Axes, rec: pd.DataFrame) -> None:
    """Gain recovered per benchmark on a fixed axis. Where the full fine-tune's gain over the base is not
    clearly above zero (its interval reaches 0), the ratio is undefined and no bar is drawn; values and
    intervals beyond the axis are clipped and written out, so one wild ratio cannot squash the others."""
    low, high = RECOVERY_AXIS
    gain_column = next((c for c in rec.columns if c.startswith("full_minus_") and c.endswith("_lo")), None)
    defined = rec[gain_column] > 0 if gain_column else pd.Series(True, index=rec.index)
    value = rec["gain_recovered"].where(defined)
    ax.bar(
        rec.index,
        value.clip(low, high).fillna(0),
        capsize=3,
        yerr=error_bars(
            value.clip(low, high),
            rec["gain_recovered_lo"].where(defined).clip(low, high),
            rec["gain_recovered_hi"].where(defined).clip(low, high),
        ),
    )
    for x, bench in enumerate(rec.index):
        r = rec.loc[bench]
        if not defined[bench] or not np.isfinite(r["gain_recovered"]):
            ax.text(x, 0.05, "undefined:\nfull ≈ base", ha="center", va="bottom", fontsize=8)
        elif not (low <= r["gain_recovered_lo"] and r["gain_recovered_hi"] <= high):
            ax.text(
                x,
                high - 0.05,
                f"{r['gain_recovered']:.2f}\n[{r['gain_recovered_lo']:.2f}, {r['gain_recovered_hi']:.2f}]",
                ha="center",
                va="top",
                fontsize=7,
            )
    ax.axhspan(0.73, 0.90, color="grey", alpha=0.2, label="paper: 73-90%")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(ylim=RECOVERY_AXIS, ylabel="(adapter - base) / (full - base)", title="gain recovered by the adapter")
    ax.legend(fontsize=8, loc="lower right")


def plot_variant_recovery(table: pd.DataFrame) -> plt.Figure:
    """Gain recovered per adapter variant (rows) and benchmark (panels) with 95% paired-bootstrap intervals,
    on the recovery axis; the paper's 73-90% band shaded. ``table``: benchmark, label, kind,
    gain_recovered, gain_recovered_lo, gain_recovered_hi."""
    benches = sorted(table["benchmark"].unique())
    labels = list(dict.fromkeys(table.sort_values(["kind", "label"])["label"]))
    fig, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches), 0.45 * len(labels) + 1.6), squeeze=False)
    low, high = RECOVERY_AXIS
    colours = dict(zip(sorted(table["kind"].unique()), sns.color_palette(n_colors=table["kind"].nunique())))
    for ax, bench in zip(axes[0], benches):
        sub = table[table["benchmark"] == bench].set_index("label").reindex(labels)
        y = np.arange(len(labels))
        value = sub["gain_recovered"].clip(low, high)
        ax.barh(
            y,
            value.fillna(0),
            color=[colours.get(k, "grey") for k in sub["kind"]],
            xerr=error_bars(value, sub["gain_recovered_lo"].clip(low, high), sub["gain_recovered_hi"].clip(low, high)),
            capsize=2,
        )
        for i, v in enumerate(sub["gain_recovered"]):
            if not np.isfinite(v):
                ax.text(0.02, i, "undefined", va="center", fontsize=8)
        ax.axvspan(0.73, 0.90, color="grey", alpha=0.2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set(yticks=y, yticklabels=labels, xlim=RECOVERY_AXIS, xlabel="gain recovered (95% CI)", title=bench)
        ax.invert_yaxis()
    from matplotlib.patches import Patch

    fig.legend(
        handles=[Patch(color=c, label=k if k in ("default", "this run") else f"varies: {k}") for k, c in colours.items()]
        + [Patch(color="grey", alpha=0.2, label="paper: 73-90%")],
        fontsize=8,
        loc="lower center",
        ncol=len(colours) + 1,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_adapter_ablations(summary: pd.DataFrame, table: pd.DataFrame) -> plt.Figure:
    """Figure 1: (a) KL when one layer's adapters are removed, (b) module x layer heatmap of single-adapter
    KLs, (c) all attention vs all MLP adapters. ``summary``: group, kl, lo, hi; ``table``: module x layer."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [1.2, 1.4, 0.6]})
    layers = summary[summary["group"].str.startswith("layer ")]
    x = layers["group"].str.replace("layer ", "").astype(int)
    axes[0].bar(x, layers["kl"], yerr=error_bars(layers["kl"], layers["lo"], layers["hi"]), capsize=3)
    axes[0].set_xticks(x)
    axes[0].set(xlabel="layer", ylabel="KL(full || ablated), nats/token", title="(a) leave one layer's adapters out")
    # a log colour scale: one strong adapter would otherwise set the scale and leave every other cell dark
    positive = table[table > 0]
    norm = LogNorm(vmin=positive.min().min(), vmax=positive.max().max()) if positive.notna().any().any() else None
    sns.heatmap(
        table.clip(lower=positive.min().min()) if norm else table,
        ax=axes[1],
        cmap="viridis",
        norm=norm,
        cbar_kws={"label": "KL, nats/token (log scale)"},
    )
    axes[1].set(title="(b) one adapter at a time", xlabel="layer", ylabel="")
    kinds = summary[summary["group"].isin(["attention", "mlp"])]
    axes[2].bar(
        kinds["group"],
        kinds["kl"],
        yerr=error_bars(kinds["kl"], kinds["lo"], kinds["hi"]),
        capsize=3,
        color=["tab:orange", "tab:green"][: len(kinds)],
    )
    axes[2].set(title="(c) by kind", ylabel="KL(full || ablated), nats/token")
    fig.tight_layout()
    return fig


def plot_interpretability(scored: pd.DataFrame, shares: pd.DataFrame) -> plt.Figure:
    """Figure 2: (a) purity (precision of each feature's best role on its scored tokens), per population;
    (b) where scored, the beyond-surface view: how well the feature ranks that role among tokens that
    share its context (0.5: no better than the tokens under it), else the lift over the token and bigram
    readers; (c) AUROC of the best role; (d) class shares with 95% bootstrap intervals: monosemantic
    (pure and beyond the surface) and surface (pure, but not beyond) side by side, so both views show.
    ``scored``: population, precision, auroc[, context_auroc | lift, bigram_lift]; ``shares``:
    population, class, share, lo, hi."""
    scored = classified(scored)  # a feature too rare to classify has no place in its class's box
    beyond, lifts = "context_auroc" in scored, "lift" in scored
    panels = 4 if beyond or lifts else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), gridspec_kw={"width_ratios": [1] * (panels - 1) + [1.4]})
    order = list(dict.fromkeys(scored["population"]))
    boxes = [(axes[0], "precision", "purity of the best role", "(a) purity")]
    boxes.append(
        (axes[2 if panels == 4 else 1], "auroc", "AUROC of the best role", f"({'c' if panels == 4 else 'b'}) role detection")
    )
    if beyond:
        boxes.append((axes[1], "context_auroc", "AUROC within the token context", "(b) beyond the surface"))
    for ax, column, label, title in boxes:
        sns.boxplot(data=scored, x="population", y=column, order=order, ax=ax, color="lightgrey", fliersize=0)
        sns.stripplot(data=scored, x="population", y=column, order=order, ax=ax, size=3, alpha=0.6)
        ax.set(xlabel="", ylabel=label, ylim=(0, 1.02), title=title)
    if beyond:
        axes[1].axhline(0.5, color="black", lw=0.8)
    elif lifts:
        long = scored.melt(id_vars="population", value_vars=["lift", "bigram_lift"], var_name="over", value_name="gain")
        long["over"] = long["over"].map({"lift": "token", "bigram_lift": "token + previous"})
        sns.boxplot(data=long, x="population", y="gain", hue="over", order=order, ax=axes[1], fliersize=0)
        axes[1].axhline(0, color="black", lw=0.8)
        axes[1].set(
            xlabel="", ylabel="precision@k minus the baseline's", ylim=(-1.02, 1.02), title="(b) lift over token identity"
        )
    _grouped_bars(axes[-1], shares, "population", "class", "share", order)
    axes[-1].set(ylim=(0, 1.02), ylabel="share of features (95% bootstrap CI)", title=f"({'d' if panels == 4 else 'c'}) classes")
    for ax in axes:  # one word a line: five populations' names overlap on one
        ax.set_xticks(ax.get_xticks(), [label.get_text().replace(" ", "\n") for label in ax.get_xticklabels()])
    fig.tight_layout()
    return fig


def plot_quantile_detection(curves: pd.DataFrame) -> plt.Figure:
    """Detection across activation quantiles (as delphi scores it): the best role's share in each bin of a
    feature's activating tokens, median and interquartile range over features, one line per population.
    ``curves``: population, quantile (1 = lowest bin), median, q25, q75."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for population, group in curves.groupby("population", sort=False):
        line = ax.plot(group["quantile"], group["median"], marker="o", label=population)[0]
        ax.fill_between(group["quantile"], group["q25"], group["q75"], color=line.get_color(), alpha=0.15)
    ax.set(
        xlabel="activation quantile bin of the activating tokens (highest last)",
        ylabel="best role's share (median, IQR)",
        ylim=(0, 1.02),
        title="detection across activation quantiles",
    )
    ax.set_xticks(sorted(curves["quantile"].unique()))
    ax.legend()
    fig.tight_layout()
    return fig


def plot_sae_training(history: pd.DataFrame) -> plt.Figure:
    """SAE training curves over steps: loss, FVU of each batch and dead latents (``history`` from
    ``sae.train_sae``). L0 is not drawn: BatchTopK holds its mean at k by construction (a flat line)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
    smooth = max(1, len(history) // 50)
    for ax, column, label in zip(axes, ("loss", "fvu", "dead"), ("loss (MSE + AuxK)", "FVU (batch)", "dead latents")):
        ax.plot(history["step"], history[column].rolling(smooth, min_periods=1).mean())
        ax.set(xlabel="step", title=label)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    return fig


def plot_splice(kl: pd.DataFrame, accuracy: pd.DataFrame) -> plt.Figure:
    """The splice test: (a) KL to the full adapter with no adapter vs the SAE reconstruction spliced in,
    (b) benchmark accuracy per variant. ``kl``: variant, kl, lo, hi; ``accuracy``: benchmark, variant,
    accuracy, lo, hi."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [0.8, 1.4]})
    axes[0].bar(
        kl["variant"],
        kl["kl"],
        yerr=error_bars(kl["kl"], kl["lo"], kl["hi"]),
        capsize=3,
        color=["tab:grey", "tab:purple"][: len(kl)],
    )
    axes[0].set(yscale="log", ylabel="KL(full || variant), nats/token", title="(a) teacher-forced, held-out traces")
    _grouped_bars(axes[1], accuracy, "benchmark", "variant", "accuracy")
    axes[1].set(ylim=(0, 1.05), ylabel="greedy accuracy (95% Wilson CI)", title="(b) benchmarks")
    fig.tight_layout()
    return fig


def plot_feature_donut(mass: pd.DataFrame, title: str = "SAE features: activation mass by category") -> plt.Figure:
    """Figure 3: a two-ring donut, inner ring = category, outer ring = subcategory, sized by activation
    mass, as the paper draws it. Categories are named in a legend with their shares (inner-ring labels of
    small slices piled on each other); a subcategory is labelled on the ring, with its share, when it holds
    at least 4% of the mass. ``mass``: columns category, subcategory, mass."""
    mass = mass[mass["mass"] > 0].sort_values(["category", "mass"], ascending=[True, False])
    inner = mass.groupby("category", sort=False)["mass"].sum()
    total = mass["mass"].sum()
    cmap = plt.get_cmap("tab10")
    colors = {c: cmap(i % 10) for i, c in enumerate(inner.index)}
    fig, ax = plt.subplots(figsize=(9, 7))
    wedges, _ = ax.pie(
        inner.values, radius=0.7, colors=[colors[c] for c in inner.index], wedgeprops=dict(width=0.35, edgecolor="white")
    )
    outer_labels = [f"{s} {m / total:.0%}" if m / total >= 0.04 else "" for s, m in zip(mass["subcategory"], mass["mass"])]
    ax.pie(
        mass["mass"],
        radius=1.0,
        colors=[(*colors[c][:3], 0.55) for c in mass["category"]],
        labels=outer_labels,
        labeldistance=1.06,
        rotatelabels=True,
        wedgeprops=dict(width=0.3, edgecolor="white"),
        textprops=dict(fontsize=7),
    )
    ax.legend(
        wedges,
        [f"{c} ({m / total:.0%})" for c, m in inner.items()],
        loc="center left",
        bbox_to_anchor=(1.12, 0.5),
        fontsize=8,
        title=f"{title}\n\ncategory (inner ring)",  # beside the ring: a title above it meets its labels
    )
    ax.set(aspect="equal")
    fig.tight_layout()
    return fig


def overlapping_labels(fig: plt.Figure) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of ``fig`` (tick labels, titles, legend entries, slice labels)
    whose drawn extents overlap, from matplotlib's own text extents after a draw."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    undrawn = set()  # labels of ticks outside an axis's view: located, never drawn
    for ax in fig.axes:
        for axis, (low, high) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - 1e-9 * abs(high - low) <= tick.get_loc() <= high + 1e-9 * abs(high - low):
                    undrawn.update(id(t) for t in (tick.label1, tick.label2))
    texts = [t for t in fig.findobj(plt.Text) if t.get_visible() and t.get_text().strip() and id(t) not in undrawn]
    boxes = [(t.get_text(), t.get_window_extent(renderer), _text_corners(t, renderer)) for t in texts]
    return [
        (a, b)
        for i, (a, box_a, corners_a) in enumerate(boxes)
        for b, box_b, corners_b in boxes[i + 1 :]
        if box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0 and _polygons_meet(corners_a, corners_b)
    ]


def _text_corners(text: plt.Text, renderer) -> np.ndarray:
    """The four corners of a text's drawn rectangle (rotated with it), in display units. matplotlib gives the
    axis-aligned box around the rotated rectangle (W, H); its sides (w, h) follow from W = w|cos| + h|sin|,
    H = w|sin| + h|cos|, about the same centre (at 45 degrees, where that has no solution, the box itself)."""
    box = text.get_window_extent(renderer)
    theta = np.deg2rad(text.get_rotation())
    c, s = abs(np.cos(theta)), abs(np.sin(theta))
    centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
    if abs(c * c - s * s) < 0.05:
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    w, h = np.linalg.solve([[c, s], [s, c]], [box.width, box.height])
    u, v = np.array([np.cos(theta), np.sin(theta)]) * w / 2, np.array([-np.sin(theta), np.cos(theta)]) * h / 2
    return np.array([centre - u - v, centre + u - v, centre + u + v, centre - u + v])


def _polygons_meet(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two convex polygons overlap (separating-axis test; touching edges do not count)."""
    for poly in (a, b):
        for i in range(len(poly)):
            edge = poly[(i + 1) % len(poly)] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() <= pb.min() + 1e-6 or pb.max() <= pa.min() + 1e-6:
                return False
    return True


def plot_shares_by_size(by_size: pd.DataFrame) -> plt.Figure:
    """Each class's share (95% interval) against the number of documents scored: a share that moves with
    the corpus cannot be compared with one measured on another. ``by_size``: documents, class, share, lo, hi."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, group in by_size.groupby("class", sort=False):
        group = group.sort_values("documents")
        ax.errorbar(
            group["documents"],
            group["share"],
            yerr=error_bars(group["share"], group["lo"], group["hi"]),
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set(
        xscale="log",
        xlabel="traces scored (log scale)",
        ylabel="share of features (95% CI)",
        ylim=(0, 1.02),
        title="class shares by corpus size",
    )
    ax.set_xticks(sorted(by_size["documents"].unique()), [f"{n:,}" for n in sorted(by_size["documents"].unique())])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
