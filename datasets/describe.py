"""`describe(ds)`: a plain-text summary of a FederatedDataset (what `fleetrec data describe` prints)."""
from __future__ import annotations

import numpy as np

from fleetrec.datasets.federated import SPLIT_NAMES, TEST, TRAIN, VAL, FederatedDataset

def _q(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-"
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return " / ".join(f"{v:g}" for v in q)


def describe(ds: FederatedDataset) -> str:
    """A plain-text summary: sizes, rows per client quantiles, label rates per task (and scenario), vocabs."""
    lines = [f"dataset {ds.name}: {ds.num_clients} clients, {ds.num_rows} rows"]
    split = ds.column("split")
    counts = [int((split == s).sum()) for s in (TRAIN, VAL, TEST)]
    lines.append("rows per split: " + ", ".join(f"{SPLIT_NAMES[s]} {c}" for s, c in zip((TRAIN, VAL, TEST), counts)))
    per_client = np.diff(ds.offsets)
    lines.append(f"rows per client (min / q25 / median / q75 / max): {_q(per_client)}")
    lines.append(f"train rows per client (min / q25 / median / q75 / max): {_q(ds.rows_per_client(TRAIN))}")
    lines.append("tasks (positive rate train / val / test):")
    for t in ds.schema.tasks:
        y = ds.column(t)
        rates = [f"{y[split == s].mean():.4f}" if (split == s).any() else "-" for s in (TRAIN, VAL, TEST)]
        lines.append(f"  {t}: {y.mean():.4f} ({' / '.join(rates)})")
    if ds.schema.scenario:
        sc = ds.client_attr(ds.schema.scenario)
        labels = (ds.client_attrs.column("label").to_pylist() if "label" in ds.client_attrs.column_names
                  else [str(v) for v in range(ds.num_clients)])
        lines.append(f"scenarios ({ds.schema.scenario}): rows and positive rate per task")
        client = ds.column("client")
        row_sc = sc[client]
        for code in np.unique(sc):
            m = row_sc == code
            name = labels[int(np.flatnonzero(sc == code)[0])]
            rates = ", ".join(f"{t} {ds.column(t)[m].mean():.4f}" for t in ds.schema.tasks)
            lines.append(f"  {int(code)} {name}: {int(m.sum())} rows; {rates}")
    lines.append("categorical fields (vocab): " + ", ".join(f"{f.name} {f.vocab}" for f in ds.schema.categorical))
    if ds.schema.numeric:
        lines.append("numeric fields: " + ", ".join(ds.schema.numeric))
    if ds.schema.client_categorical:
        lines.append("client attributes (vocab): "
                     + ", ".join(f"{f.name} {f.vocab}" for f in ds.schema.client_categorical))
    return "\n".join(lines)
