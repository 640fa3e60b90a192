"""9-point validation accuracy in CSS px and degrees, against hand-computed offsets."""

from __future__ import annotations

import math

import pytest

from gazemonai.errors import InvalidInputError
from gazemonai.record.geometry import ViewGeometry
from gazemonai.record.samples import GazeSample
from gazemonai.record.validation import validation_accuracy, validation_targets

G = ViewGeometry(0, 1000, 500, 0, 0, 1.0, 0, 0, 1.0, 10, 10)


def test_targets_are_a_3x3_grid():
    t = validation_targets()
    assert len(t) == 9 and t[0] == (0.1, 0.1) and t[4] == (0.5, 0.5) and t[8] == (0.9, 0.9)


def test_hand_computed_accuracy():
    targets = [(0.5, 0.5), (0.1, 0.1), (0.9, 0.9)]
    per = [
        # centre: samples 3 px right and 4 px down (5 px), and one exactly on it -> mean 2.5 px
        [GazeSample(0, 0.503, 0.508), GazeSample(0.01, 0.5, 0.5), GazeSample(0.02, 0, 0, False)],
        # 10 px left: 10 px
        [GazeSample(0.1, 0.09, 0.1)],
        [GazeSample(0.2, 0, 0, False)],  # only a blink: missing
    ]
    acc = validation_accuracy(targets, per, G)
    assert acc["per_target"][0]["px"] == pytest.approx(2.5) and acc["per_target"][0]["n"] == 2
    assert acc["per_target"][1]["px"] == pytest.approx(10.0)
    assert acc["per_target"][2] == {"x": 0.9, "y": 0.9, "n": 0, "px": None, "deg": None}
    assert acc["px"] == pytest.approx(6.25) and acc["missing"] == 1 and acc["deg"] is None


def test_degrees_at_the_screen_centre():
    # 1000 px = 50 cm: 1 px = 0.05 cm; 20 px right of the centre at 60 cm = atan(1 / 60) = 0.9548 deg
    acc = validation_accuracy([(0.5, 0.5)], [[GazeSample(0, 0.52, 0.5)]], G, screen_cm=50.0, distance_cm=60)
    assert acc["px"] == pytest.approx(20.0)
    assert acc["deg"] == pytest.approx(math.degrees(math.atan(1 / 60)), rel=1e-3)


def test_mismatched_lengths():
    with pytest.raises(InvalidInputError, match="2 targets but 1 sample lists"):
        validation_accuracy([(0.5, 0.5), (0.1, 0.1)], [[]], G)
