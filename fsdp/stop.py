"""How a run stops: one line, one exit status, and the process group closed in order.

A stop every rank reaches at the same point (bad data, a checkpoint that cannot be read, a
non-finite step) is said once per node, and the ranks close the process group together. A stop
one rank reaches alone is said by that rank, which exits; torchrun then stops the others (a
barrier would wait forever for ranks that never come). A crash is neither: it propagates.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fsdp.dist import print_per_node, shutdown, speaks_for_node


class Stop(Exception):
    """The run cannot go on; `code` is the exit status. `together`: every rank stops here at once
    (their process group can be closed in order); otherwise a rank stops alone, and exits."""

    def __init__(self, message: str, code: int = 2, together: bool = True):
        super().__init__(message)
        self.code, self.together = code, together


@dataclass
class Ending:
    """The exit status of what ran inside `ending_in_order`."""

    code: int = 0


@contextmanager
def ending_in_order(also: dict[type[Exception], str] | None = None) -> Iterator[Ending]:
    """Around everything the ranks do together, once the process group exists. A Stop ends the run
    with its code; `also`: other exceptions every rank raises together, each with the words its
    line starts with, exit status 2. A run that ends normally closes the process group in order."""
    also = also or {}
    ending = Ending()
    try:
        yield ending
    except Stop as stop:
        ending.code = stop.code
        if not stop.together:
            print(stop, file=sys.stderr, flush=True)
            return
        print_per_node(stop, file=sys.stderr)
    except tuple(also) as refused:
        ending.code = 2
        prefix = next(words for kind, words in also.items() if isinstance(refused, kind))
        print_per_node(f"{prefix}{refused}", file=sys.stderr)
    shutdown()


def refuse_before_start(message: str) -> int:
    """A run refused before the process group exists (a bad config): each node's first rank says it,
    so an error only one node's checkout has is still heard; torchrun stops every rank as soon as
    one exits, so the others wait for that line. Returns the exit status, 2."""
    if speaks_for_node():
        print(message, file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    return 2
