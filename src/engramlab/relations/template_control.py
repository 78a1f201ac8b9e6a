"""Template control: does a relation unit read the subject, or the template's words? (issue 5; paper 1 has none)

Paper 1 §2.2 scores a unit by the AP of its output averaged over all prompt tokens. Templates differ between
relations ("'s CEO is" vs "plays the sport of"), so a unit that merely detects a template word separates a
relation's prompts as well as one that knows the relation — on a small organism the top units were mostly such
detectors (issue 5's calibration: AP 0.91-0.93 from template tokens, 0.35-0.38 from subject tokens).

For each relation's top units (the first `top` of its selected set) this recomputes AP on the same positives and
negatives as `relations find` (validated P_det, the same seeded 4x negatives), from three pooled responses:
- `ap_all`: mean over every real token, BOS included (paper 1's response);
- `ap_subject`: mean over the subject's tokens only (tokens overlapping its characters);
- `ap_template`: mean over the other text tokens (the template's words; BOS and padding excluded).
`ap` is the unit's selection score, from whichever `--response` find used. For `--units channels` each AP is
the better of the gate and up neurons', as in `units.channel_scores`.

Caveat: the split is by position, not by information. Template tokens after the subject attend to it, so a
high `ap_template` means "the unit separates the relation at template positions", which includes reading the
subject through attention there; a high `ap_subject` with a chance `ap_template` is the clean subject reading.

Label (engramlab's rule): a unit is a "template" detector when ap_template - ap_subject > TEMPLATE_MARGIN, a
"subject" detector when ap_subject - ap_template > TEMPLATE_MARGIN, otherwise "mixed". The margin (0.1, half
the distance from chance 0.2 to a weak 0.4) keeps units that are near chance on both sides out of either class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engramlab.distributed import map_batches
from engramlab.models.loading import LoadedModel
from engramlab.relations.ap import average_precision
from engramlab.relations.find import FindResult
from engramlab.relations.prompts import PromptSet
from engramlab.relations.tokens import encode, subject_and_template
from engramlab.relations.units import UnitSpace, source_neurons

TEMPLATE_MARGIN = 0.1
POOLINGS = ("all", "subject", "template")
DEFAULT_TOP = 100


@dataclass
class TemplateControl:
    """Per-unit rows (relation, rank, unit, layer, site, index, ap, ap_all, ap_subject, ap_template, detector),
    per-relation medians and shares, and the headline numbers."""

    rows: list[dict]
    per_relation: dict[str, dict]
    summary: dict


@torch.inference_mode()
def pooled_responses(
    loaded: LoadedModel,
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    space: UnitSpace,
    ids: np.ndarray,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Responses of the units `ids` of `space` to each text, averaged over all real tokens ("all"), over the
    tokens of the character span `spans[i]` ("subject") and over the other text tokens ("template").
    Returns {pooling: float32 [P, U]}; one forward per batch records the three poolings at once."""
    ids = np.asarray(ids, dtype=np.int64)
    layer, site, index = space.locate(ids)
    columns: dict[tuple[str, int], tuple[np.ndarray, torch.Tensor]] = {}  # key -> (output columns, site indices)
    for key in sorted({(s, int(lay)) for s, lay in zip(site, layer, strict=True)}):
        cols = np.flatnonzero((site == key[0]) & (layer == key[1]))
        columns[key] = (cols, torch.as_tensor(index[cols]))
    keys = list(columns)  # (site, layer) pairs: not every layer has every site (non-gated or MLP-less layers)
    tokenizer = loaded.require_tokenizer()

    def run(start: int) -> list[np.ndarray]:
        stop = min(start + batch_size, len(texts))
        batch, offsets = encode(tokenizer, texts[start:stop], loaded.device, offsets=True)
        subject, template = subject_and_template(offsets, batch["attention_mask"], spans[start:stop])  # [B, L] each
        hooks = loaded.hooks
        # Three recordings of the same sites; the innermost ends the forward after the last one has fired.
        with (
            hooks.record(keys, positions="nonpad", reduce="mean") as rec_all,
            hooks.record(keys, positions=subject, reduce="mean") as rec_subject,
            hooks.record(keys, positions=template, reduce="mean", stop=True) as rec_template,
        ):
            loaded.model(**batch)
        pooled = []
        for rec in (rec_all, rec_subject, rec_template):
            block = np.empty((stop - start, ids.size), dtype=np.float32)  # [B, U]
            for key, (cols, within) in columns.items():
                block[:, cols] = rec[key][:, within.to(rec[key].device)].float().cpu().numpy()
            pooled.append(block)
        return pooled

    starts = range(0, len(texts), batch_size)
    blocks = map_batches(starts, run, "template control")  # per batch: [B, U] for each pooling
    return {
        p: np.concatenate([b[i] for b in blocks]) if blocks else np.empty((0, ids.size), np.float32)
        for i, p in enumerate(POOLINGS)
    }


