"""Mask overlap, remaining weights and learning distance on hand-made masks and weights."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secateurs.analysis.mask_metrics import learning_distance, mask_hamming, mask_iou, remaining_weights
from secateurs.errors import ConfigError
from secateurs.masks import Masks

T, F = True, False
A = {"x": torch.tensor([T, T, F, F]), "y": torch.tensor([[T, F], [F, F]])}
B = {"x": torch.tensor([T, F, T, F]), "y": torch.tensor([[F, F], [F, F]])}


def test_iou_per_layer_and_total_from_counts():
    out = mask_iou(A, B)
    assert out["layers"]["x"] == {"iou": pytest.approx(1 / 3), "intersection": 1, "union": 3}
    assert out["layers"]["y"] == {"iou": 0.0, "intersection": 0, "union": 1}
    # total from summed counts (1/4), not the mean of layers (1/6)
    assert out["iou"] == pytest.approx(0.25) and out["intersection"] == 1 and out["union"] == 4
    assert mask_iou(A, A)["iou"] == 1.0


def test_iou_of_empty_masks_is_one():
    empty = {"z": torch.zeros(3, dtype=torch.bool)}
    out = mask_iou(empty, {"z": torch.zeros(3, dtype=torch.bool)})
    assert out["iou"] == 1.0 and out["layers"]["z"]["iou"] == 1.0


def test_hamming_per_layer_and_total():
    out = mask_hamming(A, B)
    assert out["layers"]["x"] == {"distance": 0.5, "differ": 2, "numel": 4}
    assert out["layers"]["y"] == {"distance": 0.25, "differ": 1, "numel": 4}
    assert (out["distance"], out["differ"], out["numel"]) == (3 / 8, 3, 8)
    assert mask_hamming(A, A)["distance"] == 0.0


def test_remaining_weights():
    out = remaining_weights(A)
    assert out["layers"]["x"] == {"fraction": 0.5, "remaining": 2, "numel": 4}
    assert out["layers"]["y"]["fraction"] == 0.25
    assert (out["fraction"], out["remaining"], out["numel"]) == (3 / 8, 3, 8)


def test_accepts_masks_objects():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m = Masks(model)
    m.masks["0.weight"] = torch.tensor([[T, F], [F, F]])
    assert remaining_weights(m)["remaining"] == 5
    other = {n: torch.ones(2, 2, dtype=torch.bool) for n in m.masks}
    assert mask_hamming(m, other)["differ"] == 3
    assert mask_iou(other, m)["iou"] == pytest.approx(5 / 8)


def test_mismatched_names_or_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="only in the first: y"):
        mask_iou(A, {"x": B["x"]})
    with pytest.raises(ConfigError, match="only in the second: w"):
        mask_hamming(A, {**B, "w": B["x"]})
    with pytest.raises(ConfigError, match=r"x is \(4,\).*\(3,\)"):
        mask_iou(A, {**B, "x": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="b"):
        learning_distance({"w": torch.zeros(2)}, {"w": torch.zeros(2), "b": torch.zeros(1)})


def test_learning_distance_hand_computed():
    init = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    final = {"w": torch.tensor([4.0, 6.0]), "b": torch.tensor([2.0])}
    out = learning_distance(init, final)
    assert out["layers"]["w"]["distance"] == pytest.approx(5.0)
    assert out["layers"]["b"]["distance"] == pytest.approx(2.0)
    assert out["distance"] == pytest.approx(math.sqrt(29.0)) and out["numel"] == 3
    # restricted to the mask: w counts only its first entry (3.0); b has no mask, counts in full
    masked = learning_distance(init, final, {"w": torch.tensor([T, F])})
    assert masked["layers"]["w"] == {"distance": pytest.approx(3.0), "numel": 1}
    assert masked["distance"] == pytest.approx(math.sqrt(13.0)) and masked["numel"] == 2
    with pytest.raises(ConfigError, match="w"):
        learning_distance(init, final, {"w": torch.tensor([T, F, T])})
    with pytest.raises(ConfigError, match="fc"):
        learning_distance(init, final, {"fc": torch.tensor([T])})
