# The compiled replay (src/vramcalc/memory/allocator/_replay.c); see
# allocator_replay.replay_program.
from array import array
from collections.abc import Sequence

def replay_program(
    load: Sequence[tuple[int, int]],
    steps: Sequence[tuple[array[int], array[int], array[int], int]],
    bounds: Sequence[int],
    expandable: bool,
    descending: bool = False,
    /,
) -> tuple[int, int, tuple[int, ...], int, int, int, tuple[int, ...]]: ...

def owners(
    requests: Sequence[tuple[int, int]],
    starts: Sequence[int],
    /,
) -> tuple[bytes, bytes] | None: ...
