"""The shared training loop: LR schedules, determinism, L1, early stopping, progress, accuracy."""
import numpy as np
import pytest
import torch
from digits_util import cnn as _cnn
from digits_util import dataset as _dataset
from digits_util import digits as _digits
from digits_util import one_thread  # noqa: F401  (autouse: this module's tests run on one torch thread)

from edgepack.errors import DataError
from edgepack.steps.train import TrainConfig, evaluate, fit, lr_factor, make_optimizer, make_scheduler


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def small(digits):  # 400 training samples, 200 eval: enough where accuracy is not the point
    train, ev = digits
    return (_dataset(train.inputs["x"][:400], train.labels[:400]),
            _dataset(ev.inputs["x"][:200], ev.labels[:200], "digits-eval"))


def _lrs(cfg: TrainConfig) -> list[float]:
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = make_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_lr_values():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=2)
    expected = [0.1 / 3, 0.2 / 3] + [0.1 * 0.5 * (1 + np.cos(np.pi * e / 8)) for e in range(8)]
    assert _lrs(cfg) == pytest.approx(expected, rel=1e-9)
    assert _lrs(cfg)[2] == pytest.approx(0.1) and _lrs(cfg)[6] == pytest.approx(0.05)


def test_step_and_constant_lr_values():
    cfg = TrainConfig(epochs=7, lr=0.2, schedule="step", step_size=3, gamma=0.5, optimizer="sgd")
    assert _lrs(cfg) == pytest.approx([0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.05])
    assert _lrs(TrainConfig(epochs=3, lr=0.01)) == pytest.approx([0.01] * 3)
    assert lr_factor(TrainConfig(warmup_epochs=1), 0) == 0.5


def test_fit_reports_lr_per_epoch_and_progress(digits):
    train, ev = digits
    torch.manual_seed(0)
    model = _cnn()
    calls = []
    cfg = TrainConfig(epochs=4, lr=3e-3, schedule="cosine", warmup_epochs=1)
    res = fit(model, train, ev, cfg, progress=lambda *a: calls.append(a), seed=1)
    assert [h["lr"] for h in res.history] == pytest.approx([3e-3 * f for f in (0.5, 1.0, 0.75, 0.25)])
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls[-1][2] == pytest.approx(res.history[-1]["loss"], rel=1e-5)
    assert res.history[0]["loss"] > res.history[-1]["loss"]
    assert res.epochs_run == 4 and calls[-1][3] == evaluate(model, ev) > 0.95
    assert res.best_accuracy == max(h["eval_accuracy"] for h in res.history)


def test_same_seed_same_weights(small):
    train, _ = small
    states = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)  # same initial weights; the training seed differs
        model = _cnn()
        fit(model, train, None, TrainConfig(epochs=1, lr=1e-3, batch_size=128), seed=seed)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_l1_shrinks_weights(small):
    train, _ = small
    norms = []
    for l1 in (0.0, 3e-3):
        torch.manual_seed(0)
        model = _cnn()
        fit(model, train, None, TrainConfig(epochs=3, lr=1e-3, l1=l1), seed=0)
        norms.append(sum(float(p.detach().abs().sum()) for p in model.parameters() if p.dim() >= 2))
    assert norms[1] < 0.8 * norms[0]  # measured: 0.7 of the norm without L1


def test_early_stopping_keeps_best_weights(small):
    train, ev = small
    torch.manual_seed(0)
    model = _cnn()
    # no progress possible at this learning rate: stops after 1 + patience epochs
    res = fit(model, train, ev, TrainConfig(epochs=20, lr=1e-12, patience=2), seed=0)
    assert res.epochs_run == 3
    torch.manual_seed(0)
    model = _cnn()
    res = fit(model, train, ev, TrainConfig(epochs=6, lr=0.3, optimizer="sgd", patience=3), seed=0)
    assert evaluate(model, ev) == res.best_accuracy == max(h["eval_accuracy"] for h in res.history)


def test_missing_labels_is_a_data_error(small):
    train, _ = small
    unlabelled = _dataset(train.inputs["x"], None, "unlabelled.npz")
    with pytest.raises(DataError, match="unlabelled.npz: training needs labels"):
        fit(_cnn(), unlabelled, None, TrainConfig(epochs=1))
    with pytest.raises(DataError, match="accuracy needs labels"):
        evaluate(_cnn(), unlabelled)
