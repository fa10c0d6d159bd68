"""Intake: getting a shop's data into the lake.

The importers (a shop's exports), the demo shop's generator and the ingestion of landing batches
into validated, date-partitioned events. Intake reads what the runtime compacted into the lake (the
feedback files), so it may import `shelfwise.runtime`; the runtime never imports intake.
"""
