"""returner.stream.Stream against a real redis-server: the list-to-stream mirror, reads,
claims, acks, dead letters and status. Claims and pending re-reads run on every
redis-server version available, since their reply shapes differ between 6.2 and 7.x."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import redis

from returner.stream import Consumer, Keys, Settling, Stream
from returner.task import Entry, Kind
from tests.conftest import acked, dead_lettered, settled, wait_for

GROUP = "g"
# Payloads the mirror must carry byte for byte: invalid UTF-8, NUL, empty, multi-byte.
PAYLOADS = [b"\xff\xfe\x00raw", b'{"request_id": "r"}', "caf\u00e9 \u540d".encode(), b"", b"\x80"]


def fresh_queue() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def make(client: redis.Redis, queue: str, consumer: str = "c1") -> Consumer:
    member = Consumer(client, queue, GROUP, consumer)
    member.stream.ensure_group()
    return member


def pel(client: redis.Redis, stream: Consumer) -> dict[str, tuple[str, int]]:
    """Every pending entry of the group: ID -> (consumer, delivery count)."""
    rows: list[dict[str, Any]] = client.xpending_range(stream.keys.stream, GROUP, "-", "+", 1000)
    return {
        row["message_id"].decode(): (row["consumer"].decode(), int(row["times_delivered"]))
        for row in rows
    }


def idle_ms(client: redis.Redis, stream: Consumer, entry_id: str) -> int:
    rows = client.xpending_range(stream.keys.stream, GROUP, entry_id, entry_id, 1)
    return int(rows[0]["time_since_delivered"])


def xrange(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    rows: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(key)  # type: ignore[assignment]
    return rows


def stream_tasks(client: redis.Redis, stream: Consumer) -> list[bytes]:
    return [fields[b"task"] for _, fields in xrange(client, stream.keys.stream)]


def test_keys_share_the_queue_hash_tag() -> None:
    keys = Keys.for_queue("hosting:tasks")
    assert keys.queue == "hosting:tasks"
    assert keys.stream == "{hosting:tasks}:stream"
    assert keys.dead == "{hosting:tasks}:dead"


def test_fetch_moves_at_most_count_byte_for_byte(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, *PAYLOADS)

    first = stream.fetch(3)

    assert [e.payload for e in first] == PAYLOADS[:3]
    assert all(e.deliveries == 1 for e in first)
    assert r.lrange(queue, 0, -1) == PAYLOADS[3:]
    assert stream_tasks(r, stream) == PAYLOADS[:3]
    assert pel(r, stream) == {e.id: ("c1", 1) for e in first}

    rest = stream.fetch(10)
    assert [e.payload for e in rest] == PAYLOADS[3:]
    assert r.llen(queue) == 0
    assert stream.fetch(10) == []


def test_wait_for_tasks_wakes_on_a_push_from_another_thread(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    failures: list[BaseException] = []

    def push_once_blocked() -> None:
        try:
            wait_for(lambda: r.info("clients")["blocked_clients"] >= 1, 5, what="a blocked client")
            r.rpush(queue, b"\xffwake")
        except BaseException as exc:
            failures.append(exc)

    pusher = threading.Thread(target=push_once_blocked)
    pusher.start()
    started = time.monotonic()
    stream.wait_for_tasks(10)
    elapsed = time.monotonic() - started
    pusher.join(10)

    assert not failures
    assert elapsed < 5
    assert r.lrange(queue, 0, -1) == [b"\xffwake"]


def test_wait_for_tasks_leaves_the_list_unchanged(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, *PAYLOADS)

    started = time.monotonic()
    stream.wait_for_tasks(5)

    assert time.monotonic() - started < 2
    assert r.lrange(queue, 0, -1) == PAYLOADS
    assert r.xlen(stream.keys.stream) == 0


def test_wait_for_tasks_times_out_on_an_empty_list(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)

    started = time.monotonic()
    stream.wait_for_tasks(0.3)
    elapsed = time.monotonic() - started

    assert 0.25 <= elapsed < 3
    assert r.llen(queue) == 0


def test_own_pending_rereads_with_rising_delivery_counts(r: redis.Redis, queue: str) -> None:
    mine, other = make(r, queue, "c1"), make(r, queue, "c2")
    r.rpush(queue, b"a", b"\xffb", b"c")
    fetched = mine.fetch(3)
    r.rpush(queue, b"not mine")
    other.fetch(1)

    entries, last, gone = mine.own_pending("0", 10)
    assert [(e.id, e.payload, e.deliveries) for e in entries] == [
        (e.id, e.payload, 2) for e in fetched]
    assert (last, gone) == (fetched[-1].id, 0)

    again, _, _ = mine.own_pending("0", 10)
    assert [e.deliveries for e in again] == [3, 3, 3]
    assert pel(r, mine)[fetched[0].id] == ("c1", 3)


def test_own_pending_pages_after_the_last_id(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"a", b"b", b"c")
    fetched = stream.fetch(3)

    page1, last1, _ = stream.own_pending("0", 2)
    page2, last2, _ = stream.own_pending(last1, 2)
    page3, last3, _ = stream.own_pending(last2, 2)

    assert [e.id for e in page1] == [fetched[0].id, fetched[1].id]
    assert last1 == fetched[1].id
    assert [e.id for e in page2] == [fetched[2].id]
    assert (page3, last3) == ([], last2)


def test_own_pending_acks_entries_deleted_while_pending(each_redis: redis.Redis) -> None:
    queue = fresh_queue()
    stream = make(each_redis, queue)
    each_redis.rpush(queue, b"gone", b"kept")
    gone_entry, kept = stream.fetch(2)
    each_redis.xdel(stream.keys.stream, gone_entry.id)

    entries, last, gone = stream.own_pending("0", 10)

    assert [(e.id, e.payload) for e in entries] == [(kept.id, b"kept")]
    assert gone == 1
    assert last == kept.id
    assert pel(each_redis, stream) == {kept.id: ("c1", 2)}


def test_claim_takes_idle_entries_with_their_counts(each_redis: redis.Redis) -> None:
    queue = fresh_queue()
    dead, live = make(each_redis, queue, "dead-1"), make(each_redis, queue, "live")
    each_redis.rpush(queue, b"\xffold-a", b"old-deleted", b"old-c")
    old_a, deleted, old_c = dead.fetch(3)
    each_redis.xdel(dead.keys.stream, deleted.id)
    wait_for(
        lambda: min(idle_ms(each_redis, dead, e.id) for e in (old_a, old_c)) >= 300,
        10,
        what="old entries idle for 300 ms",
    )
    each_redis.rpush(queue, b"fresh")
    [fresh] = dead.fetch(1)

    entries, next_start, gone = live.claim(300, "0-0", 10)

    assert [(e.id, e.payload, e.deliveries) for e in entries] == [
        (old_a.id, b"\xffold-a", 2),
        (old_c.id, b"old-c", 2),
    ]
    assert gone == 1
    assert next_start == "0-0"
    assert pel(each_redis, live) == {
        old_a.id: ("live", 2),
        old_c.id: ("live", 2),
        fresh.id: ("dead-1", 1),
    }


def test_claim_leaves_fresh_entries_alone(each_redis: redis.Redis) -> None:
    queue = fresh_queue()
    busy, thief = make(each_redis, queue, "busy"), make(each_redis, queue, "thief")
    each_redis.rpush(queue, b"in flight")
    [entry] = busy.fetch(1)

    entries, next_start, gone = thief.claim(60_000, "0-0", 10)

    assert (entries, next_start, gone) == ([], "0-0", 0)
    assert pel(each_redis, busy) == {entry.id: ("busy", 1)}


def test_ack_removes_entries_from_pel_and_stream(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"a", b"b", b"c")
    a, b, c = stream.fetch(3)

    stream.settle(acked(a, c))
    stream.settle(acked())

    assert pel(r, stream) == {b.id: ("c1", 1)}
    assert r.xlen(stream.keys.stream) == 1
    assert stream_tasks(r, stream) == [b"b"]


def test_dead_letter_keeps_original_bytes_and_settles_the_entry(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"\xff\x00poison", b"other")
    poison, other = stream.fetch(2)

    stream.settle(dead_lettered(poison, "segment vanished", "req-9"))

    [(_, fields)] = xrange(r, stream.keys.dead)
    assert fields[b"task"] == b"\xff\x00poison"
    assert fields[b"error"] == b"segment vanished"
    assert fields[b"deliveries"] == b"1"
    assert fields[b"request_id"] == b"req-9"
    assert pel(r, stream) == {other.id: ("c1", 1)}
    assert stream_tasks(r, stream) == [b"other"]


def test_each_settled_entry_gets_one_event_with_the_contracts_fields(
    r: redis.Redis, queue: str
) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"good", b"bad")
    good, bad = stream.fetch(2)
    done = settled(Kind.DUPLICATE, good, "req", "img-1", "/out/img-1.jpg")
    failed = settled(Kind.FAILED, bad, "req", "img-2", None, "no segment")

    assert stream.settle([done, failed]) == 2

    events = [fields for _, fields in xrange(r, stream.keys.events)]
    assert [e[b"entry_id"] for e in events] == [good.id.encode(), bad.id.encode()]
    assert {k.decode() for k in events[0]} == {
        "request_id", "image_id", "status", "outcome", "file_path", "image_url", "error",
        "entry_id", "timestamp"}
    assert (events[0][b"status"], events[0][b"outcome"], events[0][b"file_path"]) == (
        b"completed", b"duplicate", b"/out/img-1.jpg")
    assert (events[1][b"status"], events[1][b"outcome"], events[1][b"error"]) == (
        b"failed", b"failed", b"no segment")
    assert events[1][b"file_path"] == b"" and events[0][b"error"] == b""
    assert events[0][b"timestamp"].endswith(b"+00:00")
    assert [f[b"task"] for _, f in xrange(r, stream.keys.dead)] == [b"bad"]


def test_an_entry_settled_elsewhere_gets_no_second_event(r: redis.Redis, queue: str) -> None:
    """Two workers holding one entry (one claimed it from the other) both settle it: the
    second finds it acked, and adds neither an event nor a dead letter."""
    slow, fast = make(r, queue, "slow"), make(r, queue, "fast")
    r.rpush(queue, b"task")
    [entry] = slow.fetch(1)

    assert fast.settle(acked(entry)) == 1
    assert slow.settle(acked(entry)) == 0
    assert slow.settle(dead_lettered(entry, "late")) == 0

    assert r.xlen(slow.keys.events) == 1 and r.xlen(slow.keys.dead) == 0


def test_an_unsettled_entry_has_no_event(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"held")
    stream.fetch(1)
    stream.touch(list(pel(r, stream)))
    assert r.xlen(stream.keys.events) == 0


def test_events_are_capped_at_about_events_maxlen(r: redis.Redis, queue: str) -> None:
    stream = Consumer(r, queue, GROUP, "c1", settling=Settling(events_maxlen=50))
    stream.stream.ensure_group()
    r.rpush(queue, *[f"t{i}".encode() for i in range(1000)])
    while entries := stream.fetch(100):
        stream.settle(acked(*entries))
    # MAXLEN ~ trims whole macro-nodes (100 entries by default), never below the cap.
    assert 50 <= r.xlen(stream.keys.events) <= 150


def test_events_are_published_upstream_style_when_asked(r: redis.Redis, queue: str) -> None:
    stream = Consumer(r, queue, GROUP, "c1", settling=Settling(publish_events=True))
    stream.stream.ensure_group()
    listener = r.pubsub()
    listener.subscribe("events:req-7")
    wait_for(lambda: listener.get_message(timeout=0.1), what="the subscription")
    r.rpush(queue, b"a", b"b")
    a, b = stream.fetch(2)
    done = settled(Kind.COMPLETED, a, "req-7", "img", "/o/img.jpg")
    stream.settle([done])
    stream.settle(dead_lettered(b, "bad shape", "req-7", "img-b"))

    messages = [wait_for(lambda: listener.get_message(timeout=0.1), what="an event")
                for _ in range(2)]
    docs = [json.loads(m["data"]) for m in messages]
    assert [(d["request_id"], d["event"]) for d in docs] == [
        ("req-7", "hosting_completed"), ("req-7", "hosting_failed")]
    assert docs[0]["data"]["file_path"] == "/o/img.jpg"
    assert docs[1]["data"]["error"] == "bad shape"
    listener.close()


def test_read_events_follows_from_an_id(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"a", b"b", b"c")
    a, b, c = stream.fetch(3)
    stream.settle(acked(a, b))
    first = stream.stream.read_events()
    assert [e["entry_id"] for e in first] == [a.id, b.id]
    assert stream.stream.read_events(first[-1].id, block_ms=10) == []
    stream.settle(acked(c))
    assert [e["entry_id"] for e in stream.stream.read_events(first[-1].id)] == [c.id]
    assert [e["entry_id"] for e in stream.stream.last_events(2)] == [b.id, c.id]


def test_revive_moves_a_dead_letter_back_as_a_new_entry(r: redis.Redis, queue: str) -> None:
    stream = make(r, queue)
    r.rpush(queue, b"\xfe retry me")
    [entry] = stream.fetch(1)
    stream.settle(dead_lettered(entry, "transient"))
    [letter] = stream.stream.dead_letters(10)
    dead_id = letter.id

    new_id = stream.stream.revive(dead_id)

    assert new_id is not None and new_id != entry.id
    assert r.xlen(stream.keys.dead) == 0
    [again] = stream.fetch(10)
    assert (again.id, again.payload, again.deliveries) == (new_id, b"\xfe retry me", 1)
    assert stream.stream.revive(dead_id) is None


def test_touch_resets_idle_time_without_counting_a_delivery(r: redis.Redis, queue: str) -> None:
    holder, thief = make(r, queue, "holder"), make(r, queue, "thief")
    r.rpush(queue, b"held")
    [entry] = holder.fetch(1)
    wait_for(lambda: idle_ms(r, holder, entry.id) >= 400, 10, what="entry idle for 400 ms")

    holder.touch([entry.id])

    assert idle_ms(r, holder, entry.id) < 400
    assert thief.claim(400, "0-0", 10)[0] == []
    assert pel(r, holder) == {entry.id: ("holder", 1)}


def test_status_reports_lengths_pending_and_dead_letters(r: redis.Redis, queue: str) -> None:
    busy, quitter = make(r, queue, "busy"), make(r, queue, "quitter")
    r.rpush(queue, *[f"t{i}".encode() for i in range(5)])
    busy.fetch(2)
    [bad] = quitter.fetch(1)
    quitter.settle(dead_lettered(bad, "bad"))

    def oldest_busy_ms() -> int:
        by_name = {c.name: c for c in busy.stream.status(10_000).consumers}
        return int(by_name["busy"].oldest_pending_ms or 0)

    wait_for(lambda: oldest_busy_ms() >= 150, 10, what="oldest pending entry 150 ms old")
    status = busy.stream.status(10_000)

    assert status.list_length == 2
    assert status.stream_length == 2
    assert status.dead_letters == 1
    assert status.pending == 2
    by_name = {c.name: c for c in status.consumers}
    assert by_name["busy"].pending == 2
    assert (by_name["busy"].oldest_pending_ms or 0) >= 150
    assert by_name["quitter"].pending == 0
    assert by_name["quitter"].oldest_pending_ms is None


def test_status_before_any_group_exists(r: redis.Redis, queue: str) -> None:
    r.rpush(queue, b"waiting")

    status = Stream(r, queue, GROUP).status(10_000)

    assert status.list_length == 1
    assert status.stream_length == 0
    assert status.consumers == []
    assert status.pending == 0


def test_fetch_recreates_the_group_after_the_stream_is_deleted(each_redis: redis.Redis) -> None:
    queue = fresh_queue()
    stream = make(each_redis, queue)
    each_redis.rpush(queue, b"before")
    [before] = stream.fetch(1)
    stream.settle(acked(before))
    each_redis.delete(stream.keys.stream)
    each_redis.rpush(queue, b"\xffafter")

    delivered = stream.fetch(10) + stream.fetch(10)

    assert [e.payload for e in delivered] == [b"\xffafter"]
    assert each_redis.llen(queue) == 0
    groups = each_redis.xinfo_groups(stream.keys.stream)
    assert [g["name"] for g in groups] == [GROUP.encode()]


def test_claim_pages_with_its_cursor(each_redis: redis.Redis) -> None:
    queue = fresh_queue()
    dead, live = make(each_redis, queue, "dead-1"), make(each_redis, queue, "live")
    each_redis.rpush(queue, b"a", b"b", b"c")
    fetched = dead.fetch(3)
    wait_for(lambda: idle_ms(each_redis, dead, fetched[-1].id) >= 100, 10, what="idle entries")

    claimed: list[Entry] = []
    cursor, pages = "0-0", 0
    while pages == 0 or cursor != "0-0":
        entries, cursor, _ = live.claim(100, cursor, 1)
        claimed += entries
        pages += 1
        assert pages <= 10, "the claim cursor never wrapped"

    assert [e.payload for e in claimed] == [b"a", b"b", b"c"]
    assert pages >= 3
    assert {consumer for consumer, _ in pel(each_redis, live).values()} == {"live"}


def test_latest_dead_letters_page_newest_first(each_redis: redis.Redis) -> None:
    queue = fresh_queue()
    stream = make(each_redis, queue)
    each_redis.rpush(queue, *[f"t{i}".encode() for i in range(5)])
    for entry in stream.fetch(5):
        stream.settle(dead_lettered(entry, f"bad {entry.payload.decode()}"))
    queue_wide = stream.stream
    oldest_first = [letter.id for letter in queue_wide.dead_letters(10)]

    first = queue_wide.latest_dead_letters(2)
    rest = queue_wide.latest_dead_letters(10, before=first[-1].id)

    assert [letter.id for letter in first + rest] == oldest_first[::-1]
    assert [letter.error for letter in first] == ["bad t4", "bad t3"]
    assert queue_wide.latest_dead_letters(10, before=oldest_first[0]) == []
    assert Stream(each_redis, fresh_queue(), GROUP).latest_dead_letters(5) == []
