"""MovieLens-100k and -1M (GroupLens files, read in place): ratings with user demographics and
movie genres, through the shared ratings pipeline of `real.py`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import CategoricalField, DataError
from fleetrec.datasets.io import line_of, numeric_column, read_csv
from fleetrec.datasets.real import RatingsConfig

_ML_GENRES = 19
_ML_AGE_EDGES = (18, 25, 35, 45, 50, 56)      # MovieLens-1M age groups: <18, 18-24, ..., 56+


def _attach_ml_users_items(df: pd.DataFrame, p: Path, uid: np.ndarray, age: np.ndarray, gender: np.ndarray,
                           occ: np.ndarray, mid: np.ndarray, genre: np.ndarray, users_file: str,
                           items_file: str) -> pd.DataFrame:
    """Join user demographics and the item genre onto the rating rows; DataError on a dangling id."""
    u_idx = pd.Index(uid).get_indexer(df["user"].to_numpy())
    if (u_idx < 0).any():
        i = int(np.flatnonzero(u_idx < 0)[0])
        raise DataError(f"{p}: column 'user_id' must reference a user in {users_file}, "
                        f"found {df['user'].iloc[i]} at line {i + 1}")
    i_idx = pd.Index(mid).get_indexer(df["item"].to_numpy())
    if (i_idx < 0).any():
        i = int(np.flatnonzero(i_idx < 0)[0])
        raise DataError(f"{p}: column 'item_id' must reference a movie in {items_file}, "
                        f"found {df['item'].iloc[i]} at line {i + 1}")
    df["age"] = age[u_idx]
    df["gender"] = gender[u_idx]
    df["occupation"] = occ[u_idx]
    df["genre"] = genre[i_idx]
    return df


def _ml_gender(users: pd.DataFrame, p: Path) -> np.ndarray:
    gender = users["gender"].astype(str).str.strip().map({"M": 0, "F": 1})
    if gender.isna().any():
        i = int(np.flatnonzero(gender.isna().to_numpy())[0])
        raise DataError(f"{p}: column 'gender' must be 'M' or 'F', found {users['gender'].iloc[i]!r} "
                        f"at line {line_of(p, i, header=False)}")
    return gender.to_numpy().astype(np.int64)


def _movielens_ratings(raw: pd.DataFrame, p: Path) -> pd.DataFrame:
    """The checked (user, item, rating, time) frame of a MovieLens ratings file (u.data / ratings.dat)."""
    return pd.DataFrame({
        "user": numeric_column(raw, "user_id", p, integer=True, lo=1, header=False),
        "item": numeric_column(raw, "item_id", p, integer=True, lo=1, header=False),
        "rating": numeric_column(raw, "rating", p, integer=True, lo=1, hi=5, header=False).astype(np.float64),
        "time": numeric_column(raw, "timestamp", p, integer=True, lo=0, header=False)})


@dataclass(frozen=True)
class _MovieLensConfig(RatingsConfig):
    """Shared by MovieLens-100k and -1M: frame columns, the `genre` row feature (first genre in the canonical
    19-genre order, 0 = unknown) and client attributes age_group (7), gender (2), occupation (21), activity."""
    HAS_TIME: ClassVar[bool] = True

    def frame_columns(self) -> dict[str, str]:
        return {**super().frame_columns(), "age": "int64", "gender": "int64", "occupation": "int64",
                "genre": "int64"}

    def row_features(self, df):
        return {"genre": (df["genre"].to_numpy(), _ML_GENRES)}

    def client_attributes(self, df, users):
        first = df.drop_duplicates("user").set_index("user").loc[users]
        age_group = np.digitize(first["age"].to_numpy(), _ML_AGE_EDGES).astype(np.int64)
        occ = first["occupation"].to_numpy()
        n_occ = max(21, int(df["occupation"].max()) + 1)
        return ({"age_group": age_group, "gender": first["gender"].to_numpy(), "occupation": occ},
                [CategoricalField("age_group", len(_ML_AGE_EDGES) + 1), CategoricalField("gender", 2),
                 CategoricalField("occupation", n_occ)])


@dataclass(frozen=True)
class MovieLens100kConfig(_MovieLensConfig):
    """MovieLens-100k (`u.data`, `u.user`, `u.item`, `u.occupation`): 943 users, 1,682 movies, timestamps.
    Row features: item_id, genre (first genre flag); client attributes: age_group (7), gender (2),
    occupation (21), activity (4)."""
    name: str = "movielens_100k"

    FOLDER: ClassVar[str] = "movielens-100k"
    FILES: ClassVar[tuple[str, ...]] = ("u.data", "u.user", "u.item", "u.occupation")
    RATING_FILE: ClassVar[str] = "u.data"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "u.data"
        raw = read_csv(p, ("user_id", "item_id", "rating", "timestamp"), sep="\t", header=False)
        df = _movielens_ratings(raw, p)
        po = root / "u.occupation"
        if not po.is_file():
            raise DataError(f"{po}: file not found")
        occupations = [line.strip() for line in po.read_text(encoding="latin-1").splitlines() if line.strip()]
        if not occupations:
            raise DataError(f"{po}: column 'occupation': file is empty, expected one occupation per line")
        pu = root / "u.user"
        users = read_csv(pu, ("user_id", "age", "gender", "occupation", "zip_code"), sep="|", header=False,
                          encoding="latin-1")
        uid = numeric_column(users, "user_id", pu, integer=True, lo=1, header=False)
        age = numeric_column(users, "age", pu, integer=True, lo=0, hi=150, header=False)
        gender = _ml_gender(users, pu)
        occ = users["occupation"].astype(str).str.strip().map({o: j for j, o in enumerate(occupations)})
        if occ.isna().any():
            i = int(np.flatnonzero(occ.isna().to_numpy())[0])
            raise DataError(f"{pu}: column 'occupation' must be listed in u.occupation, "
                            f"found {users['occupation'].iloc[i]!r} at line {line_of(pu, i, header=False)}")
        pi = root / "u.item"
        items = read_csv(pi, ("movie_id", "title", "release_date", "video_release_date", "imdb_url",
                               *[f"g{j}" for j in range(_ML_GENRES)]), sep="|", header=False, encoding="latin-1")
        mid = numeric_column(items, "movie_id", pi, integer=True, lo=1, header=False)
        flags = np.stack([numeric_column(items, f"g{j}", pi, integer=True, lo=0, hi=1, header=False)
                          for j in range(_ML_GENRES)], axis=1)
        genre = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
        return _attach_ml_users_items(df, p, uid, age, gender, occ.to_numpy().astype(np.int64), mid, genre,
                                      "u.user", "u.item")


# MovieLens-1M genre names in the order of MovieLens-100k's genre flags (code 0 = unknown / none)
_ML_GENRE_NAMES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                   "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                   "War", "Western")
_ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)


def _read_dcolon(path: Path, columns: tuple[str, ...], encoding: str = "latin-1") -> pd.DataFrame:
    """A MovieLens-1M `::`-separated file (no header) as strings-or-numbers per column; the last column
    keeps any further `::` (titles). DataError naming the file, the column and the line when short."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.path to the folder holding it)")
    rows = []
    with open(path, encoding=encoding) as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("::", len(columns) - 1)
            if len(parts) < len(columns):
                raise DataError(f"{path}: missing column '{columns[len(parts)]}' at line {n} (expected "
                                f"{len(columns)} '::'-separated fields: {', '.join(columns)})")
            rows.append(parts)
    if not rows:
        raise DataError(f"{path}: file is empty, expected '::'-separated columns {', '.join(columns)}")
    return pd.DataFrame(rows, columns=list(columns))


