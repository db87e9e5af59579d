"""Atlases made before preprocessing was part of unit keys: their units are kept, once.

A model whose preprocessing atlas chose itself (the bundled models, torchvision, a plain module
read with atlas's defaults) keeps its keys as they were (LoadedModel.legacy). Any other (a
factory's LoadedModel) now has its preprocessing in every key. The units such an atlas stored
under the key of before are taken as made with the current preprocessing (atlas cannot tell
otherwise: plan.json did not record it) and re-keyed, with one line that says so; from then on
plan.json records the preprocessing, so a later change of it reruns them.
"""

from __future__ import annotations

import dataclasses

from atlas.files import atomic_write_json
from atlas.plan import Plan, make_plan
from atlas.record import UnitRecord


def made_before_keying(store, plan: Plan, model, previous: dict | None) -> dict:
    """{(layer, index): (stored record, its new key)} for the done units stored under the key
    they had before preprocessing was keyed, in an atlas whose plan.json predates that."""
    recorded = "preprocessing" in ((previous or {}).get("model") or {})
    if previous is None or recorded or model.identity == model.digest:
        return {}
    before = {(u.layer, u.index): u.key for u in make_plan(plan.config, model, model.digest).units}
    stored = store.index()
    found = {}
    for unit in plan.units:
        record = stored.get((unit.layer, unit.index))
        place = (unit.layer, unit.index)
        if record is not None and record.status == "done" and record.key == before.get(place):
            found[place] = (record, unit.key)
    return found


def rekey(store, found: dict) -> int:
    """Rewrite each found unit's record with its new key (atomically); how many."""
    for record, key in found.values():
        updated: UnitRecord = dataclasses.replace(record, key=key)
        atomic_write_json(store.unit_path(record.layer, record.index, ".json"), updated.as_json())
    return len(found)
