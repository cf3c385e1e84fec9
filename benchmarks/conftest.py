"""Benchmark collection (bench_*.py files) and a closing table of speed-ups over the reference."""
import pytest

_MEDIANS: dict[tuple, float] = {}


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record_median():
    """record_median(key, backend, seconds): remembered for the speed-up table at the end."""
    def record(key: tuple, backend: str, seconds: float) -> None:
        _MEDIANS[(key, backend)] = seconds

    return record


def pytest_terminal_summary(terminalreporter):
    keys = sorted({k for k, b in _MEDIANS if b == "torch"}, key=str)
    rows = []
    for key in keys:
        ref = _MEDIANS[(key, "torch")]
        for (k, b), t in sorted(_MEDIANS.items(), key=str):
            if k == key and b != "torch":
                rows.append(f"  {key}: {b} {t * 1e3:.3f} ms vs torch {ref * 1e3:.3f} ms -> {ref / t:.1f}x")
    if rows:
        terminalreporter.write_line("speed-up of the fused step over the eager torch reference (medians):")
        for r in rows:
            terminalreporter.write_line(r)