def template_control(
    loaded: LoadedModel,
    found: FindResult,
    validated: PromptSet,
    rows_per_relation: list[tuple[np.ndarray, np.ndarray]],
    top: int = DEFAULT_TOP,
    batch_size: int = 32,
) -> TemplateControl:
    """Subject-only vs template-only AP of each relation's top `top` units (at most its k selected units).
    `validated` and `rows_per_relation` are find's validated P_det and (positive, negative) rows
    (`find.load_identification` and `find.sample_rows` rebuild them from a find folder)."""
    neuron_space = UnitSpace(loaded.layout, "neurons", found.layers)
    space = UnitSpace(loaded.layout, found.units, found.layers)
    n_top = min(top, found.k)
    tops = {name: found.top(name, n_top) for name in found.relations}
    sources = {name: source_neurons(neuron_space, space, ids) for name, ids in tops.items()}
    needed = np.unique(np.concatenate([neurons for neurons, _ in sources.values()]))
    responses = pooled_responses(loaded, validated.text, validated.subject_spans(), neuron_space, needed, batch_size)

    rows, per_relation = [], {}
    for r, name in enumerate(found.relations):
        pos, neg = rows_per_relation[r]
        if pos.size == 0 or neg.size == 0:
            continue
        prompts = np.concatenate([pos, neg])
        labels = torch.cat([torch.ones(pos.size), torch.zeros(neg.size)])
        neurons, owner = sources[name]
        cols = np.searchsorted(needed, neurons)
        ids = tops[name]
        ap = {}
        for pooling in POOLINGS:
            scores = torch.from_numpy(responses[pooling][np.ix_(prompts, cols)])  # [P_r, n_neurons]
            by_neuron = average_precision(scores, labels).numpy()
            by_unit = np.full(ids.size, -np.inf)
            np.maximum.at(by_unit, owner, by_neuron)  # a channel scores as its better neuron
            ap[pooling] = by_unit
        layer, site, index = space.locate(ids)
        detector = np.where(
            ap["template"] - ap["subject"] > TEMPLATE_MARGIN,
            "template",
            np.where(ap["subject"] - ap["template"] > TEMPLATE_MARGIN, "subject", "mixed"),
        )
        selected = found.ap[r, ids].astype(np.float64)
        for i in range(ids.size):
            rows.append(
                {
                    "relation": name,
                    "rank": i + 1,
                    "unit": int(ids[i]),
                    "layer": int(layer[i]),
                    "site": str(site[i]),
                    "index": int(index[i]),
                    "ap": float(selected[i]),
                    "ap_all": float(ap["all"][i]),
                    "ap_subject": float(ap["subject"][i]),
                    "ap_template": float(ap["template"][i]),
                    "detector": str(detector[i]),
                }
            )
        per_relation[name] = _medians(selected, ap, detector)
    every = [r["detector"] for r in rows]
    summary = {
        "top": n_top,
        "margin": TEMPLATE_MARGIN,
        "n_units": len(rows),
        "median_ap": _median([r["ap"] for r in rows]),
        "median_ap_subject": _median([r["ap_subject"] for r in rows]),
        "median_ap_template": _median([r["ap_template"] for r in rows]),
        "share_template_detectors": every.count("template") / len(every) if every else None,
        "share_subject_detectors": every.count("subject") / len(every) if every else None,
        "per_relation": per_relation,
    }
    return TemplateControl(rows=rows, per_relation=per_relation, summary=summary)


def _median(values) -> float | None:
    return float(np.median(values)) if len(values) else None


def _medians(selected: np.ndarray, ap: dict[str, np.ndarray], detector: np.ndarray) -> dict:
    return {
        "n_units": int(selected.size),
        "median_ap": float(np.median(selected)),
        "median_ap_all": float(np.median(ap["all"])),
        "median_ap_subject": float(np.median(ap["subject"])),
        "median_ap_template": float(np.median(ap["template"])),
        "share_template_detectors": float(np.mean(detector == "template")),
        "share_subject_detectors": float(np.mean(detector == "subject")),
    }
