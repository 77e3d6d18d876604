"""TiledResults without a server: a write to an address nobody answers fails fast and is kept."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sparkmpi._proc import free_port
from sparkmpi.bluesky.tiled import TiledResults, TiledUnavailable
from sparkmpi.errors import InvalidArgument


def test_a_write_with_the_server_down_fails_fast_names_it_and_is_kept():
    uri = f"http://127.0.0.1:{free_port()}"
    results = TiledResults(uri, "key")
    t0 = time.monotonic()
    for n in range(3):   # Tiled's own client would retry each for ~25 s
        with pytest.raises(TiledUnavailable, match=f"snapshot of scan s1 to Tiled at {uri}"):
            results.write_snapshot("s1", n, np.zeros((4, 4)), {"n": n})
    with pytest.raises(TiledUnavailable, match=uri):
        results.write_final("s1", np.zeros((4, 4)), np.ones((2, 2)), [1.0], {"final": True}, exit_status="success")
    assert time.monotonic() - t0 < 3.0   # four writes, each one refused probe
    assert [op[0] for op in results.pending] == ["snapshot"] * 3 + ["final"]   # in order, none lost
    assert [op[2] for op in results.pending[:3]] == [0, 1, 2] and results.written == 0
    with pytest.raises(TiledUnavailable):
        results.flush_pending()
    assert len(results.pending) == 4


@pytest.mark.parametrize("kwargs", [{"retry_window": 0}, {"retry_window": True}, {"probe_timeout": -1.0},
                                    {"probe_timeout": "1"}])
def test_bad_settings_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InvalidArgument, match=name):
        TiledResults("http://127.0.0.1:1", "key", **kwargs)
    with pytest.raises(InvalidArgument, match="uri"):
        TiledResults("127.0.0.1:1", "key")
