"""Progress of long commands: plain lines off a terminal, a bar with rate and ETA on one."""
from __future__ import annotations

import io

from kvmem.cli import main
from kvmem.client import Client
from kvmem.progress import Progress
from tests.conftest import TOY_SPEC, random_layers


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_carry_count_rate_and_eta():
    ticks = iter([0.0, 2.0, 4.0, 6.0])
    out = io.StringIO()
    with Progress(3, stream=out, clock=lambda: next(ticks)) as progress:
        progress.step("first")
        progress.step("second")
    lines = out.getvalue().splitlines()
    assert lines == ["[1/3] first (0.50/s, ETA 4s)", "[2/3] second (0.50/s, ETA 2s)"]


def test_a_terminal_gets_a_bar_with_rate():
    out = Terminal()
    with Progress(2, "session", stream=out) as progress:
        progress.step("one done")
        progress.step("two done")
    text = out.getvalue()
    assert "one done" in text and "two done" in text and "2/2" in text and "session/s" in text and "[1/2]" not in text


def test_kvmem_compact_reports_progress_and_resumes(service, capsys):
    address = f"127.0.0.1:{service.port}"
    with Client(address, spec=TOY_SPEC) as client:
        for name in ("a", "b"):
            client.save(name, random_layers(TOY_SPEC, 32), list(range(32)) if name == "a" else list(range(100, 132)))
    assert main(["--address", address, "compact", "--method", "knorm", "--ratio", "0.5", "--sessions", "a", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] a -> a@knorm-r0.5: ") and "/s, ETA" in lines[0]
    assert lines[1].startswith("[2/2] b -> b@knorm-r0.5: ") and lines[-1] == "done: 2 compacted, 0 already done, 2 sessions"
    assert main(["--address", address, "compact", "--method", "knorm", "--ratio", "0.5", "--all"]) == 0
    rerun = capsys.readouterr().out.splitlines()
    assert rerun[-1] == "done: 0 compacted, 2 already done, 2 sessions" and "already compacted as a@knorm-r0.5" in rerun[0]
