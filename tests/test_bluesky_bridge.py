"""The Bluesky bridge on a real broker: documents topic -> frames topic, dead letters, restart exactly once."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from bluesky_fixtures import FRAME, RunDocs, publish
from sparkmpi.stream.bluesky_bridge import DocumentBridge
from sparkmpi.stream.frames import decode_message
from sparkmpi.stream.offsets import read_offset_range, watermarks

pytestmark = pytest.mark.slow


def read_all(bootstrap, topic):
    (low, high), = watermarks(bootstrap, topic, [0]).values()
    return read_offset_range(bootstrap, topic, 0, low, high, timeout=10)


def frames_of(bootstrap, topic):
    out = []
    for record in read_all(bootstrap, topic):
        header, array = decode_message(record.value)
        out.append((header.scan_id, header.index, header.position, np.array(array)))
    return out


def drain(bridge):
    while bridge.step():
        pass


def write_h5(path, n):
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack([np.full(FRAME, 10.0 + i, np.float32)
                                                            for i in range(n)]))


def test_runs_become_frames_and_bad_input_goes_to_dead_letters(broker, tmp_path):
    bootstrap = broker.bootstrap
    topic = f"bs-{uuid.uuid4().hex[:8]}"
    inline = RunDocs(3)
    external = RunDocs(3, external=True, resource_root=tmp_path)
    write_h5(tmp_path / "frames.h5", 2)           # point 2 is missing from the file: unreadable
    aborted = RunDocs(2)
    stranger = RunDocs(1)
    docs = inline.all() + [b"\x00garbage"] + [("event", stranger.event(0)[0][1])] + external.all() \
        + aborted.all("abort")
    publish(bootstrap, topic, docs)
    notes = []
    bridge = DocumentBridge(bootstrap, topic, on_action=notes.append).start()
    try:
        drain(bridge)
        assert bridge.drained()
    finally:
        bridge.close()
    frames = frames_of(bootstrap, bridge.frames_topic)
    by_scan = {}
    for uid, index, pos, array in frames:
        by_scan.setdefault(uid, []).append((index, pos, array))
    assert [i for i, _, _ in by_scan[inline.uid]] == [0, 1, 2]
    assert by_scan[inline.uid][2][1] == (4.0, 6.0)
    np.testing.assert_array_equal(by_scan[inline.uid][1][2], inline.frame(1))
    assert [i for i, _, _ in by_scan[external.uid]] == [0, 1]
    np.testing.assert_array_equal(by_scan[external.uid][1][2], np.full(FRAME, 11.0, np.float32))
    assert [i for i, _, _ in by_scan[aborted.uid]] == [0, 1]        # an aborted scan's frames are kept
    letters = read_all(bootstrap, f"{topic}.dlq")
    assert bridge.dead_letters == {"undecodable": 1, "unknown_descriptor": 1, "unreadable_datum": 1,
                                   "scan_aborted": 1}
    assert len(letters) == 4
    assert letters[0].value == b"\x00garbage"                       # the original bytes are kept
    assert {n.exit_status for n in notes if type(n).__name__ == "ScanClosed"} == {"success", "abort"}


def test_restart_mid_scan_writes_every_frame_once(broker):
    bootstrap = broker.bootstrap
    topic = f"bs-{uuid.uuid4().hex[:8]}"
    run = RunDocs(8)
    docs = run.all()
    first, rest = docs[:6], docs[6:]                  # start, descriptor, four events | four events, stop
    publish(bootstrap, topic, first)
    bridge = DocumentBridge(bootstrap, topic).start()

    def crash(offset):
        raise RuntimeError("killed between storing the frames and committing")

    bridge._commit = crash                             # the frames are stored, the offsets not committed
    with pytest.raises(RuntimeError, match="killed"):
        bridge.step()
    bridge.close()
    publish(bootstrap, topic, rest)
    again = DocumentBridge(bootstrap, topic).start()   # a new consumer, as after a restart
    try:
        assert again.state.scans[run.uid].frame_shape == FRAME      # rebuilt from the replay
        drain(again)
    finally:
        again.close()
    frames = frames_of(bootstrap, again.frames_topic)
    assert [index for _, index, _, _ in frames] == list(range(8))   # none lost, none twice
    assert frames[7][2] == (14.0, 21.0)
    third = DocumentBridge(bootstrap, topic).start()   # and a clean restart adds nothing
    try:
        drain(third)
    finally:
        third.close()
    assert len(frames_of(bootstrap, third.frames_topic)) == 8
