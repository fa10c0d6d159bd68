"""ML code as plain typed functions: cutoffs, candidates, features, ranker, metrics, evaluation."""
