"""bench.quick, CI's smoke run of the benchmarks, runs every benchmark."""
from pathlib import Path

from bench import quick

BENCH = Path(__file__).resolve().parent.parent / "bench"
# run from their own virtualenvs: vllm_ttft (vLLM's, by `make bench-quick`), kvpress_crosscheck
# (kvpress's, by hand); vllm_engine is vllm_ttft's engine process, not a benchmark
OWN_ENVIRONMENT = {"vllm_ttft", "vllm_engine", "kvpress_crosscheck"}


def test_every_benchmark_is_smoke_run():
    runnable = {path.stem for path in BENCH.glob("*.py") if '__name__ == "__main__"' in path.read_text()} - {"quick"}
    assert runnable - OWN_ENVIRONMENT == set(quick.MODULES)


def test_an_unknown_benchmark_name_is_refused_before_anything_runs(capsys):
    assert quick.main(["recall", "no_such_bench"]) == 2
    assert "no_such_bench" in capsys.readouterr().err
