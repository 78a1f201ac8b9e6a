"""`atlas.html`: a single self-contained page to explore a neuron atlas offline.

Type a token (or a word: case and surrounding spaces ignored, or a substring) and see the neurons that promote it,
ranked by score; click a neuron to see its top tokens. No network, no libraries: plain JavaScript over the atlas
embedded as compact JSON (a token dictionary, flat index and score arrays). Huge models are capped at
`max_rows` embedded (neuron, token) rows: fewer ranks per neuron first, then only the neurons with the highest
top-1 score; the page says so. The URL fragment `#q=dog&mode=word&n=3:17` pre-fills a search and opens a neuron,
so a link (or a headless browser) lands on a given view.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engramlab.results import write_text

MAX_ROWS = 600_000


def explorer_data(atlas, max_rows: int = MAX_ROWS) -> dict:
    """The compact JSON payload of the page."""
    n_total = atlas.n_neurons
    k = min(atlas.top_k, max(1, max_rows // max(n_total, 1)))
    ids = atlas.ids.reshape(n_total, -1)[:, :k]
    scores = atlas.scores.reshape(n_total, -1)[:, :k]
    probs = None if atlas.probs is None else atlas.probs.reshape(n_total, -1)[:, :k]
    keep = None
    if n_total > max_rows:  # keep the neurons whose top token is most strongly promoted
        rank_by = probs[:, 0] if probs is not None else scores[:, 0]
        keep = np.sort(np.argsort(-rank_by, kind="stable")[:max_rows])
        ids, scores = ids[keep], scores[keep]
        probs = None if probs is None else probs[keep]
    used, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    complete = keep is None and k == atlas.top_k
    note = ""
    if not complete:
        note = (
            f"This page embeds {ids.size:,} of the atlas's {n_total * atlas.top_k:,} rows (cap {max_rows:,}): "
            f"the top {k} of {atlas.top_k} tokens per neuron"
            + (
                f", for the {len(keep):,} of {n_total:,} neurons with the highest top-1 score"
                if keep is not None
                else ""
            )
            + ". atlas.parquet and `engramlab decode search` have everything."
        )
    return {
        "model": atlas.model,
        "site": atlas.site,
        "fold_norm": atlas.fold_norm,
        "L": atlas.n_layers,
        "N": atlas.n_neurons_per_layer,
        "ly": atlas.layer_ids,  # the model layer of each block of N neurons
        "K": atlas.top_k,
        "k": int(k),
        "complete": complete,
        "note": note,
        "tok": [atlas.token(int(i)) for i in used],
        "tid": used.tolist(),
        "n": None if keep is None else keep.tolist(),
        "t": inverse.reshape(-1).tolist(),
        "s": _round(scores),
        "p": None if probs is None else _round(probs),
    }


def _round(values: np.ndarray, digits: int = 4) -> list[float]:
    """Numbers to `digits` significant digits so that the JSON stays small."""
    flat = values.reshape(-1).astype(np.float64)
    return [float(f"{v:.{digits}g}") for v in flat.tolist()]


def render_explorer(atlas, max_rows: int = MAX_ROWS) -> tuple[str, dict]:
    data = explorer_data(atlas, max_rows)
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    title = f"Neuron atlas: {atlas.model or 'model'} ({atlas.site})"
    page = _PAGE.replace("__TITLE__", _html_escape(title)).replace("__DATA__", payload)
    info = {
        "file": "atlas.html",
        "rows_embedded": len(data["t"]),
        "neurons_embedded": len(data["n"]) if data["n"] is not None else atlas.n_neurons,
        "k_embedded": data["k"],
        "complete": data["complete"],
    }
    return page, info


def write_explorer(atlas, path: str | os.PathLike, max_rows: int = MAX_ROWS) -> dict:
    """Write the page atomically; return what it embeds."""
    page, info = render_explorer(atlas, max_rows)
    write_text(path, page)
    info["bytes"] = Path(path).stat().st_size
    return info


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem auto;max-width:1150px;padding:0 1rem;color:#1f2328}
h1{font-size:1.4rem;margin:.2rem 0} .meta{color:#57606a;font-size:.9rem} .note{background:#fff8c5;padding:.4rem .6rem;border-radius:4px}
.bar{display:flex;gap:.6rem;align-items:center;flex-wrap:wrap;margin:1rem 0}
input,select{font-size:1rem;padding:.3rem .5rem} #q{width:18rem}
.cols{display:flex;gap:1.5rem;align-items:flex-start} .cols>div{flex:1;min-width:0}
table{border-collapse:collapse;font-size:.9rem;width:100%} th,td{border-bottom:1px solid #eaeef2;padding:.2rem .5rem;text-align:left}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr.click{cursor:pointer} tbody tr.click:hover{background:#ddf4ff} tr.sel{background:#b6e3ff}
code{background:#f6f8fa;padding:0 .25rem;border-radius:3px;white-space:pre}
</style></head>
<body>
<h1>__TITLE__</h1>
<p class="meta" id="meta"></p>
<p class="note" id="note" hidden></p>
<div class="bar">
  <label>token <input id="q" placeholder='e.g. dog' autofocus></label>
  <select id="mode"><option value="word">word (ignore case and spaces)</option><option value="exact">exact token</option>
  <option value="contains">contains</option></select>
  <label>neuron <input id="goto" placeholder="layer:index" size="10"></label>
  <span class="meta" id="count"></span>
</div>
<div class="cols">
  <div><h2 style="font-size:1.1rem">Neurons that promote it</h2>
    <table id="results"><thead><tr><th>layer</th><th>neuron</th><th>rank</th><th>token</th><th>score</th><th class="pcol">prob</th></tr></thead><tbody></tbody></table></div>
  <div><h2 style="font-size:1.1rem" id="ntitle">Neuron</h2>
    <table id="neuron"><thead><tr><th>rank</th><th>token</th><th>id</th><th>score</th><th class="pcol">prob</th></tr></thead><tbody></tbody></table></div>
</div>
<script id="atlas-data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("atlas-data").textContent);
const LIMIT = 300;
const nKept = D.t.length / D.k;
const globalOf = i => D.n === null ? i : D.n[i];              // kept row -> layer*N + neuron
const rowOf = new Map(); if (D.n !== null) D.n.forEach((g, i) => rowOf.set(g, i));
const byTok = new Map();                                       // dictionary index -> entry indices
for (let e = 0; e < D.t.length; e++) { const t = D.t[e]; if (!byTok.has(t)) byTok.set(t, []); byTok.get(t).push(e); }
const show = s => JSON.stringify(s);
const fmt = x => x === null || x === undefined ? "" : (Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(3) : x.toPrecision(4));
const $ = id => document.getElementById(id);
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
function codeCell(tr, text) { const td = document.createElement("td"); const c = document.createElement("code"); c.textContent = text; td.appendChild(c); tr.appendChild(td); }
if (D.p === null) document.querySelectorAll(".pcol").forEach(e => e.remove());
$("meta").textContent = `${D.L} layers × ${D.N} neurons at site "${D.site}"${D.fold_norm ? " (final norm folded in)" : ""}, top ${D.K} tokens each; ${D.tok.length} distinct tokens embedded.`;
if (D.note) { $("note").textContent = D.note; $("note").hidden = false; }
const norm = s => s.trim().toLowerCase();
function matches(q, mode) {
  const out = [];
  if (!q) return out;
  const nq = norm(q), lq = q.toLowerCase();
  for (let i = 0; i < D.tok.length; i++) {
    const t = D.tok[i];
    if ((mode === "exact" && t === q) || (mode === "word" && norm(t) === nq) || (mode === "contains" && t.toLowerCase().includes(lq))) out.push(i);
  }
  return out;
}
let selected = null;
function search() {
  const q = $("q").value, mode = $("mode").value;
  const entries = [];
  for (const t of matches(q, mode)) for (const e of byTok.get(t) || []) entries.push(e);
  entries.sort((a, b) => D.s[b] - D.s[a] || globalOf(Math.floor(a / D.k)) - globalOf(Math.floor(b / D.k)));
  const body = $("results").tBodies[0]; body.textContent = "";
  for (const e of entries.slice(0, LIMIT)) {
    const g = globalOf(Math.floor(e / D.k)), layer = D.ly[Math.floor(g / D.N)], neuron = g % D.N;
    const tr = document.createElement("tr"); tr.className = "click"; tr.dataset.g = g;
    cell(tr, layer, "num"); cell(tr, neuron, "num"); cell(tr, e % D.k, "num"); codeCell(tr, show(D.tok[D.t[e]]));
    cell(tr, fmt(D.s[e]), "num"); if (D.p !== null) cell(tr, fmt(D.p[e]), "num");
    tr.addEventListener("click", () => openNeuron(g)); body.appendChild(tr);
  }
  $("count").textContent = q ? `${entries.length} neuron-token rows match` + (entries.length > LIMIT ? ` (showing ${LIMIT})` : "") : "";
}
function openNeuron(g) {
  const layer = D.ly[Math.floor(g / D.N)], neuron = g % D.N;
  const i = D.n === null ? g : rowOf.get(g);
  const body = $("neuron").tBodies[0]; body.textContent = "";
  $("ntitle").textContent = `Neuron ${layer}:${neuron}`;
  if (i === undefined || i < 0 || i >= nKept) { $("ntitle").textContent += " (not embedded in this page)"; return; }
  for (let r = 0; r < D.k; r++) {
    const e = i * D.k + r, tr = document.createElement("tr");
    cell(tr, r, "num"); codeCell(tr, show(D.tok[D.t[e]])); cell(tr, D.tid[D.t[e]], "num"); cell(tr, fmt(D.s[e]), "num");
    if (D.p !== null) cell(tr, fmt(D.p[e]), "num");
    body.appendChild(tr);
  }
  document.querySelectorAll("#results tr.sel").forEach(r => r.classList.remove("sel"));
  document.querySelectorAll(`#results tr[data-g="${g}"]`).forEach(r => r.classList.add("sel"));
  selected = g;
}
function gotoNeuron(spec) {
  const m = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(spec);
  const block = m ? D.ly.indexOf(+m[1]) : -1;
  if (block >= 0 && +m[2] < D.N) openNeuron(block * D.N + +m[2]);
}
$("q").addEventListener("input", search); $("mode").addEventListener("change", search);
$("goto").addEventListener("change", e => gotoNeuron(e.target.value));
const h = new URLSearchParams(location.hash.slice(1));
if (h.has("mode")) $("mode").value = h.get("mode");
if (h.has("q")) { $("q").value = h.get("q"); search(); }
if (h.has("n")) { $("goto").value = h.get("n"); gotoNeuron(h.get("n")); }
</script>
</body></html>
"""
