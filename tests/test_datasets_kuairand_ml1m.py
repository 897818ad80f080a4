"""MovieLens-1M (tiny fixture in the official `::` layout) and the KuaiRand-Pure source (logs written here in the
official column layout; feature tables from tiny fixtures, and the real Pure tables when shared/data has them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fleetrec.datasets import SOURCES
from fleetrec.simulator.data_cli import main as data_main
from fleetrec.datasets.federated import TEST, TRAIN, VAL, DataError
from fleetrec.datasets.kuairand import (FEDPA_USER_FEATURES, USER_DISCRETE, VIDEO_DISCRETE, KuaiRandConfig, fedpa_bins,
                                        fedpa_open_users)
from fleetrec.datasets.movielens import MovieLens1MConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_kuairand = pytest.mark.skipif(not (SHARED_DATA / "kuairand" / "user_features_pure.csv.gz").is_file(),
                                    reason="shared KuaiRand feature tables are absent")


# ------------------------------------------------------------------------------------------ MovieLens-1M
ML_MOVIES = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure|Children's|Fantasy",
             "3::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",
             "4::Heat (1995)::Thriller|Crime|Action", "5::Brief Encounter (1946)::Drama|Romance",
             "6::Fargo (1996)::Crime|Drama|Thriller", "7::Café au Lait (1993)::Comedy",
             "8::Alien (1979)::Horror|Sci-Fi"]
ML_USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117", "4::F::45::7::02460",
            "5::M::18::20::55455"]


def write_ml1m(root: Path, ratings: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if ratings is None:
        ratings = []
        for u in range(1, 6):
            for j in range(6):
                m = (u + j) % 8 + 1
                ratings.append(f"{u}::{m}::{(u * j) % 5 + 1}::{978_300_000 + 100 * j + u}")
    (root / "ratings.dat").write_text("\n".join(ratings) + "\n", encoding="latin-1")
    (root / "users.dat").write_text("\n".join(ML_USERS) + "\n", encoding="latin-1")
    (root / "movies.dat").write_text("\n".join(ML_MOVIES) + "\n", encoding="latin-1")
    return root


def test_movielens_1m_official_layout(tmp_path):
    root = write_ml1m(tmp_path / "ml1m")
    ds = MovieLens1MConfig(path=str(root), cache_dir=str(tmp_path / "c"), split="chronological",
                           negatives_per_positive=1).build(0)
    assert "movielens_1m" in SOURCES
    assert ds.num_clients == 5 and ds.schema.tasks == ("interaction", "like")
    # same fields as the 100k loader (shared code)
    assert [f.name for f in ds.schema.client_categorical] == ["age_group", "gender", "occupation", "activity"]
    assert [f.name for f in ds.schema.categorical] == ["item_id", "genre"]
    assert ds.schema.vocab("genre") == 19 and ds.schema.vocab("age_group") == 7
    assert ds.client_attr("gender").tolist() == [1, 0, 0, 1, 0]
    assert ds.client_attr("age_group").tolist() == [0, 6, 2, 4, 1]       # 1, 56, 25, 45, 18
    assert ds.client_attr("occupation").tolist() == [10, 16, 15, 7, 20]
    # genre = first genre in the canonical (100k flag) order: Toy Story -> Animation (3), Heat -> Action (1)
    genre_of_movie = {1: 3, 2: 2, 3: 1, 4: 1, 5: 8, 6: 6, 7: 5, 8: 11}
    frame = MovieLens1MConfig(path=str(root), cache_dir=str(tmp_path / "c")).load_frame()
    rated = set(frame["item"])
    assert dict(zip(frame["item"], frame["genre"])) == {m: g for m, g in genre_of_movie.items() if m in rated}
    # chronological: per user, test rows are the latest ratings
    split, client, inter = ds.column("split"), ds.column("client"), ds.column("interaction")
    item = ds.column("item_id")
    movies = np.unique(frame["item"])
    for c in range(5):
        u = c + 1
        t = {int(m): int(tt) for m, tt in frame.loc[frame["user"] == u, ["item", "time"]].to_numpy()}
        ts = {s: [t[int(movies[i])] for i in item[(client == c) & (split == s) & (inter == 1)]]
              for s in (TRAIN, VAL, TEST)}
        assert max(ts[TRAIN]) < min(ts[VAL]) and max(ts[VAL]) < min(ts[TEST])


@pytest.mark.parametrize("fname, line, column, what", [
    ("ratings.dat", "1:1193:5:978300760", "item_id", "not '::'-separated"),
    ("ratings.dat", "1::1193::5", "timestamp", "missing column"),
    ("ratings.dat", "1::2::6::978300760", "rating", "must be in [1, 5]"),
    ("users.dat", "6::X::25::3::12345", "gender", "'M' or 'F'"),
    ("users.dat", "6::M::30::3::12345", "age", "must be one of 1, 18, 25"),
    ("movies.dat", "9::Nothing (2000)::Cartoon", "genres", "MovieLens genres"),
])
def test_movielens_1m_malformed(tmp_path, fname, line, column, what):
    root = write_ml1m(tmp_path / "ml1m")
    p = root / fname
    p.write_text(p.read_text(encoding="latin-1") + line + "\n", encoding="latin-1")
    with pytest.raises(DataError) as e:
        MovieLens1MConfig(path=str(root), cache_dir=str(tmp_path / "c")).build(0)
    msg = str(e.value)
    assert str(p) in msg and what in msg and f"'{column}'" in msg
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_movielens_1m_dangling_user_and_missing_file(tmp_path):
    root = write_ml1m(tmp_path / "ml1m", ratings=["9::1::5::978300760"] * 3)
    with pytest.raises(DataError, match=r"ratings\.dat: column 'user_id' must reference a user in users\.dat"):
        MovieLens1MConfig(path=str(root), cache=False).build(0)
    (root / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"movies\.dat: file not found"):
        MovieLens1MConfig(path=str(root), cache_dir=str(tmp_path / "c")).build(0)


# ------------------------------------------------------------------------------------------ KuaiRand
LOG_COLUMNS = ("user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
               "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
               "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab")
DEGREES = ("full_active", "high_active", "middle_active", "low_active", "2_14_day_new")


def write_logs(root: Path, n_users: int, n_videos: int, rows=(400, 100), seed: int = 0) -> Path:
    """KuaiRand-Pure logs in the official column layout (standard + random exposure log)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in zip(("log_standard_4_08_to_4_21_pure.csv", "log_random_4_22_to_5_08_pure.csv"), rows):
        d = {c: rng.integers(0, 2, n) for c in LOG_COLUMNS}
        d.update(user_id=rng.integers(0, n_users, n), video_id=rng.integers(0, n_videos, n),
                 time_ms=rng.integers(1_649_376_000_000, 1_652_000_000_000, n), date=20220408,
                 hourmin=rng.integers(0, 2400, n), play_time_ms=rng.integers(0, 60_000, n),
                 duration_ms=rng.integers(1_000, 60_000, n), tab=rng.integers(0, 15, n))
        pd.DataFrame(d, columns=list(LOG_COLUMNS)).to_csv(root / name, index=False)
    return root


