"""Settings come from the environment when a process starts, and never show their secrets."""

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
