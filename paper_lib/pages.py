"""Feature pages: self-contained HTML (inline CSS and script, no network) that lists features and shows
each one's top examples as token heatmaps, written beside the figures (notebooks 04 and 06)."""

from __future__ import annotations

import html
import json
import unicodedata
from pathlib import Path

from paper_lib.paths import figures_dir


def readable_token(token: str) -> str:
    """A token as the page shows it: newlines, tabs and carriage returns as visible marks, other control
    and invisible characters as escapes (a byte-level BPE piece of a multi-byte character stays �)."""
    marks = {"\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}
    return "".join(
        marks.get(c) or (f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c) for c in token
    )


def _heat(tokens: list[str], values: list[float], center: int, scale: float) -> str:
    """One example as a token heatmap: each token shaded by its activation over ``scale``, the activating
    token outlined (class ``c``)."""
    spans = []
    for i, (tok, val) in enumerate(zip(tokens, values)):
        alpha = max(0.0, min(1.0, val / scale)) if scale > 0 else 0.0
        text = html.escape(readable_token(tok)) or "&nbsp;"
        border = ' class="c" style="outline:1px solid #000;' if i == center else ' style="'
        spans.append(f'<span{border}background:rgba(230,80,0,{alpha:.2f})" title="{val:.3f}">{text}</span>')
    return "".join(spans)


def pick_features(features: list[dict], n: int = 3, key: str = "beyond", prefer: str = "monosemantic") -> list[dict]:
    """``n`` features to show on the notebook's page: those of class ``prefer`` first, highest ``key`` tag
    first (then any others), so the page shows what the figure counts."""

    def rank(f: dict) -> tuple:
        tags = f.get("tags", {})
        value = tags.get(key)
        return (tags.get("class") != prefer, -(value if isinstance(value, (int, float)) and value == value else -1.0))

    return sorted(features, key=rank)[:n]


def features_html(features: list[dict], examples: int = 5) -> str:
    """HTML for the notebook's page: each feature's name and tags, then its top ``examples`` as token
    heatmaps (the activating token outlined), as the feature page shows them."""
    blocks = []
    for feature in features:
        shown = feature.get("examples", [])[:examples]
        scale = max((e["values"][e["center"]] for e in shown), default=0.0)
        tags = ", ".join(f"{k} {v}" for k, v in feature.get("tags", {}).items() if k not in ("layer", "module"))
        rows = "".join(
            f'<div style="font-family:monospace;white-space:pre">{e["values"][e["center"]]:8.3f}  '
            f"{_heat(e['tokens'], e['values'], e['center'], scale)}</div>"
            for e in shown
        )
        blocks.append(f"<p><b>{html.escape(feature['name'])}</b> ({html.escape(tags)})</p>{rows}")
    return "".join(blocks)


def feature_page_html(features: list[dict], title: str, intro: str = "", run: dict | None = None) -> str:
    """A self-contained HTML page (inline CSS and script, no network): a sortable, filterable list of
    features and each feature's top examples as token heatmaps.

    Each feature: ``name``, optional ``summary`` (text), ``examples`` (``tokens``, ``values``,
    ``center``), ``histogram`` (``edges``, ``counts``), ``logits`` (list of [token, value]) and ``tags``
    (e.g. class, role, layer, module, polarity, precision): text tags become filters, numeric ones sort
    keys. Polarity is read from a trailing +/- of the name when not tagged. ``run`` (notebook, commit,
    parameters) is named at the top. The URL's hash sets the controls (``#class=broad&sort=precision``),
    so a view can be linked."""

    heat = _heat

    blocks, meta = [], []
    for n, feature in enumerate(features):
        tags = dict(feature.get("tags", {}))
        if "polarity" not in tags and feature["name"][-1:] in "+-":
            tags["polarity"] = feature["name"][-1]
        examples = feature.get("examples", [])
        scale = max((e["values"][e["center"]] for e in examples), default=0.0)
        tags.setdefault("top activation", round(scale, 4))
        rows = "".join(
            f'<div class="ex"><span class="v">{e["values"][e["center"]]:.3f}</span>'
            f"{heat(e['tokens'], e['values'], e['center'], scale)}</div>"
            for e in examples
        )
        extra = ""
        if feature.get("histogram"):
            counts, edges = feature["histogram"]["counts"], feature["histogram"]["edges"]
            top = max(counts) or 1
            bars = "".join(
                f'<div class="bar" style="height:{60 * c / top:.0f}px" title="[{lo:.3g}, {hi:.3g}): {c}"></div>'
                for c, lo, hi in zip(counts, edges[:-1], edges[1:])
            )
            extra += (
                f'<h4>activation histogram (non-zero)</h4><div class="axis">{top:,} tokens</div>'
                f'<div class="hist">{bars}</div><div class="xaxis"><span>{edges[0]:.3g}</span>'
                f"<span>activation</span><span>{edges[-1]:.3g}</span></div>"
            )
        if feature.get("logits"):
            cells = "".join(
                f"<tr><td>{html.escape(readable_token(str(t)))}</td><td>{v:+.3f}</td></tr>" for t, v in feature["logits"]
            )
            extra += f"<h4>{html.escape(feature.get('logits_label', 'top logit effects'))}</h4><table>{cells}</table>"
        shown_tags = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in tags.items())
        blocks.append(
            f'<section id="f{n}" class="feat"><h3>{html.escape(feature["name"])}</h3><p class="tags">{shown_tags}</p>'
            f"<p>{html.escape(feature.get('summary', ''))}</p>{rows or '<p>(no activating examples)</p>'}{extra}</section>"
        )
        meta.append(
            {
                "id": f"f{n}",
                "name": feature["name"],
                "text": (feature["name"] + " " + feature.get("summary", "")).lower(),
                "tags": tags,
            }
        )
    text_tags = sorted({k for m in meta for k, v in m["tags"].items() if isinstance(v, str)})
    number_tags = sorted(
        {k for m in meta for k, v in m["tags"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    filters = "".join(
        f'<label>{html.escape(k)} <select class="f" data-tag="{html.escape(k)}"><option value="">any</option>'
        + "".join(f"<option>{html.escape(v)}</option>" for v in sorted({str(m["tags"][k]) for m in meta if k in m["tags"]}))
        + "</select></label>"
        for k in text_tags
    )
    sorts = '<option value="name">name</option>' + "".join(f"<option>{html.escape(k)}</option>" for k in number_tags)
    columns = ["name", *text_tags, *number_tags]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f'<tr data-id="{m["id"]}">'
        + "".join(f"<td>{html.escape(str(m['name'] if c == 'name' else m['tags'].get(c, '')))}</td>" for c in columns)
        + "</tr>"
        for m in meta
    )
    made_by = ""
    if run:
        params = ", ".join(f"{k}={v}" for k, v in (run.get("parameters") or {}).items())
        made_by = (
            f'<details class="run"><summary>made by {html.escape(str(run.get("notebook", "")))} at commit '
            f"{html.escape(str(run.get('commit', 'unknown')))}</summary>parameters: {html.escape(params)}</details>"
        )
    legend = (
        '<div class="legend"><span class="grad"></span> activation, from 0 to the feature\'s largest (per feature); '
        '<span class="c">outlined</span>: the token the example is centred on; ↵ newline, ⇥ tab, \\xNN a control '
        "character; the number before each row is the centre token's activation; hover a token for its value.</div>"
    )
    style = (
        "body{font-family:sans-serif;margin:1em}.ex{font-family:monospace;white-space:pre;margin:2px 0}"
        ".v{display:inline-block;width:5em;color:#555}.c{outline:2px solid #333}.feat{display:none}"
        ".hist{display:flex;align-items:flex-end;height:62px;gap:1px;width:240px;border-left:1px solid #999;"
        "border-bottom:1px solid #999}.bar{flex:1;background:#e65000}"
        ".xaxis{display:flex;justify-content:space-between;width:240px;font-size:11px}"
        ".axis{font-size:11px;color:#555}td,th{padding:0 8px;font-family:monospace;text-align:left}"
        "#list{max-height:22em;overflow-y:auto;display:block;border:1px solid #ccc;margin:0.5em 0}"
        "#list tr{cursor:pointer}#list tr.sel{background:#fde3d0}.tags{color:#555;font-size:13px}"
        ".controls label{margin-right:1em}.run{color:#555;font-size:12px}"
        ".grad{display:inline-block;width:80px;height:10px;background:linear-gradient(90deg,rgba(230,80,0,0),"
        "rgba(230,80,0,1))}.legend{font-size:13px;margin:0.5em 0}"
    )
    script = (
        "const META=" + json.dumps(meta).replace("</", "<\\/") + ";"
        "const rows=[...document.querySelectorAll('#list tbody tr')];"
        "function show(id){for(const s of document.querySelectorAll('.feat'))s.style.display='none';"
        "for(const r of rows)r.classList.toggle('sel',r.dataset.id===id);"
        "const e=id&&document.getElementById(id);if(e)e.style.display='block';}"
        "function apply(){const q=document.getElementById('q').value.toLowerCase();"
        "const want={};for(const s of document.querySelectorAll('select.f'))if(s.value)want[s.dataset.tag]=s.value;"
        "const key=document.getElementById('sort').value,desc=document.getElementById('desc').checked;"
        "const byId=Object.fromEntries(META.map(m=>[m.id,m]));"
        "const val=r=>key==='name'?byId[r.dataset.id].name:byId[r.dataset.id].tags[key];"
        "const shown=rows.filter(r=>{const m=byId[r.dataset.id];if(q&&!m.text.includes(q))return false;"
        "for(const [k,v] of Object.entries(want))if(String(m.tags[k])!==v)return false;return true;});"
        "shown.sort((a,b)=>{const x=val(a),y=val(b);if(x===undefined)return 1;if(y===undefined)return -1;"
        "const c=typeof x==='number'?x-y:String(x).localeCompare(String(y),undefined,{numeric:true});return desc?-c:c;});"
        "const body=document.querySelector('#list tbody');for(const r of rows)r.style.display='none';"
        "for(const r of shown){r.style.display='';body.appendChild(r);}"
        "document.getElementById('count').textContent=shown.length+' of '+rows.length+' features';"
        "show(shown.length?shown[0].dataset.id:null);}"
        "const h=new URLSearchParams(location.hash.slice(1));"
        "for(const s of document.querySelectorAll('select.f'))if(h.has(s.dataset.tag))s.value=h.get(s.dataset.tag);"
        "if(h.has('sort'))document.getElementById('sort').value=h.get('sort');"
        "if(h.has('desc'))document.getElementById('desc').checked=h.get('desc')==='1';"
        "if(h.has('q'))document.getElementById('q').value=h.get('q');"
        "for(const el of document.querySelectorAll('.controls select,.controls input'))el.addEventListener('input',apply);"
        "for(const r of rows)r.addEventListener('click',()=>show(r.dataset.id));"
        "apply();"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{style}</style>'
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{made_by}{legend}"
        f'<div class="controls"><label>search <input id="q" type="search"></label>{filters}'
        f'<label>sort by <select id="sort">{sorts}</select></label><label><input id="desc" type="checkbox"> '
        f'descending</label> <span id="count"></span></div>'
        f'<table id="list"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{"".join(blocks)}'
        f"<script>{script}</script></body></html>\n"
    )


def save_html(page: str, name: str) -> Path:
    """Write ``<figures>/<name>.html``."""
    if not name or "/" in name or name.endswith(".html"):
        raise ValueError(f"page name {name!r} must be a bare file stem")
    from paper_lib.results import note_figure

    path = figures_dir() / f"{name}.html"
    path.write_text(page)
    note_figure(f"{name}.html")
    return path


def notebook_heading(section: str) -> tuple[str, str]:
    """A notebook's title and one-sentence claim, as its first markdown cell states them."""
    from paper_lib.run_notebooks import NOTEBOOK_DIR

    source = NOTEBOOK_DIR / f"{section}.py"
    if not source.is_file():
        return section, ""
    lines = [line.removeprefix("#").strip() for line in source.read_text().splitlines() if line.startswith("#")]
    title = next((line[2:] for line in lines if line.startswith("# ")), section)
    start = next((i for i, line in enumerate(lines) if line.startswith("**Claim:**")), None)
    if start is None:
        return title, ""
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))  # the paragraph: to its blank line
    return title, " ".join(lines[start:end]).replace("**Claim:**", "").strip()