def _read_ratings_dat(path: Path) -> pd.DataFrame:
    """`ratings.dat` (1M lines) with the fast C parser: split on ':' and keep every other field."""
    cols = ("user_id", "item_id", "rating", "timestamp")
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.path to the folder holding it)")
    try:
        raw = pd.read_csv(path, sep=":", header=None, engine="c")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty, expected '::'-separated columns {', '.join(cols)}") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: cannot parse ({e}); expected '::'-separated columns {', '.join(cols)}") from None
    if raw.shape[1] < 7:
        raise DataError(f"{path}: missing column '{cols[(raw.shape[1] + 1) // 2]}' (expected 4 '::'-separated "
                        f"fields per line: {', '.join(cols)})")
    gaps = raw.iloc[:, [1, 3, 5]].notna().to_numpy()          # the empty field between the two colons
    if gaps.any():
        i = int(np.flatnonzero(gaps.any(axis=1))[0])
        j = int(np.argmax(gaps[i]))
        raise DataError(f"{path}: column '{cols[j + 1]}' at line {line_of(path, i, header=False)}: fields are not '::'-separated "
                        f"(expected {', '.join(cols)})")
    short = raw.iloc[:, [0, 2, 4, 6]].isna().to_numpy()
    if short.any():
        i = int(np.flatnonzero(short.any(axis=1))[0])
        raise DataError(f"{path}: missing column '{cols[int(np.argmax(short[i]))]}' at line {line_of(path, i, header=False)} (expected 4 "
                        f"'::'-separated fields: {', '.join(cols)})")
    raw = raw.iloc[:, [0, 2, 4, 6]]
    raw.columns = list(cols)
    return raw


