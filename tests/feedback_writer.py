"""A writer process for the kill -9 test: appends event batches to a `FeedbackLog` until killed.

Usage: python tests/feedback_writer.py WAL_DIR [--threads N] [--batch N] [--segment-bytes N]

After each `append` returns, it prints `ack <event_id> <event_id> …` (one line per acknowledged
batch, flushed), so the test knows exactly which events the log promised to keep.
"""

import argparse
import os
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from shelfwise.runtime.feedback import FeedbackLog

DAY = datetime(2026, 11, 1, tzinfo=UTC)


def _events(prefix: str, number: int, size: int) -> list[dict[str, object]]:
    return [
        {
            "event_id": f"{prefix}-{number}-{index}",
            # Two days, so a segment is split over two partitions.
            "occurred_at": DAY + timedelta(hours=(number * size + index) % 48),
            "user_id": f"u{index % 7}",
            "session_id": f"s{number}",
            "item_id": f"i{index}",
            "event_type": "view",
            "quantity": 1,
            "price": 9.5,
            "rec_id": None,
            "source": "kill-test",
        }
        for index in range(size)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("wal_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--segment-bytes", type=int, default=64 * 1024)
    args = parser.parse_args()
    log = FeedbackLog(args.wal_dir, max_segment_bytes=args.segment_bytes)
    output = threading.Lock()

    def write(thread: int) -> None:
        prefix = f"{os.getpid()}.{thread}"
        number = 0
        while True:
            rows = _events(prefix, number, args.batch)
            log.append("events", rows)
            line = "ack " + " ".join(str(row["event_id"]) for row in rows) + "\n"
            with output:
                sys.stdout.write(line)
                sys.stdout.flush()
            number += 1

    threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
