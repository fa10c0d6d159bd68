"""What an import read and wrote, and what ingestion will make of it (`ImportReport`)."""

from dataclasses import dataclass, field

from shelfwise.intake.ingest import HeldBatch

_MALFORMED_KEPT = 10  # malformed row texts kept in a report


@dataclass
class ImportReport:
    """What one import did.

    Attributes:
        format: The source format.
        sources: The files read.
        rows_read: Data rows read from the files (events, properties, tree), malformed included.
        rows_malformed: Rows skipped because they do not have the header's number of fields.
        malformed_rows: The first of them, as `file: text`.
        events_written: Event rows written to `landing/events`.
        items_written: Item rows written to `landing/items`.
        users_written: User rows written to `landing/users`.
        files_written: Lake-relative paths of every file written.
        unknown_event_types: Raw event types outside the mapping, with their counts (these rows
            land with the raw value and ingestion quarantines them); after 20 distinct values
            the rest are counted as "(other values)".
        unreadable_values: Per canonical column, how many non-empty source values could not be
            read (they land as nulls; ingestion quarantines rows missing a required value).
        sessions_derived: Whether session ids were derived by the inactivity gap.
        checks: Per source file, a dry run of ingestion's validation of its events.
    """

    format: str
    sources: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_malformed: int = 0
    malformed_rows: list[str] = field(default_factory=list)
    events_written: int = 0
    items_written: int = 0
    users_written: int = 0
    files_written: list[str] = field(default_factory=list)
    unknown_event_types: dict[str, int] = field(default_factory=dict)
    unreadable_values: dict[str, int] = field(default_factory=dict)
    sessions_derived: bool = False
    checks: list["SourceCheck"] = field(default_factory=list)

    def merge(self, other: "ImportReport") -> None:
        """Adds another report's counts and files to this one."""
        self.checks += other.checks
        self.sources += other.sources
        self.rows_read += other.rows_read
        self.rows_malformed += other.rows_malformed
        room = _MALFORMED_KEPT - len(self.malformed_rows)
        self.malformed_rows += other.malformed_rows[: max(room, 0)]
        self.events_written += other.events_written
        self.items_written += other.items_written
        self.users_written += other.users_written
        self.files_written += other.files_written
        for target, counts in (
            (self.unknown_event_types, other.unknown_event_types),
            (self.unreadable_values, other.unreadable_values),
        ):
            for key, count in counts.items():
                target[key] = target.get(key, 0) + count
        self.sessions_derived = self.sessions_derived or other.sessions_derived


@dataclass
class SourceCheck:
    """What ingestion will do with one source file's events: a dry run of its validation.

    The same rules as ingestion (`shelfwise.intake.validation.validate_events`), applied per landing
    batch at import time, so `shelfwise import` can say what will land before the pipeline runs.

    Attributes:
        source: The source file.
        rows: Event rows written to landing.
        rows_to_land: Rows that pass validation.
        set_aside: Guest checkouts and returns by reason (quarantined, never counted invalid).
        rejected: Invalid rows by reason (a row may have several reasons).
        holds: Batches whose invalid share is above the default threshold: ingestion will hold
            them (and their delivery's catalog rows) unless the threshold is raised.
    """

    source: str
    rows: int = 0
    rows_to_land: int = 0
    set_aside: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    holds: list[HeldBatch] = field(default_factory=list)

    @property
    def rows_rejected(self) -> int:
        """Rows ingestion will reject."""
        return self.rows - self.rows_to_land - sum(self.set_aside.values())
