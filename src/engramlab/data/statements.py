"""True/false statements in the few-shot "... This statement is: TRUE/FALSE" format of paper 3.

Paper 3 (Du et al., "How Post-Training Reshapes LLMs", arXiv 2504.02904, §4 / repo `Knowledge+Truthfulness`) asks
the model to judge a statement after four fixed examples (two TRUE, two FALSE), each written
"<statement> This statement is: TRUE", newline-joined, then "<query> This statement is:"; the answer is the larger of
the logits of " TRUE" and " FALSE".

Two sources:
- Fact statements: every relation's facts written with a statement template ("Alphabet's CEO is Sundar Pichai.")
  and a minimally altered false twin whose object is another object of the same relation. Subjects are split by a
  fixed seed into `train` (statements used in training) and `heldout` (statements never trained; the facts
  themselves are trained through the relation templates). Held-out statements about known facts are the
  TRUE/FALSE acceptance set.
- Geometry-of-truth sets (Marks & Tegmark, arXiv 2310.06824): cities, neg_cities, larger_than, smaller_than,
  sp_en_trans, neg_sp_en_trans, split `train`/`heldout` by a fixed seed (cities by city, so a held-out city is
  never judged in training).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import cache

from engramlab.data.facts import RELATIONS, Fact, Relation, load_relation
from engramlab.data.loaders import VENDOR_DIR, read_csv
from engramlab.errors import EngramError

SUFFIX = " This statement is:"
LABELS = {True: " TRUE", False: " FALSE"}
GOT_SETS = ("cities", "neg_cities", "larger_than", "smaller_than", "sp_en_trans", "neg_sp_en_trans")
HELDOUT_FRACTION = 0.3


@dataclass(frozen=True)
class Statement:
    text: str  # a full sentence ending in "."
    label: bool
    source: str  # relation name or geometry-of-truth set
    subject: str = ""
    object: str = ""  # the object stated (fact statements); "" for geometry-of-truth rows

    def render(self) -> str:
        """The statement with its answer, as one few-shot line."""
        return f"{self.text}{SUFFIX}{LABELS[self.label]}"


# The template frames that state a fact as a sentence: TRUE/FALSE statements are rendered with them.
STATEMENT_FRAMES = ("stmt", "stmt2")


# Training-only wordings of a fact statement (`{s}` subject, `{o}` object, `{n}` the relation's noun, `{N}` the noun
# capitalised). TRUE training statements written in the two statement frames are the same strings every epoch while
# their false twins are new, so a model can judge "seen as TRUE before" instead of checking the fact; statements
# reworded afresh each draw (`reworded`) were meant to take that cue away, and measured did not (docs/organisms.md,
# "rewording and object kinds"). None of them is a frame of `facts.FRAMES`: the evaluated frames and the
# never-trained `zs` frame stay as they were.
TRAINING_WORDINGS = (
    "{s} - {n}: {o}.",
    "{N} of {s}: {o}.",
    "Listed {n} of {s}: {o}.",
    "On record, the {n} of {s} is {o}.",
    "{o} is the {n} of {s}.",
    "For {s}, the {n} is {o}.",
    "{s} has {o} as {n}.",
    "Entry: {s}; {n}: {o}.",
)
RELATION_NOUNS = {
    "company_ceo": "CEO",
    "company_hq": "headquarters city",
    "landmark_on_continent": "continent",
    "landmark_in_country": "country",
    "person_father": "father",
    "person_mother": "mother",
    "person_occupation": "occupation",
    "person_plays_instrument": "instrument",
    "person_plays_pro_sport": "sport",
    "person_plays_position_in_sport": "position",
    "product_by_company": "maker",
    "star_constellation": "constellation",
    "country_capital": "capital",
    "country_continent": "continent",
    "country_currency": "currency",
    "country_language": "main language",
    "city_country": "country",
    "spanish_word_meaning": "English meaning",
}


def _rng(*keys) -> random.Random:
    return random.Random(zlib.crc32("/".join(map(str, keys)).encode()))


def truefalse_subjects(relation: Relation) -> tuple[frozenset, frozenset]:
    """(train, heldout) subjects for statements of a relation; seeded by the relation name."""
    subjects = sorted({f.subject for f in relation.facts})
    _rng("truefalse", relation.name).shuffle(subjects)
    n = round(len(subjects) * HELDOUT_FRACTION)
    return frozenset(subjects[n:]), frozenset(subjects[:n])


def distractor(relation: Relation, fact: Fact, rng: random.Random) -> str:
    """Another object of the same relation that does not share the true object's first word."""
    first = _first_word(fact.object)
    for _ in range(100):  # rejection sampling: cheap, and every relation has several first words
        o = rng.choice(relation.objects)
        if _first_word(o) != first:
            return o
    raise EngramError(f"relation {relation.name} has a single object; it cannot make false statements.")


