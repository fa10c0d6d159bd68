"""Response and event ids (`bentos/ids.py`): version-4 UUIDs, unique, also across a fork."""

import os
import uuid

from bentos.ids import new_id


def test_ids_are_version_4_uuids_as_uuid4_formats_them() -> None:
    for _ in range(1_000):
        text = new_id()
        parsed = uuid.UUID(hex=text)
        assert text == parsed.hex  # 32 lower-case hex digits, as uuid.uuid4().hex
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat() -> None:
    ids = [new_id() for _ in range(200_000)]
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next ids, to the parent, then out without pytest's teardown
        os.write(write_end, " ".join(new_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    parents = {new_id() for _ in range(100)}
    with os.fdopen(read_end) as pipe:
        childs = set(pipe.read().split())
    os.waitpid(child, 0)
    assert len(childs) == 100
    assert not parents & childs
