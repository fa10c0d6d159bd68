"""Runtime: what the serving side keeps while it runs.

The feedback log (write-ahead, compacted into the lake), the online state (in process or Redis) and
the model registry. Imports the core only (`shelfwise.contracts`, `lake`, `validation`, …).
"""