def _inline_markdown(text: str) -> str:
    """Escaped text with **bold** and `code` kept (all the summary's prose uses)."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def summary_page_html(headlines: dict) -> str:
    """Every notebook's claim, what its run saw, each recorded verdict with its number, 95% interval and n,
    and its figures (``figures/index.html``; generated from ``headline_numbers.json``, the run's own
    record, by ``write_summary_page``)."""
    colours = {"reproduced": "#1a7f37", "not reproduced": "#cf222e", "cannot decide": "#9a6700"}
    parts = []
    for section, entries in headlines.items():
        if section.startswith("all_") or not isinstance(entries, dict):
            continue
        run = entries.get("_run", {})
        title, claim = notebook_heading(section)
        rows = []
        for key, entry in entries.items():
            if key.startswith("_") or "verdict" not in entry:
                continue
            ci = entry.get("ci95")
            interval = f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""
            word = entry["verdict"]
            rows.append(
                f"<tr><td><code>{html.escape(key)}</code></td><td>{entry['value']:.3g}</td><td>{interval}</td>"
                f'<td>{entry.get("n", "")}</td><td style="color:{colours.get(word, "#000")}"><b>{html.escape(word)}</b></td></tr>'
            )
        table = (
            "<table><tr><th>claim</th><th>value</th><th>95% interval</th><th>n</th><th>verdict</th></tr>"
            + "".join(rows)
            + "</table>"
            if rows
            else ""
        )
        said = "".join(f"<p>{_inline_markdown(text)}</p>" for text in run.get("said", []))
        figures = "".join(
            f'<p><a href="{html.escape(name)}">{html.escape(name)}</a></p>'
            if name.endswith(".html")
            else f'<figure><img src="{html.escape(name)}.png" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
            for name in run.get("figures", [])
        )
        commit = f'<p class="run">commit {html.escape(str(run.get("commit", "unknown")))}</p>'
        parts.append(
            f'<section id="{html.escape(section)}"><h2>{html.escape(title)}</h2><p><i>{_inline_markdown(claim)}</i></p>'
            f"{commit}{said}{table}{figures}</section>"
        )
    toc = "".join(
        f'<li><a href="#{html.escape(s)}">{html.escape(notebook_heading(s)[0])}</a></li>'
        for s in headlines
        if not s.startswith("all_")
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}img{max-width:100%;max-height:380px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}.run{color:#666}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Results</title><style>{style}</style></head><body>'
        "<h1>Rank-1 LoRAs encode interpretable reasoning signals: results of the last main run</h1>"
        "<p>Every claim the notebooks judge, with its number, interval and verdict (reproduced: the interval lies "
        "inside the paper's range; not reproduced: wholly outside; cannot decide: otherwise), what each run saw, "
        f"and its figures. Generated from <code>headline_numbers.json</code>.</p><ol>{toc}</ol>{''.join(parts)}</body></html>\n"
    )


def write_summary_page(headline_file: Path | None = None) -> Path:
    """``index.html`` beside the headline numbers it is made from (the figures folder)."""
    from paper_lib.results import headline_path, load_headlines

    path = Path(headline_file or headline_path())
    page = path.parent / "index.html"
    page.write_text(summary_page_html(load_headlines(path)))
    return page


if __name__ == "__main__":
    import sys

    sys.stdout.write(f"{write_summary_page(Path(sys.argv[1]) if len(sys.argv) > 1 else None)}\n")
