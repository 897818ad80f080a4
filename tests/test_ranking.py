"""Full-ranking Recall@K / NDCG@K against a brute-force Python reference."""
from __future__ import annotations

import math

import torch

from fleetrec.algorithms.ranking import full_ranking, topk_items


def tiny_problem(seed=0, U=11, I=29, d=4):
    gen = torch.Generator().manual_seed(seed)
    user, item = torch.randn(U, d, generator=gen), torch.randn(I, d, generator=gen)   # ties have probability 0
    pairs = [(u, i) for u in range(U) for i in torch.randperm(I, generator=gen)[:9].tolist()]
    train = [p for k, p in enumerate(pairs) if k % 9 < 6]
    test = [p for k, p in enumerate(pairs) if k % 9 >= 6 and p[0] % 4 != 3]          # users 3, 7 have no test items
    return user, item, torch.tensor(train).T, torch.tensor(test).T


def reference(user, item, train, test, k):
    """Per-user loops: sort all items, drop training ones, count hits."""
    recall, ndcg = {}, {}
    for u in sorted(set(test[0].tolist())):
        seen = set(train[1][train[0] == u].tolist())
        truth = set(test[1][test[0] == u].tolist())
        scores = (user[u] @ item.T).tolist()
        ranked = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i]) if i not in seen][:k]
        hits = [1.0 if i in truth else 0.0 for i in ranked]
        recall[u] = sum(hits) / len(truth)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcg[u] = dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(truth))))
    return recall, ndcg


def test_matches_brute_force_reference_for_every_k_and_chunk_size():
    user, item, train, test = tiny_problem()
    for chunk in (1, 4, 1024):
        res = full_ranking(user, item, test, train, ks=(2, 5, 20), chunk=chunk)
        assert res.users.tolist() == [u for u in range(11) if u % 4 != 3]
        for k in (2, 5, 20):
            rec, nd = reference(user, item, train, test, k)
            assert torch.allclose(res.recall[k], torch.tensor([rec[u] for u in res.users.tolist()]))
            assert torch.allclose(res.ndcg[k], torch.tensor([nd[u] for u in res.users.tolist()]))
            assert math.isclose(res.means()[f"recall@{k}"], sum(rec.values()) / len(rec), rel_tol=1e-5)
            assert math.isclose(res.means()[f"ndcg@{k}"], sum(nd.values()) / len(nd), rel_tol=1e-5)


def test_hand_computed_single_user():
    # scores of items 0..4 for the one user: 5, 4, 3, 2, 1; item 0 is a training item
    user = torch.tensor([[1.0]])
    item = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    train, test = torch.tensor([[0], [0]]), torch.tensor([[0, 0], [2, 4]])
    res = full_ranking(user, item, test, train, ks=(2, 4))
    # top-2 after masking: items 1, 2 -> one hit at rank 2
    assert math.isclose(float(res.recall[2]), 0.5)
    assert math.isclose(float(res.ndcg[2]), (1 / math.log2(3)) / (1 + 1 / math.log2(3)), rel_tol=1e-6)
    # top-4: 1, 2, 3, 4 -> hits at ranks 2 and 4
    assert math.isclose(float(res.recall[4]), 1.0)
    assert math.isclose(float(res.ndcg[4]), (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)), rel_tol=1e-6)


def test_training_items_never_reach_the_top_k():
    user, item, train, _ = tiny_problem(seed=1)
    user = user.abs() + 0.1                        # positive users: adding to an item raises its score
    item = item * 0 + item[:1]                     # every item has the same score ...
    item[train[1]] += 100.0                        # ... except training items, pushed to the top
    top = topk_items(user, item, train, k=20, chunk=3)
    for u in range(user.shape[0]):
        assert not set(top[u].tolist()) & set(train[1][train[0] == u].tolist())


def test_default_ks_are_20_and_40():
    user, item, train, test = tiny_problem(I=60)
    assert set(full_ranking(user, item, test, train).means()) == {"recall@20", "recall@40", "ndcg@20", "ndcg@40"}
