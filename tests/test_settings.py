"""Settings come from the environment when a process starts, and never show their secrets."""

import pytest

from shelfwise.settings import Settings


def test_secrets_stay_out_of_the_repr():
    env = {
        "SHELFWISE_API_TOKEN": "s3cr3t-token",
        "SHELFWISE_REDIS_URL": "redis://:hunter2@cache.internal:6379/0",
    }
    settings = Settings.from_env(env)
    assert settings.api_token == "s3cr3t-token"
    assert settings.redis_url == "redis://:hunter2@cache.internal:6379/0"
    shown = repr(settings)
    assert "s3cr3t-token" not in shown
    assert "hunter2" not in shown
    assert "lake_url" in shown


def test_the_feature_sample_rate_is_a_share_and_the_rows_a_count():
    default = Settings.from_env({})
    assert (default.feature_sample_rate, default.feature_sample_rows) == (0.01, 20)
    chosen = Settings.from_env(
        {"SHELFWISE_FEATURE_SAMPLE_RATE": "0", "SHELFWISE_FEATURE_SAMPLE_ROWS": "0"}
    )
    assert (chosen.feature_sample_rate, chosen.feature_sample_rows) == (0.0, 0)
    for rate in ("1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match="SHELFWISE_FEATURE_SAMPLE_RATE"):
            Settings.from_env({"SHELFWISE_FEATURE_SAMPLE_RATE": rate})
    with pytest.raises(ValueError, match="SHELFWISE_FEATURE_SAMPLE_ROWS"):
        Settings.from_env({"SHELFWISE_FEATURE_SAMPLE_ROWS": "-1"})
    assert default.feature_samples_per_s == 0.1
    assert Settings.from_env({"SHELFWISE_FEATURE_SAMPLES_PER_S": "0"}).feature_samples_per_s == 0
    for bound in ("-1", "nan"):
        with pytest.raises(ValueError, match="SHELFWISE_FEATURE_SAMPLES_PER_S"):
            Settings.from_env({"SHELFWISE_FEATURE_SAMPLES_PER_S": bound})


def test_the_redis_cluster_setting_is_true_or_false():
    assert Settings.from_env({}).redis_cluster is False
    for text, expected in (
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("false", False),
        ("", False),
    ):
        assert Settings.from_env({"SHELFWISE_REDIS_CLUSTER": text}).redis_cluster is expected
    with pytest.raises(ValueError, match="SHELFWISE_REDIS_CLUSTER"):
        Settings.from_env({"SHELFWISE_REDIS_CLUSTER": "cluster"})


def test_the_requests_per_connection_are_a_count_and_0_turns_recycling_off():
    assert Settings.from_env({}).max_requests_per_connection == 250
    env = {"SHELFWISE_MAX_REQUESTS_PER_CONNECTION": "0"}
    assert Settings.from_env(env).max_requests_per_connection == 0
    with pytest.raises(ValueError, match="SHELFWISE_MAX_REQUESTS_PER_CONNECTION"):
        Settings.from_env({"SHELFWISE_MAX_REQUESTS_PER_CONNECTION": "-1"})