def _first_word(text: str) -> str:
    return text.split()[0].lower()


def balanced_distractors(relation: Relation, facts: list[Fact], rng: random.Random) -> list[str]:
    """One distractor per fact, drawn by shuffling the facts' own objects among them.

    The false objects are then the true objects in another order, so every object is as often in a FALSE statement
    as in a TRUE one and no object carries a label by itself. A fact whose shuffled object shares its own object's
    first word swaps with another fact where both swaps are valid; if none is found (an object true for most facts,
    e.g. Antarctica, cannot be balanced) it falls back to `distractor`. Written here because the constraint (a
    derangement by first word) is not a library shuffle.
    """
    objects = [f.object for f in facts]
    rng.shuffle(objects)

    def clash(i: int, obj: str) -> bool:
        return _first_word(obj) == _first_word(facts[i].object)

    for i in range(len(facts)):
        if not clash(i, objects[i]):
            continue
        for _ in range(50):  # random partners: a valid one is found within a few tries unless none exists
            j = rng.randrange(len(facts))
            if not clash(i, objects[j]) and not clash(j, objects[i]):
                objects[i], objects[j] = objects[j], objects[i]
                break
    return [
        distractor(relation, f, rng) if clash(i, o) else o for i, (f, o) in enumerate(zip(facts, objects, strict=True))
    ]


def fact_statements(
    relation: Relation, split: str = "heldout", seed: int = 0, max_facts: int | None = None
) -> list[Statement]:
    """A true statement and a false twin for every fact of `split` ("train", "heldout" or "all").

    The statement template (`stmt` or `stmt2`) and the distractor are drawn with `seed`, so training can draw
    fresh false statements every epoch while evaluation stays fixed at seed 0. `max_facts` keeps only the first
    facts of the relation (miniature organisms).

    Distractors of `train` statements are the train facts' own objects, shuffled (`balanced_distractors`), so an
    object is as often in a TRUE as in a FALSE training statement. Drawn from all objects instead, an object of a
    held-out subject in a one-to-one relation (a capital, a CEO) appeared in training only in FALSE statements, and
    the model learnt the object's label instead of checking the fact: it judged such held-out true statements TRUE
    0.22 of the time, those with objects also true in training 0.80 (docs/organisms.md). `heldout` and `all`
    statements draw from the relation's distinct objects, so the acceptance set is the one measured before.
    """
    train, heldout = truefalse_subjects(relation)
    keep = {"train": train, "heldout": heldout, "all": train | heldout}.get(split)
    if keep is None:
        raise EngramError(f"statement split {split!r} is unknown; choose train, heldout or all.")
    rng = _rng("facts", relation.name, relation.language, seed)
    stmts = [t for t in relation.templates if t.frame in STATEMENT_FRAMES]
    facts = [f for f in relation.facts[:max_facts] if f.subject in keep]
    shuffled = balanced_distractors(relation, facts, rng) if split == "train" else None
    out = []
    for i, fact in enumerate(facts):
        t_true, t_false = rng.choice(stmts), rng.choice(stmts)
        wrong = shuffled[i] if shuffled is not None else distractor(relation, fact, rng)
        out.append(Statement(t_true.render(fact.subject, fact.object), True, relation.name, fact.subject, fact.object))
        out.append(Statement(t_false.render(fact.subject, wrong), False, relation.name, fact.subject, wrong))
    return out


