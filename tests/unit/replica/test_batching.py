"""The batch key: which work items may share a pipeline call (engine/batching.py, engine/workitems.py)."""

from __future__ import annotations

import dataclasses

import pytest

from serve_app.replica.batching import max_items_per_call, plan_calls
from serve_app.workitems import BatchKey, LoraUse, WorkItem

KEY = BatchKey(model="flux", width=64, height=64, steps=2, guidance=4.0, loras=(LoraUse("a.safetensors", 1.0),))
# Another value for each field of the key: two items differing in it alone must never share a call.
OTHER = {"model": "flux-b", "width": 80, "height": 80, "steps": 3, "guidance": 3.5,
         "loras": (LoraUse("a.safetensors", 0.5),), "lora_mode": "merged"}


def test_every_batch_key_field_has_another_value_here():
    assert {f.name for f in dataclasses.fields(BatchKey)} == set(OTHER)


@pytest.mark.parametrize("field", sorted(OTHER))
def test_items_differing_in_any_call_wide_field_never_share_a_call(field):
    keys = [KEY, dataclasses.replace(KEY, **{field: OTHER[field]}), KEY]
    assert sorted(plan_calls(keys, pixel_budget=10**9)) == [[0, 2], [1]]


def test_every_work_item_field_is_either_per_image_or_in_the_batch_key():
    """A new WorkItem field that changes what a call computes for all its images belongs in BatchKey:
    this fails until the field is put in one place or the other."""
    assert {f.name for f in dataclasses.fields(WorkItem)} == WorkItem.PER_IMAGE | {"key"}


def test_a_loras_multiplier_and_its_file_both_split_calls_but_share_the_lora_set():
    half = dataclasses.replace(KEY, loras=(LoraUse("a.safetensors", 0.5),))
    assert half != KEY and half.lora_set_id == KEY.lora_set_id


def test_an_engines_own_limit_cuts_calls_too():
    assert plan_calls([KEY] * 3, pixel_budget=10**9, engine_limit=1) == [[0], [1], [2]]


def test_the_pixel_budget_cuts_a_key_in_arrival_order():
    assert max_items_per_call(KEY, 3 * 64 * 64) == 3
    assert max_items_per_call(KEY, 1) == 1
    assert plan_calls([KEY] * 7, pixel_budget=3 * 64 * 64) == [[0, 1, 2], [3, 4, 5], [6]]
