"""Feature cutoffs: which "as of" timestamps a pipeline run computes features for, and why.

Cutoffs are spaced one label window apart, so the labels of each cutoff come from the window up to
the next one and never overlap the evaluation window:

    training… | training | evaluation | serving
    ──────────┼──────────┼────────────┼──► time
    labels of each cutoff = [cutoff, next cutoff)      serving = end of the data ("now")
"""

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class CutoffPlan:
    """The cutoffs of one pipeline run, by role.

    Attributes:
        training: Past cutoffs whose label windows train the ranker, oldest first.
        evaluation: The cutoff whose label window is held out for evaluation.
        serving: The end of the data: features "as of now", used by the service.
    """

    training: tuple[datetime, ...]
    evaluation: datetime
    serving: datetime

    @property
    def all(self) -> list[datetime]:
        """Every cutoff, oldest first."""
        return [*self.training, self.evaluation, self.serving]

    def as_dbt_vars(self) -> list[str]:
        """The cutoffs as ISO strings for the dbt var `as_of`."""
        return [cutoff.isoformat() for cutoff in self.all]

    @classmethod
    def from_cutoffs(cls, cutoffs: list[datetime]) -> "CutoffPlan":
        """Assigns roles to a sorted list of cutoffs: the last serves, the one before evaluates.

        Args:
            cutoffs: At least three cutoffs (one training, evaluation, serving).

        Returns:
            The plan.

        Raises:
            ValueError: Fewer than three distinct cutoffs.
        """
        ordered = sorted(set(cutoffs))
        if len(ordered) < 3:
            raise ValueError(
                f"need at least 3 cutoffs (training, evaluation, serving), got {ordered}"
            )
        return cls(training=tuple(ordered[:-2]), evaluation=ordered[-2], serving=ordered[-1])


def plan_cutoffs(data_end: datetime, label_window_days: int, training_cutoffs: int) -> CutoffPlan:
    """Plans the cutoffs backwards from the end of the data, one label window apart.

    Args:
        data_end: Exclusive end of the data (for example the midnight after the last event).
        label_window_days: Length of each label window in days.
        training_cutoffs: How many training cutoffs to take before the evaluation cutoff.

    Returns:
        The plan; its serving cutoff is `data_end`.

    Raises:
        ValueError: Non-positive window or number of training cutoffs.
    """
    if label_window_days < 1 or training_cutoffs < 1:
        raise ValueError("label_window_days and training_cutoffs must be at least 1")
    window = timedelta(days=label_window_days)
    evaluation = data_end - window
    training = tuple(evaluation - window * step for step in range(training_cutoffs, 0, -1))
    return CutoffPlan(training=training, evaluation=evaluation, serving=data_end)
