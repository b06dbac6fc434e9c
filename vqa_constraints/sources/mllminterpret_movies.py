"""The `mllminterpret-movies` source: the paper authors' multimodal_movies.csv plus a director -> movies file.

multimodal_movies.csv (written by pandas, unnamed index column first):
    ,question,director,main_entity,image_url
    0,Name a movie directed by this director?,Ron Fricke,this director,./A photo of Ron Fricke
Every movie of the director is a valid answer (answer_mode "any_of"). The
user's mapping is either a JSON object {"director": ["movie", ...]} or a CSV
with columns `director,movie` (one row per movie).

Inputs: --source-path mllminterpret-movies=CSV_OR_FOLDER
        [--source-path mllminterpret-movies.movies=director_movies.json|.csv]  (default: next to the CSV)
        [--source-path mllminterpret-movies.images=DIR]                       (default: the CSV's folder)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vqa_constraints.errors import UserError
from vqa_constraints.records import Record
from vqa_constraints.sources.mllminterpret_csv import constrained_rows, row_record
from vqa_constraints.sources.tabular import cell, companion_file, images_root, main_file, read_csv, read_json

NAME = "mllminterpret-movies"
CSV_NAME = "multimodal_movies.csv"
MAPPING_NAMES = ("director_movies.json", "director_movies.csv")
LICENSE = "MIT (MLLMInterpret constraints); movie lists and images: their owners' terms"


def load_director_movies(path: Path) -> dict[str, list[str]]:
    """director -> movies (order kept, duplicates dropped)."""
    movies: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object mapping director to a list of movies")
        for director, titles in data.items():
            if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
                raise UserError(f"{path} field {director!r}: expected a list of movie titles")
            movies[director.strip()] = [t.strip() for t in titles]
    else:
        for _, row in read_csv(path, ("director", "movie")):
            movies.setdefault(cell(row, "director"), []).append(cell(row, "movie"))
    return {d: list(dict.fromkeys(t for t in titles if t)) for d, titles in movies.items()}


def build_records(context) -> Iterator[Record]:
    csv_path = main_file(context, CSV_NAME)
    mapping_path = companion_file(context, "movies", MAPPING_NAMES, csv_path)
    root = images_root(context, csv_path)
    movies = load_director_movies(mapping_path)
    # main_entity is not checked here: an empty one is rejected as an empty constraint.
    for row in constrained_rows(context, csv_path, "director", ("question", "director")):
        answers = movies.get(row.subject) or []
        if not answers:
            context.reject(f"{row.location} field 'answers'", f"no movies for {row.subject!r} in {mapping_path.name}")
            continue
        yield from row_record(
            context, root, NAME, LICENSE, row, answers=answers, relation="director_of", meta={}, answer_mode="any_of"
        )
