import gc

from tunesmith.model.heap import freeze_heap


def test_freeze_heap_exempts_what_exists_and_collects_what_comes_later():
    class Node:
        pass

    survivor = Node()
    survivor.self = survivor  # a cycle still referenced: frozen, not freed
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        assert not any(obj is survivor for obj in gc.get_objects())  # out of the collector's generations
        later = Node()
        later.self = later
        del later
        assert gc.collect() >= 1  # garbage made after the freeze is still collected
    finally:
        gc.unfreeze()