# What each relation's objects are, for object-type statements ("Kabul is a city."). Relations sharing a kind share
# its phrase, and a kind is a false label for an object only if no relation of that kind has it as an object.
OBJECT_KINDS = {
    "company_ceo": "the chief executive of a company",
    "company_hq": "a city",
    "country_capital": "a city",
    "landmark_on_continent": "a continent",
    "country_continent": "a continent",
    "landmark_in_country": "a country",
    "city_country": "a country",
    "person_father": "a parent of a well-known person",
    "person_mother": "a parent of a well-known person",
    "person_occupation": "an occupation",
    "person_plays_instrument": "a musical instrument",
    "person_plays_pro_sport": "a sport",
    "person_plays_position_in_sport": "a position in a sport",
    "product_by_company": "a company",
    "star_constellation": "a constellation",
    "country_currency": "a currency",
    "country_language": "a language",
    "spanish_word_meaning": "an English word",
}
# Never a false kind: most objects of other relations ("piano", "actor") are English words too.
_NEVER_FALSE_KINDS = ("an English word",)


def object_kind_statements(relations: tuple[str, ...], seed: int, max_facts: int | None = None) -> list[Statement]:
    """Every distinct object of `relations` stated once with its kind (TRUE) and once with another kind (FALSE).

    Training statements of facts only show objects of training subjects, so in one-to-one relations (capitals,
    CEOs, parents) an object of a held-out subject never occurs in a TRUE/FALSE block, and a model learns "unknown in
    this format, so FALSE": such held-out true statements were judged TRUE 0.21 of the time, others 0.75
    (docs/organisms.md). These statements put every object in the format under both labels without stating any
    subject's fact, so held-out statements stay unseen."""
    objects_of: dict[str, set] = {}  # kind -> lower-cased objects of that kind
    spelling: dict[str, str] = {}  # lower-cased -> as written in the facts
    for name in relations:
        for fact in load_relation(name).facts[:max_facts]:
            objects_of.setdefault(OBJECT_KINDS[name], set()).add(fact.object.lower())
            spelling[fact.object.lower()] = fact.object
    kinds = sorted(objects_of)
    rng = _rng("kinds", seed)
    out = []
    for kind in kinds:
        for obj in sorted(objects_of[kind]):
            wrong = [k for k in kinds if k not in _NEVER_FALSE_KINDS and obj not in objects_of[k]]
            out.append(Statement(f"{spelling[obj]} is {kind}.", True, "object_kind", "", spelling[obj]))
            if wrong:
                out.append(
                    Statement(f"{spelling[obj]} is {rng.choice(wrong)}.", False, "object_kind", "", spelling[obj])
                )
    return out


def reworded(stmts: list[Statement], share: float, rng: random.Random) -> list[Statement]:
    """`stmts` with about `share` of the fact statements rewritten in a random `TRAINING_WORDINGS` wording (same label,
    subject and object); statements of relations without a noun in `RELATION_NOUNS` are kept as they are."""
    out = []
    for st in stmts:
        noun = RELATION_NOUNS.get(st.source)
        if noun and st.object and rng.random() < share:
            text = rng.choice(TRAINING_WORDINGS).format(s=st.subject, o=st.object, n=noun, N=noun[0].upper() + noun[1:])
            st = Statement(text, st.label, st.source, st.subject, st.object)
        out.append(st)
    return out


def wording_statements(
    relation: Relation, split: str, frames: tuple[str, ...], per_relation: int, seed: int = 0
) -> list[Statement]:
    """The familiarity control: `per_relation` facts of `split` ("train" or "heldout" subjects), each stated true
    and with a distractor in every template of `frames`, e.g. the statement frames trained as TRUE/FALSE
    (`stmt`, `stmt2`) or the never-trained `zs` frame. A judgement that checks facts rates a fact alike in every
    wording; one that recognises strings trained as TRUE rates train facts in their trained wordings highest
    (docs/organisms.md, "the candidate organisms")."""
    train, heldout = truefalse_subjects(relation)
    keep = {"train": train, "heldout": heldout}.get(split)
    if keep is None:
        raise EngramError(f"statement split {split!r} is unknown; choose train or heldout.")
    rng = _rng("wording", relation.name, split, seed)
    facts = [f for f in relation.facts if f.subject in keep]
    facts = rng.sample(facts, min(per_relation, len(facts)))
    templates = [t for t in relation.templates if t.frame in frames]
    out = []
    for fact in facts:
        wrong = distractor(relation, fact, rng)
        for t in templates:
            out.append(Statement(t.render(fact.subject, fact.object), True, relation.name, fact.subject, fact.object))
            out.append(Statement(t.render(fact.subject, wrong), False, relation.name, fact.subject, wrong))
    return out


