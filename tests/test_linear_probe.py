"""Linear probe: logistic regression against its optimality conditions and a Bayes rate, the lambda
search against brute force, dataset splits and errors."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import linear_probe as lp



@pytest.fixture(autouse=True)
def one_thread():
    """L-BFGS on these tiny problems is thousands of small ops: a second intra-op thread only adds
    synchronisation (30x slower on a busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussians(n, means, std=1.0, seed=0, dtype=torch.float32):
    """n samples per class from N(means[c], std^2 I): X (n·C, D), y (n·C,)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.as_tensor(means, dtype=dtype)
    y = torch.arange(len(means)).repeat_interleave(n)
    return means[y] + std * torch.randn(len(y), means.shape[1], generator=g, dtype=dtype), y


# ----------------------------------------------------------------------------- the lambda search

def grid_argmax(f, steps_per_decade=8):
    """Brute force over the full 97-point grid 1e-6 ... 1e6."""
    grid = [10 ** (e / steps_per_decade) for e in range(-6 * steps_per_decade,
                                                          6 * steps_per_decade + 1)]
    return max(grid, key=f)


@pytest.mark.parametrize("peak", [-4.6, -2.0, 0.37, 1.06, 3.9, 4.4])
def test_search_finds_the_grid_optimum_in_15_evaluations(peak):
    calls = []

    def f(lam):  # unimodal in log10(lam), maximal at 10^peak
        return -(math.log10(lam) - peak) ** 2

    res = lp.search_lambda(lambda lam: calls.append(lam) or f(lam))
    assert res.best == pytest.approx(grid_argmax(f))
    assert abs(math.log10(res.best) - peak) <= 1 / 16 + 1e-9  # resolution: 1/8 decade
    assert len(res.history) == len(set(calls)) == 15  # 7 coarse + 2 per halving (4 halvings)
    # every evaluated lam lies on the 1/8-decade grid inside [1e-6, 1e6]
    for lam, _ in res.history:
        e = math.log10(lam) * 8
        assert abs(e - round(e)) < 1e-9 and -48 <= round(e) <= 48
    assert res.score == max(s for _, s in res.history)


def test_search_at_the_boundary_and_ties():
    res = lp.search_lambda(lambda lam: lam)  # increasing: best at the top of the range
    assert res.best == pytest.approx(1e6) and len(res.history) == 7 + 4  # one neighbour each time
    res = lp.search_lambda(lambda lam: -lam)
    assert res.best == pytest.approx(1e-6) and len(res.history) == 11
    res = lp.search_lambda(lambda lam: 0.5)  # flat (e.g. saturated accuracy): larger lam wins
    assert res.best == pytest.approx(1e6)
    # another range and resolution: 3 coarse points, then 3 halvings (step 2, 1, 1/2, 1/4 decade)
    res = lp.search_lambda(lambda lam: -abs(math.log10(lam) - 0.8), lo=1e-2, hi=1e2,
                           steps_per_decade=4)
    assert res.best == pytest.approx(10 ** 0.75) and len(res.history) == 3 + 2 * 3
    with pytest.raises(ValueError, match="power of two"):
        lp.search_lambda(lambda lam: 0.0, steps_per_decade=6)


# ----------------------------------------------------------------------------- logistic regression

def test_fit_satisfies_the_stated_optimality_conditions():
    """The fit minimises sum CE + lam/2 ||W||^2 (sklearn's C = 1/lam), bias unpenalised:
    its gradient (P - Y)^T X + lam W and sum(P - Y) vanish at the solution. Checked per sample
    (divided by N) at L-BFGS's precision; the mean-CE convention would miss by ~lam·|W|."""
    X, y = gaussians(60, [[0, 0, 0], [1, 1, 0], [0, 1, 1]], seed=1, dtype=torch.float64)
    X = X + torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)  # an offset the bias must absorb
    for lam in (0.1, 2.0, 50.0):
        W, b = lp.fit_logistic_regression(X, y, lam, 3)
        residual = torch.softmax(X @ W.T + b, dim=1) - nn.functional.one_hot(y, 3)  # (N, C)
        N = len(y)
        torch.testing.assert_close((residual.T @ X + lam * W) / N, torch.zeros_like(W),
                                   atol=5e-5, rtol=0)
        torch.testing.assert_close(residual.sum(0) / N, torch.zeros(3, dtype=X.dtype),
                                   atol=5e-5, rtol=0)
        # the mean-CE convention (mean CE + lam/2 ||W||^2) would need this to vanish instead
        assert (residual.T @ X / N + lam * W).abs().max() > 1e-2


def test_regulariser_shrinks_the_weights():
    X, y = gaussians(50, [[0, 0], [1.5, 0.5], [0, 2]], seed=2)
    norms = [lp.fit_logistic_regression(X, y, lam, 3)[0].norm().item()
             for lam in (1e-2, 1, 1e2, 1e4, 1e6)]
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 1e-3 * norms[0]


def test_warm_start_reaches_the_same_solution():
    X, y = gaussians(50, [[0, 0], [2, 0], [0, 2]], seed=3, dtype=torch.float64)
    cold = lp.fit_logistic_regression(X, y, 1.0, 3)
    warm = lp.fit_logistic_regression(X, y, 1.0, 3, init=lp.fit_logistic_regression(X, y, 10.0, 3))
    torch.testing.assert_close(warm[0], cold[0], atol=1e-4, rtol=0)


def test_probe_separable_data_is_near_perfect():
    means = [[8, 0, 0, 0, 0], [0, 8, 0, 0, 0], [0, 0, 8, 0, 0], [0, 0, 0, 8, 0]]
    splits = [gaussians(n, means, seed=s) for n, s in ((60, 0), (20, 1), (200, 2))]
    r = lp.linear_probe(*splits, num_classes=4, max_iter=200)
    assert r["test"] >= 0.99 and r["val"] >= 0.99 and r["fits"] <= 15
    assert (r["n_train"], r["n_val"], r["n_test"]) == (240, 80, 800)
    assert 1e-6 <= r["lambda"] <= 1e6


def test_probe_matches_the_bayes_accuracy_of_two_overlapping_gaussians():
    # N(-e1, I) vs N(+e1, I): the Bayes rule thresholds x1 at 0, accuracy Phi(1) = 0.8413;
    # a well-regularised probe gets within sampling error (std ~0.003 on 20k test points)
    means = [[-1, 0], [1, 0]]
    bayes = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    splits = [gaussians(n, means, seed=s) for n, s in ((2000, 0), (500, 1), (10000, 2))]
    r = lp.linear_probe(*splits, num_classes=2, max_iter=100)
    assert r["test"] == pytest.approx(bayes, abs=0.012)
    # mean per-class accuracy of a balanced problem is the accuracy
    r2 = lp.linear_probe(*splits, num_classes=2, metric="mean_per_class", max_iter=100)
    assert r2["test"] == pytest.approx(r["test"], abs=0.005)


# ----------------------------------------------------------------------------- features, splits, I/O

class FakeImageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.modes = []

    def encode_image(self, images):
        self.modes.append(self.training)
        return self.proj(images)


def test_extract_features_shapes_and_mode():
    model = FakeImageModel().train()
    images, labels = torch.randn(10, 4), torch.arange(10) % 3
    X, y = lp.extract_features(model, DataLoader(TensorDataset(images, labels), batch_size=4))
    assert X.shape == (10, 3) and not X.requires_grad and torch.equal(y, labels)
    torch.testing.assert_close(X, model.proj(images).detach())
    assert model.training and not any(model.modes)


def test_splits_are_disjoint_fixed_and_sized():
    labels = torch.tensor([0] * 70 + [1] * 40 + [2] * 100)
    first, second = lp.per_class_split(labels, 30, seed=0)
    assert not set(first) & set(second) and len(first) + len(second) == 210
    assert torch.bincount(labels[first]).tolist() == [30, 30, 30]
    first, second = lp.per_class_split(labels, 30, 5, seed=0)
    assert torch.bincount(labels[second]).tolist() == [5, 5, 5]
    ds = TensorDataset(torch.arange(50))
    train, val = lp.holdout_split(ds, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40 and not set(train.indices) & set(val.indices)
    assert lp.holdout_split(ds, 0.2, seed=0)[1].indices == val.indices  # same seed, same split


def test_missing_dataset_root_gives_a_one_line_error(tmp_path):
    for name in ("cifar10", "flowers", "dtd", "cars"):
        with pytest.raises(FileNotFoundError) as e:
            lp.probe_splits(name, str(tmp_path / name), None)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)
    with pytest.raises(SystemExit) as e:
        lp.main(["--checkpoint", "x.pt", "--datasets", "builtin,food101", "--data-root",
                 str(tmp_path)])
    assert "\n" not in str(e.value) and str(tmp_path / "food101") in str(e.value)
    with pytest.raises(SystemExit, match="unknown"):
        lp.main(["--checkpoint", "x.pt", "--datasets", "mnist"])


def test_results_table(tmp_path):
    row = {"metric": "accuracy", "lambda": 0.316, "val": 0.9, "test": 0.8, "n_train": 8,
           "n_val": 2, "n_test": 5, "fits": 15}
    table = lp.write_results({"a": row, "b": {**row, "test": 0.6}}, str(tmp_path))
    assert "| a | accuracy | 80.00 | 90.00 | 0.316 | 8 | 2 | 5 |" in table
    assert "| **mean** | | 70.00 |" in table
    assert (tmp_path / "linear_probe.json").exists() and (tmp_path / "linear_probe.md").exists()


def test_cli_builtin_end_to_end(tmp_path):
    import json

    import factory

    model = factory.create_model("tiny", vision_layers=1, transformer_layers=1,
                                 context_length=16)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config, "merges": None},
               path)
    lp.main(["--checkpoint", str(path), "--datasets", "builtin", "--builtin-sizes", "120,48",
             "--max-iter", "30", "--workers", "0", "--device", "cpu", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "linear_probe.json").read_text())["builtin"]
    assert (r["n_train"], r["n_val"], r["n_test"]) == (96, 24, 48)
    assert 0 <= r["test"] <= 1 and r["metric"] == "accuracy"