@dataclass(frozen=True)
class MovieLens1MConfig(_MovieLensConfig):
    """MovieLens-1M (`ratings.dat`, `users.dat`, `movies.dat`, `::`): 6,040 users, 3,706 movies, timestamps.
    Same row features and client attributes as movielens_100k (occupation = the 1M code 0..20)."""
    name: str = "movielens_1m"

    FOLDER: ClassVar[str] = "movielens-1m"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.dat", "users.dat", "movies.dat")
    RATING_FILE: ClassVar[str] = "ratings.dat"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.dat"
        raw = _read_ratings_dat(p)
        df = _movielens_ratings(raw, p)
        pu = root / "users.dat"
        users = _read_dcolon(pu, ("user_id", "gender", "age", "occupation", "zip_code"))
        uid = numeric_column(users, "user_id", pu, integer=True, lo=1, header=False)
        gender = _ml_gender(users, pu)
        age = numeric_column(users, "age", pu, integer=True, lo=0, hi=150, header=False)
        bad = np.flatnonzero(~np.isin(age, _ML1M_AGES))
        if len(bad):
            raise DataError(f"{pu}: column 'age' must be one of {', '.join(map(str, _ML1M_AGES))}, "
                            f"found {int(age[bad[0]])} at line {bad[0] + 1}")
        occ = numeric_column(users, "occupation", pu, integer=True, lo=0, hi=20, header=False)
        pm = root / "movies.dat"
        movies = _read_dcolon(pm, ("movie_id", "title", "genres"))
        mid = numeric_column(movies, "movie_id", pm, integer=True, lo=1, header=False)
        index = {g: j for j, g in enumerate(_ML_GENRE_NAMES)}
        genre = np.zeros(len(movies), np.int64)
        for r, text in enumerate(movies["genres"].to_numpy()):
            codes = [index.get(g.strip(), -1) for g in str(text).split("|") if g.strip()]
            if any(c < 0 for c in codes):
                g = next(g for g, c in zip(str(text).split("|"), codes) if c < 0)
                raise DataError(f"{pm}: column 'genres' must list '|'-separated MovieLens genres, found {g!r} "
                                f"at line {r + 1}")
            genre[r] = min(codes) if codes else 0
        return _attach_ml_users_items(df, p, uid, age, gender, occ, mid, genre, "users.dat", "movies.dat")