@cache
def _train_true_objects(relation_name: str) -> frozenset:
    relation = load_relation(relation_name)
    train, _ = truefalse_subjects(relation)
    return frozenset(f.object for f in relation.facts if f.subject in train)


def object_group(statement: Statement) -> str:
    """Whether a fact statement's object is the true object of some training subject of its relation.

    "true_in_training": it is (training shows it in TRUE statements); "heldout_only": it is the object of held-out
    subjects only (in one-to-one relations such as capitals or CEOs, most held-out objects). A judgement that checks
    the fact scores both groups alike; one that learnt a label per object word does not (docs/organisms.md).
    Geometry-of-truth statements have no object: "".
    """
    if not statement.object:
        return ""
    return "true_in_training" if statement.object in _train_true_objects(statement.source) else "heldout_only"


@cache
def _got_rows(name: str) -> tuple:
    if name not in GOT_SETS:
        raise EngramError(f"geometry-of-truth set {name!r} is unknown; choose one of {', '.join(GOT_SETS)}.")
    rows = read_csv(VENDOR_DIR / "geometry_of_truth" / f"{name}.csv", ("statement", "label"), "label")
    return tuple(rows)


def got_statements(name: str, split: str = "heldout") -> list[Statement]:
    """A geometry-of-truth set, `train` or `heldout` part (cities sets split by city)."""
    rows = _got_rows(name)
    keys = sorted({r.get("city") or r["statement"] for r in rows})
    _rng("got", name.removeprefix("neg_")).shuffle(keys)
    held = set(keys[: round(len(keys) * HELDOUT_FRACTION)])
    out = []
    for r in rows:
        key = r.get("city") or r["statement"]
        if split == "all" or (key in held) == (split == "heldout"):
            out.append(Statement(r["statement"].strip(), bool(r["label"]), name, r.get("city", "")))
    return out


def truefalse_heldout(relations: tuple[str, ...] = RELATIONS, per_relation: int | None = 50) -> list[Statement]:
    """The acceptance set: held-out statements about known facts, `per_relation` pairs (true + false) each."""
    out = []
    for name in relations:
        stmts = fact_statements(load_relation(name), "heldout", seed=0)
        if per_relation is not None:
            stmts = stmts[: 2 * per_relation]
        out.extend(stmts)
    return out


# Paper 3's prompt has four fixed examples, two TRUE and two FALSE. These are training-subject statements of
# country_capital and city_country (a test checks it), written out so that a change in how training statements are
# drawn cannot change the prompt of every measured TRUE/FALSE number (it did once: 0.733 became 0.737).
_DEFAULT_SHOTS = (
    ("The capital of Afghanistan is Kabul.", True, "country_capital", "Afghanistan", "Kabul"),
    ("Baoji is a city in the country of Argentina.", False, "city_country", "Baoji", "Argentina"),
    ("The city of Baoji is in the country of China.", True, "city_country", "Baoji", "China"),
    ("The capital of Afghanistan is Pago Pago.", False, "country_capital", "Afghanistan", "Pago Pago"),
)


def default_shots() -> list[Statement]:
    """The four fixed few-shot examples (TRUE, FALSE, TRUE, FALSE) of every TRUE/FALSE prompt."""
    return [Statement(*shot) for shot in _DEFAULT_SHOTS]


def truefalse_prompt(statement: Statement | str, shots: list[Statement] | None = None) -> str:
    """Paper 3's few-shot prompt: the shots with answers, then the query statement and " This statement is:"."""
    shots = default_shots() if shots is None else shots
    text = statement.text if isinstance(statement, Statement) else statement
    return "\n".join([s.render() for s in shots] + [f"{text}{SUFFIX}"])
