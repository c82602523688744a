"""The schedule's arithmetic: steps per epoch, warmup, the learning rate at each step, micro-batch counts."""

import pytest

from maecli.train.schedule import Schedule


def test_warmup_then_half_cosine():
    s = Schedule(micro_per_epoch=10, accum_iter=1, total_steps=100, warmup_steps=10, peak_lr=1.0)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(55) == pytest.approx(0.5)
    assert s.lr_at(100) == pytest.approx(0.0)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(10, 100))


def test_min_lr_is_the_floor():
    s = Schedule(10, 1, 50, 0, peak_lr=1e-3, min_lr=1e-5)
    assert s.lr_at(0) == pytest.approx(1e-3)
    assert s.lr_at(50) == pytest.approx(1e-5)


def test_plan_counts_steps_and_caps_warmup():
    s = Schedule.plan(micro_per_epoch=7, accum_iter=2, peak_lr=1.0, epochs=3, warmup_epochs=5)
    assert s.steps_per_epoch == 4  # 2 + 2 + 2 + 1 micro-batches
    assert s.total_steps == 12 and s.epochs == 3
    assert s.warmup_steps == 6  # 5 epochs asked for, capped at half the run
    assert Schedule.plan(7, 2, 1.0, epochs=3, steps=5).total_steps == 5  # steps win over epochs
    assert Schedule.plan(7, 2, 1.0, epochs=3, steps=5).epochs == 2


def test_micro_batches_per_step_and_before_a_step():
    s = Schedule.plan(micro_per_epoch=7, accum_iter=2, peak_lr=1.0, epochs=2)
    assert [s.micro_in_step(i) for i in range(8)] == [2, 2, 2, 1] * 2  # an epoch's last step takes what is left
    taken = 0
    for step in range(8):
        assert s.micro_before(step) == taken
        taken += s.micro_in_step(step)
    assert [s.is_epoch_end(n) for n in range(1, 9)] == [False, False, False, True] * 2
    assert [s.epoch_of(i) for i in range(8)] == [0] * 4 + [1] * 4