def write_feature_tables(root: Path, n_users: int, n_videos: int, stats: bool = False) -> Path:
    """Tiny user / video feature tables with every column of the official Pure files."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    users = {"user_id": np.arange(n_users), "user_active_degree": [DEGREES[u % 5] for u in range(n_users)]}
    for c in USER_DISCRETE[1:]:
        users[c] = rng.integers(0, 3, n_users)
    pd.DataFrame(users).to_csv(root / "user_features_pure.csv", index=False)
    videos = {"video_id": np.arange(n_videos), "author_id": rng.integers(0, 99, n_videos)}
    for c in VIDEO_DISCRETE:
        videos[c] = rng.integers(0, 4, n_videos)
    videos["tag"] = [f"{v % 3},{v % 5}" for v in range(n_videos)]
    pd.DataFrame(videos).to_csv(root / "video_features_basic_pure.csv", index=False)
    if stats:
        pd.DataFrame({"video_id": np.arange(n_videos), "play_duration": rng.integers(0, 10**7, n_videos),
                      "comment_stay_duration": rng.integers(0, 10**5, n_videos),
                      "complete_play_cnt": rng.integers(0, 10**4, n_videos)}).to_csv(
            root / "video_features_statistic_pure.csv", index=False)
    return root


def test_kuairand_logs_fedpa_preprocessing(tmp_path):
    root = write_feature_tables(write_logs(tmp_path / "kr", 30, 40), 30, 40, stats=True)
    cfg = KuaiRandConfig(path=str(root), cache_dir=str(tmp_path / "c"), tasks=("is_click", "long_view"))
    ds = cfg.build(0)
    raw = pd.concat([pd.read_csv(root / f) for f in ("log_standard_4_08_to_4_21_pure.csv",
                                                     "log_random_4_22_to_5_08_pure.csv")])
    assert ds.schema.tasks == ("is_click", "long_view")
    assert ds.num_rows == len(raw) and ds.num_clients == 30                 # no negatives, every user kept
    assert abs(ds.column("is_click").mean() - raw["is_click"].mean()) < 1e-6
    names = [f.name for f in ds.schema.categorical]
    assert names == ["item_id", "upload_type", "music_type", "tag", "play_duration", "comment_stay_duration",
                     "complete_play_cnt"]
    assert ds.schema.vocab("play_duration") == 100 and ds.schema.vocab("tag") == 15     # full tag lists (FedPA)
    attrs = [f.name for f in ds.schema.client_categorical]
    assert attrs == [*FEDPA_USER_FEATURES, "open", "activity"]
    # FedPA open/private division over the whole user table
    deg = np.array([DEGREES[u % 5] for u in range(30)])
    flag = fedpa_open_users(np.arange(30), deg)
    in_group = np.isin(deg, ("high_active", "middle_active", "low_active"))
    assert flag[in_group].sum() == int(in_group.sum() * 0.8) and flag[~in_group].sum() == int((~in_group).sum() * 0.2)
    labels = [int(x.split(":")[1]) for x in ds.client_attrs.column("label").to_pylist()]
    assert ds.client_attr("open").tolist() == flag[labels].tolist()
    # chronological per user: the latest 20% are test
    client, split = ds.column("client"), ds.column("split")
    times = raw.groupby("user_id")["time_ms"].apply(lambda s: np.sort(s.to_numpy()))
    for c in range(3):
        t = times[labels[c]]
        n = len(t)
        assert (split[client == c] == TEST).sum() == max(1, round(0.2 * n))
    private = KuaiRandConfig(path=str(root), cache_dir=str(tmp_path / "c"), users="private", max_clients=5).build(0)
    assert private.num_clients == 5 and private.client_attr("open").sum() == 0
    assert private.meta["open_clients"] == 0 and ds.meta["open_clients"] == int(flag.sum())


def test_fedpa_bins():
    rng = np.random.default_rng(0)
    v = rng.lognormal(8, 2, 5000)
    codes = fedpa_bins(v)
    assert codes.min() == 0 and codes.max() == 99 and len(np.unique(codes)) == 100
    order = np.argsort(v)
    assert (np.diff(codes[order]) >= 0).all()                          # monotone in the value
    assert fedpa_bins(np.array([np.nan, 1.0, 2.0]))[0] == 0


def test_kuairand_malformed(tmp_path):
    root = write_feature_tables(write_logs(tmp_path / "kr", 30, 40), 30, 40)
    log = root / "log_random_4_22_to_5_08_pure.csv"
    df = pd.read_csv(log)
    df.loc[3, "video_id"] = 999
    df.to_csv(log, index=False)
    with pytest.raises(DataError, match=r"column 'video_id' must reference an id of .*video_features_basic_pure"):
        KuaiRandConfig(path=str(root), cache=False).build(0)
    df.loc[3, "video_id"] = 1
    df.loc[5, "is_click"] = 2
    df.to_csv(log, index=False)
    with pytest.raises(DataError) as e:
        KuaiRandConfig(path=str(root), cache_dir=str(tmp_path / "c")).build(0)
    assert str(log) in str(e.value) and "'is_click'" in str(e.value) and "line 7" in str(e.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    df.drop(columns=["time_ms"]).to_csv(log, index=False)
    with pytest.raises(DataError, match=r"log_random_4_22_to_5_08_pure\.csv: missing column 'time_ms'"):
        KuaiRandConfig(path=str(root), cache=False).build(0)
    (tmp_path / "no_logs").mkdir()
    with pytest.raises(DataError, match=r"log_standard_4_08_to_4_21_pure\.csv: file not found"):
        KuaiRandConfig(path=str(tmp_path / "no_logs"), features_path=str(root), cache=False).build(0)
    from fleetrec.datasets.sources import DataConfig
    from fleetrec.simulator.config_loader import ConfigError, build
    with pytest.raises(ConfigError, match="data.users"):
        build(DataConfig, {"name": "kuairand", "users": "everyone"}, "data")
    with pytest.raises(ConfigError, match="data.tasks"):
        build(DataConfig, {"name": "kuairand", "tasks": ["is_watch"]}, "data")


@needs_kuairand
def test_kuairand_logs_with_the_real_feature_tables(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", 300, 7_583, rows=(3000, 500))
    feats = SHARED_DATA / "kuairand"
    cfg = KuaiRandConfig(path=str(logs), features_path=str(feats), cache_dir=str(tmp_path / "c"), users="private",
                         max_clients=50)
    ds = cfg.build(0)
    assert ds.num_clients == 50 and ds.client_attr("open").sum() == 0
    # FedPA's vocabulary sizes (methods.md §3.2)
    want = {"user_active_degree": 9, "follow_user_num_range": 8, "register_days_range": 8, "onehot_feat7": 118,
            "onehot_feat2": 50, "upload_type": 14, "music_type": 6, "tag": 111}
    assert {k: ds.schema.vocab(k) for k in want} == want
    # the real table's open share: 80% of high/low/middle/single_low_active users + 20% of the others
    user = pd.read_csv(feats / "user_features_pure.csv.gz", usecols=["user_id", "user_active_degree"])
    flag = fedpa_open_users(user["user_id"].to_numpy(), user["user_active_degree"].to_numpy())
    grp = user["user_active_degree"].isin(["high_active", "low_active", "middle_active", "single_low_active"])
    assert flag.sum() == int(grp.sum() * 0.8) + int((~grp).sum() * 0.2)
    rc = data_main(["describe", "kuairand", f"path={logs}", f"features_path={feats}", "cache=false",
                    "max_clients=20"])
    assert rc == 0 and "20 clients" in capsys.readouterr().out
