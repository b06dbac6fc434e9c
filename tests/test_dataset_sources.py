"""Sources: flagpy+countryinfo countries, flag questions, and the four adapters on real-format fixtures."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from vqa_constraints.builder import build
from vqa_constraints.loading import load_split
from vqa_constraints.sources import flag_questions, flags
from vqa_constraints.sources.tabular import demonstrative_phrase

FIXTURES = Path(__file__).parent / "fixtures" / "dataset"


@pytest.fixture(scope="module")
def countries():
    return flags.load_countries()


def test_countries_join_flagpy_and_countryinfo(countries):
    flagpy_names = [name for name, _ in flags.flagpy_entries()]
    assert len(flagpy_names) == 195
    assert len(countries) == 195  # every flagpy name matched exactly one countryinfo record
    assert [c.name for c in countries] == sorted(c.name for c in countries)
    by_name = {c.name: c for c in countries}
    france = by_name["France"]
    assert (france.capital, france.region, france.subregion) == ("Paris", "Europe", "Western Europe")
    assert {"Germany", "Spain", "Belgium"} <= set(france.borders)  # ISO3 codes turned into names
    assert france.currencies == ("Euro",) and france.languages == ("French",)
    assert by_name["Switzerland"].currencies == ("Swiss Franc",)  # fund codes (WIR Euro) dropped
    assert by_name["Netherlands"].aliases == ("the Netherlands",)
    assert by_name["North Macedonia"].iso3 == "MKD"
    assert by_name["Vatican City"].borders == ("Italy",)
    assert france.flag.mode == "RGB" and france.flag.size == (180, 90)
    # France's flag: blue, white, red vertical bands
    pixels = np.asarray(france.flag)
    assert pixels[45, 10, 2] > 100 and pixels[45, 90].min() > 200 and pixels[45, 170, 0] > 200


def test_borders_are_symmetric_among_kept_countries(countries):
    by_name = {c.name: c for c in countries}
    for country in countries:
        for neighbour in country.borders:
            if neighbour in by_name and by_name[neighbour].borders_complete:
                assert country.name in by_name[neighbour].borders, (country.name, neighbour)


def test_flag_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(np.zeros((2, 3, 3), dtype=np.uint8)))
    assert flags.load_flag(good).size == (3, 2)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(io.BytesIO(b"x")))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        flags.load_flag(evil)
    # flag files are read from the installed package folder only
    assert all(flags.flagpy_folder() in path.parents for _, path in flags.flagpy_entries())


def test_flag_questions_cover_three_configs_with_computed_answers(countries):
    records = list(flag_questions.records(countries))
    by_config = {c: [r for r in records if r.config == c] for c in ("single_constraint", "multi_constraint", "encyclopedic")}
    assert all(by_config.values())
    tail = {c.name for c in flag_questions.long_tail(countries)}
    assert len(tail) == flag_questions.LONG_TAIL_SIZE
    assert {r.subject for r in by_config["encyclopedic"]} == tail
    assert not tail & {r.subject for r in by_config["single_constraint"]}
    by_name = {c.name: c for c in countries}
    capital = next(r for r in by_config["single_constraint"] if r.subject == "France" and r.relation == "capital")
    assert capital.question == "What is the capital of the country whose flag is in this image?"
    assert capital.answers == ["Paris"] and capital.text_only_question == "What is the capital of France?"
    assert len(capital.paraphrases) == 2 and all(flag_questions.VISUAL_PHRASE in p for p in capital.paraphrases)
    regions = flags.region_by_name()
    for record in by_config["multi_constraint"]:
        visual, textual = record.constraints
        assert record.answer_mode == "any_of" and (visual.type, textual.type) == ("visual", "textual")
        country = by_name[record.subject]
        assert set(record.answers) <= set(country.borders)
        if textual.relation == "located_in" and textual.entity in regions.values():
            expected = [n for n in country.borders if regions[n] == textual.entity]
            assert record.answers == expected  # every valid neighbour, none missing
    euro = next(
        r for r in by_config["multi_constraint"] if r.subject == "Germany" and r.constraints[1].entity == "Euro"
    )
    assert set(euro.answers) == {"Austria", "Belgium", "France", "Luxembourg", "Netherlands"}
    assert euro.constraints[1].text == "that uses the Euro"
    # one-sided borders in countryinfo (Chad lists South Sudan, South Sudan does not list Chad) are dropped
    assert "South Sudan" not in by_name["Chad"].borders and not by_name["Chad"].borders_complete
    assert not [r for r in by_config["multi_constraint"] if r.subject == "Chad"]
    netherlands = next(r for r in by_config["single_constraint"] if r.subject == "Netherlands")
    assert "the Netherlands" in netherlands.text_only_question


@pytest.fixture(scope="module")
def adapters_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "vqa"
    report = build(
        out,
        sources=["mllminterpret-known", "mllminterpret-movies", "okvqa", "encyclopedic-vqa"],
        source_paths=[
            f"mllminterpret-known={FIXTURES / 'mllminterpret' / 'multimodal_known.csv'}",
            f"mllminterpret-movies={FIXTURES / 'mllminterpret'}",  # a folder: default file names inside
            f"okvqa={FIXTURES / 'okvqa' / 'okvqa.csv'}",
            f"encyclopedic-vqa={FIXTURES / 'encyclopedic_vqa' / 'test.csv'}",
        ],
    )
    return out, report


def records_of(out, config, source):
    return [r for r in load_split(str(out), config, "test").records() if r.source == source]


def test_mllminterpret_known_joins_rome_facts(adapters_build):
    out, report = adapters_build
    assert report.rows_by_source["mllminterpret-known"] == 6 and not report.skipped
    rows = {r.subject: r for r in records_of(out, "single_constraint", "mllminterpret-known")}
    needle = rows["Space Needle"]
    assert needle.answers == ["Seattle"] and needle.relation == "P131"
    assert needle.constraints[0].text == "This building" and needle.constraints[0].char_start == 0
    assert needle.text_only_question == "Space Needle is located in"
    # a subject with two facts picks the one whose template matches the question
    assert rows["Marshall Islands"].answers == ["English"]
    assert rows["Marshall Islands"].text_only_question == "In Marshall Islands, the language spoken is a mixture of"
    assert rows["De finibus bonorum et malorum"].text_only_question.startswith("De finibus bonorum et malorum's ")
    assert rows["Audible.com"].image.size == (24, 16)  # "A photo of Audible.com" + .png found


def test_mllminterpret_movies_lists_every_movie(adapters_build):
    out, _ = adapters_build
    rows = {r.subject: r for r in records_of(out, "single_constraint", "mllminterpret-movies")}
    assert rows["Ron Fricke"].answers == ["Baraka", "Samsara", "Chronos"]
    assert rows["Ron Fricke"].answer_mode == "any_of"
    assert rows["Jane Campion"].text_only_question == "Name a movie directed by Jane Campion?"


def test_okvqa_answers_come_from_annotations(adapters_build):
    out, _ = adapters_build
    rows = {r.question: r for r in records_of(out, "single_constraint", "okvqa")}
    assert len(rows) == 4
    sport = rows["What sport can you use this for?"]
    assert sport.answers == ["race", "racing", "motocross", "riding"] and sport.constraints[0].text == "this"
    dog = rows["What kind of dog is this?"]
    assert dog.answers == ["husky", "malamute"]  # "wolf" and "sled dog" had one vote each
    assert dog.constraints[0].text == "dog is this"


def test_okvqa_official_json_finds_demonstrative_phrase(tmp_path):
    report = build(
        tmp_path / "vqa",
        sources=["okvqa"],
        source_paths={"okvqa": str(FIXTURES / "okvqa" / "OpenEnded_mscoco_val2014_questions.json")},
        skip_invalid=True,
    )
    assert report.rows["single_constraint/test"] == 6
    assert [reason for _, reason in report.skipped] == ["no visual constraint (no this/these/that/those phrase)"]
    texts = {r.constraints[0].text for r in load_split(str(tmp_path / "vqa"), "single_constraint").records()}
    assert "this animal" in texts


def test_encyclopedic_vqa_adapter(adapters_build):
    out, _ = adapters_build
    rows = {r.subject: r for r in records_of(out, "encyclopedic", "encyclopedic-vqa")}
    hotel = rows["Menger Hotel"]
    assert hotel.answers == ["the Menger family", "William Menger"] and hotel.answer_mode == "aliases"
    assert hotel.text_only_question == "Where does the Menger Hotel derive its name from?"
    assert len(hotel.other_views) == 1  # the second landmark image
    jay = rows["Canada jay"]
    assert jay.answers == ["Canada", "United States"] and jay.answer_mode == "any_of"
    assert rows["Eiffel Tower"].constraints[0].text == "this building"


@pytest.mark.parametrize(
    "question, phrase",
    [
        ("Where does this hotel derive its name from?", "this hotel"),
        ("What is this type of blanket called?", "this type of blanket"),
        ("How tall do these animals get?", "these animals"),
        ("What breed of dog is this?", "this"),
        ("What sport is played here?", None),
    ],
)
def test_demonstrative_phrase(question, phrase):
    assert demonstrative_phrase(question) == phrase
