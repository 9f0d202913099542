"""Collecting less often while batch components run, and as before once they stop."""

from __future__ import annotations

import gc

from runtime.garbage import BATCH_THRESHOLDS, fewer_collections


def test_overlapping_components_keep_fewer_collections_until_the_last_stops() -> None:
    """Two components in one process (a router and a replay, say) start and stop in any
    order: the thresholds are the batch ones while either runs, the old ones after."""
    before = gc.get_threshold()
    router, replay = fewer_collections(), fewer_collections()
    router.__enter__()
    replay.__enter__()
    assert gc.get_threshold() == BATCH_THRESHOLDS
    router.__exit__(None, None, None)  # the first to start stops first
    assert gc.get_threshold() == BATCH_THRESHOLDS  # the replay still runs
    replay.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_a_component_that_fails_puts_the_thresholds_back() -> None:
    before = gc.get_threshold()
    try:
        with fewer_collections():
            raise RuntimeError("the component failed")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
