"""Prompt sets of paper 1 (§2.1-2.2): identification prompts P_det and evaluation prompts P_eva.

- P_det: the `select` subjects of each relation rendered with its *selection* templates, later filtered to the
  prompts the model answers correctly (two-token prefix match).
- P_eva: the disjoint `eval` subjects (50 per relation) rendered with the selection templates ("seen") and with
  the held-out templates that neuron selection never saw ("heldout"). P_eva is not filtered (paper §2.2).

Which templates are held out is the template control engramlab adds to the paper (issue 5): by default the frames
that `engramlab.data.facts.FRAMES` marks "heldout" (p1b, stmt2); `split_templates` lets a user hold out any frames
(`--heldout-templates p1,qa`) or none (`--heldout-templates none`: the paper's protocol, selection on every
trained template). Frames marked "unseen" (zs, never trained) stay out of selection unless named as held out.

A user's own relation comes from an LRE-format JSON file (`--relation-file`): `{"name": ..., "prompt_templates":
["{} is headquartered in", ...], "samples": [{"subject": ..., "object": ...}, ...]}`. Its first templates are
used for selection and its last one is held out; each becomes a paper-style "? Answer:" prompt too.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engramlab.data.facts import Fact, Relation, Template, split_subjects
from engramlab.data.loaders import read_json, read_json_records
from engramlab.data.multilingual import relation_in
from engramlab.errors import EngramError

PROMPT_COLUMNS = ("relation", "prompt", "gold", "subject", "subject_start", "frame", "template_split")


@dataclass
class PromptSet:
    """Parallel columns, one entry per prompt."""

    text: list[str]
    gold: list[str]
    relation: np.ndarray  # str
    subject: list[str]
    frame: np.ndarray  # template frame name
    split: np.ndarray  # "selection" | "heldout"
    subject_start: np.ndarray  # int: character offset of the subject in `text`

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, index: np.ndarray) -> PromptSet:
        return PromptSet(
            [self.text[i] for i in index],
            [self.gold[i] for i in index],
            self.relation[index],
            [self.subject[i] for i in index],
            self.frame[index],
            self.split[index],
            self.subject_start[index],
        )

    def subject_spans(self) -> list[tuple[int, int]]:
        """Character span `[start, end)` of the subject in each prompt."""
        return [(int(s), int(s) + len(subj)) for s, subj in zip(self.subject_start, self.subject, strict=True)]

    def rows(self) -> dict[str, list]:
        return {
            "relation": self.relation.tolist(),
            "prompt": self.text,
            "gold": self.gold,
            "subject": self.subject,
            "subject_start": self.subject_start.tolist(),
            "frame": self.frame.tolist(),
            "template_split": self.split.tolist(),
        }

    @classmethod
    def from_rows(cls, rows: dict[str, list], where: str) -> PromptSet:
        """The inverse of `rows()` (a table read back from parquet); `where` names the source in errors."""
        missing = [c for c in PROMPT_COLUMNS if c not in rows]
        if missing:
            raise EngramError(
                f"{where} has no column {missing[0]!r}: it was written by an older engramlab; "
                "run `relations find` again."
            )
        text_columns = [c for c in PROMPT_COLUMNS if c != "subject_start"]
        bad = [c for c in text_columns if not all(isinstance(v, str) for v in rows[c])]
        if bad or not all(isinstance(v, int) and v >= 0 for v in rows["subject_start"]):
            column = bad[0] if bad else "subject_start"
            raise EngramError(f"{where}: column {column!r} holds values of the wrong type; run `relations find` again.")
        return cls(
            list(rows["prompt"]),
            list(rows["gold"]),
            np.array(rows["relation"], dtype=object),
            list(rows["subject"]),
            np.array(rows["frame"], dtype=object),
            np.array(rows["template_split"], dtype=object),
            np.array(rows["subject_start"], dtype=np.int64),
        )

    def where(self, relation: str | None = None, split: str | None = None) -> np.ndarray:
        keep = np.ones(len(self), dtype=bool)
        if relation is not None:
            keep &= self.relation == relation
        if split is not None:
            keep &= self.split == split
        return np.flatnonzero(keep)


def _build(items: Iterable[tuple[str, Fact, Template]]) -> PromptSet:
    items = list(items)
    return PromptSet(
        text=[t.prompt(f.subject) for _, f, t in items],
        gold=[f.object for _, f, _ in items],
        relation=np.array([r for r, _, _ in items], dtype=object),
        subject=[f.subject for _, f, _ in items],
        frame=np.array([t.frame for _, _, t in items], dtype=object),
        split=np.array([t.split for _, _, t in items], dtype=object),
        subject_start=np.array([t.text.index("{}") for _, _, t in items], dtype=np.int64),
    )


def identification_prompts(relations: dict[str, Relation], max_per_relation: int | None, seed: int) -> PromptSet:
    """Candidate P_det: select subjects x selection templates, at most `max_per_relation` (seeded sample)."""
    items = []
    for name, rel in relations.items():
        pairs = [(f, t) for f in rel.facts_in("select") for t in rel.selection_templates]
        if max_per_relation is not None and len(pairs) > max_per_relation:
            pairs = random.Random(f"{seed}:{name}").sample(pairs, max_per_relation)
        items.extend((name, f, t) for f, t in pairs)
    return _build(items)


def evaluation_prompts(
    relations: dict[str, Relation], splits: tuple[str, ...] = ("selection", "heldout"), max_subjects: int | None = None
) -> PromptSet:
    """P_eva: eval subjects x templates of the given splits (selection templates are reported as "seen")."""
    items = []
    for name, rel in relations.items():
        facts = rel.facts_in("eval")
        if max_subjects is not None:
            facts = sorted(facts, key=lambda f: f.subject)[:max_subjects]
        items.extend((name, f, t) for f in facts for split in splits for t in rel.templates_in(split))
    return _build(items)


def template_frames(relations: dict[str, Relation]) -> list[str]:
    """Every template frame of the relations, in first-seen order."""
    return list(dict.fromkeys(t.frame for rel in relations.values() for t in rel.templates))


def frames_in(relations: dict[str, Relation], split: str) -> list[str]:
    """The frames that some relation uses with template split `split` ("selection" or "heldout")."""
    return list(dict.fromkeys(t.frame for rel in relations.values() for t in rel.templates if t.split == split))


def split_templates(relations: dict[str, Relation], heldout: str | None) -> dict[str, Relation]:
    """Relations whose templates are re-split by `--heldout-templates` (new objects; shipped ones are cached).

    `heldout`: None or "default" keeps each template's own split; "none" puts every trained template in selection
    (paper 1's protocol); a comma list of frames holds those out and selects on every other trained frame.
    """
    if heldout is None or heldout.strip() in ("", "default"):
        return dict(relations)
    names = [n.strip() for n in heldout.split(",") if n.strip()]
    known = template_frames(relations)
    if "none" in names:
        if len(names) > 1:
            raise EngramError(f"--heldout-templates {heldout!r}: 'none' cannot be combined with template frames.")
        names = []
    else:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise EngramError(
                f"--heldout-templates: unknown template frame {unknown[0]!r}; choose 'none' or frames "
                f"from: {', '.join(known)}."
            )
    chosen = set(names)

    def split_of(t: Template) -> str:
        if t.frame in chosen:
            return "heldout"
        return "unseen" if t.split == "unseen" else "selection"

    out = {}
    for name, rel in relations.items():
        templates = [dataclasses.replace(t, split=split_of(t)) for t in rel.templates]
        if not any(t.split == "selection" for t in templates):
            raise EngramError(f"--heldout-templates {heldout}: relation {name!r} keeps no template for selection.")
        out[name] = dataclasses.replace(rel, templates=templates)
    return out


def load_relations_for_study(
    names: Iterable[str] | None, relation_files: Iterable[str | os.PathLike] = (), language: str = "en"
) -> dict[str, Relation]:
    """The study's relations: named shipped relations plus relations read from user files."""
    relations = {name: relation_in(name, language) for name in (names or [])}
    for path in relation_files:
        rel = load_relation_file(path)
        relations[rel.name] = rel
    if len(relations) < 2:
        raise EngramError("paper 1 needs at least two relations (negatives come from the other relations).")
    return relations


RELATION_FILE_HINT = "check the --relation-file path and its LRE format"


def _bad(text: str) -> bool:
    """True for strings that cannot be written as UTF-8 (JSON's lone surrogate escapes like \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def load_relation_file(path: str | os.PathLike) -> Relation:
    """A relation from an LRE-format JSON file, with one-line errors naming the file and the field."""
    path = Path(path)
    obj = read_json(path, RELATION_FILE_HINT)
    if not isinstance(obj, dict):
        raise EngramError(f"{path}: expected a JSON object with 'name', 'prompt_templates' and 'samples'.")
    templates = obj.get("prompt_templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise EngramError(f"{path}: field 'prompt_templates' must be a non-empty list of strings.")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise EngramError(f"{path}: field 'prompt_templates': template {bad[0]!r} must contain '{{}}' exactly once.")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise EngramError(f"{path}: field 'name' must be a non-empty string.")
    records = read_json_records(path, "samples", ("subject", "object"), RELATION_FILE_HINT)
    unencodable = [t for t in [name, *templates, *(r[f] for r in records for f in ("subject", "object"))] if _bad(t)]
    if unencodable:
        raise EngramError(f"{path}: {unencodable[0]!r} is not valid Unicode text (a lone surrogate escape?).")
    seen, facts = set(), []
    for r in records:
        subject, obj_ = r["subject"].strip(), r["object"].strip()
        if subject not in seen:
            seen.add(subject)
            facts.append(Fact(subject, obj_))
    if len(facts) < 10:
        raise EngramError(f"{path}: field 'samples' has {len(facts)} distinct subjects; at least 10 are needed.")
    key = name.strip().replace(" ", "_")
    rendered = []
    for i, t in enumerate(templates):
        split = "heldout" if len(templates) > 1 and i == len(templates) - 1 else "selection"
        stem = t.strip().rstrip("?").strip()
        rendered.append(Template(f"{stem}? Answer:", f"file{i}_p1", split))
        rendered.append(Template(stem, f"file{i}_stmt", split))
    select, evals = split_subjects(key, [f.subject for f in facts])
    return Relation(key, facts, rendered, select, evals, "en", str(path))
