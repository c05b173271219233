"""The one memory limit: how it is read, and how a refusal reads."""

import pytest

from genbench.cli import main
from genbench.errors import GenbenchError
from genbench.limits import check_memory, format_bytes, memory_limit, physical_memory


@pytest.mark.parametrize("raw, expected", [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5T", int(1.5 * 2**40)),
                                           ("2048", 2048), ("3gib", 3 * 2**30), ("64k", 64 * 2**10)])
def test_the_limit_is_read_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("GENBENCH_MEMORY_LIMIT", raw)
    assert memory_limit() == (expected, f"GENBENCH_MEMORY_LIMIT={raw}")


def test_the_default_is_half_the_machine(monkeypatch):
    monkeypatch.delenv("GENBENCH_MEMORY_LIMIT", raising=False)
    assert memory_limit() == (physical_memory() // 2, "half of this machine's memory")
    assert physical_memory() > 2**28


@pytest.mark.parametrize("raw", ["lots", "0", "-1G", "8Q", "1e9"])
def test_a_bad_limit_is_one_line(monkeypatch, capsys, raw):
    monkeypatch.setenv("GENBENCH_MEMORY_LIMIT", raw)
    with pytest.raises(GenbenchError, match="GENBENCH_MEMORY_LIMIT"):
        memory_limit()
    assert main(["train", "ae", "--dataset", "digits", "--image-size", "16", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genbench: error: GENBENCH_MEMORY_LIMIT") and len(err.splitlines()) == 1


def test_a_refusal_names_what_how_much_the_limit_and_how_to_raise_it(monkeypatch):
    monkeypatch.setenv("GENBENCH_MEMORY_LIMIT", "1G")
    check_memory(2**30, "exactly the limit")  # allowed
    with pytest.raises(GenbenchError) as err:
        check_memory(3 * 2**30, "3 GiB of samples")
    assert str(err.value) == ("3 GiB of samples would need about 3.0 GiB, more than genbench's memory limit of "
                              "1.0 GiB (GENBENCH_MEMORY_LIMIT=1G); if this machine really has the memory, raise the "
                              "limit with GENBENCH_MEMORY_LIMIT=<size>, e.g. GENBENCH_MEMORY_LIMIT=4G")
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
