"""The benchmarks' shared harness (satconv.bench.harness): timing primitives (B9), device peaks, inductor settings."""

from satconv.bench import harness


def test_time_repeats_counts_calls():
    calls = []
    times = harness.time_repeats(lambda: calls.append(1), "cpu", warmup=2, repeats=4)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)


def test_inductor_settings_follow_the_config():
    # inductor's own patch: monkeypatch's undo deleted the setting from the config module, so compiles in
    # later tests failed ("coordinate_descent_tuning does not exist")
    import torch._inductor.config as ic
    with ic.patch(coordinate_descent_tuning=True):
        assert harness.inductor_settings()["coordinate_descent_tuning"] is True
    with ic.patch(coordinate_descent_tuning=False):
        assert harness.inductor_settings()["coordinate_descent_tuning"] is False
