"""docs/operations.md stays true: the config reference, the dashboard's metrics, the backup recipe."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvmem.client import Client
from kvmem.config import MetricsConfig, ServiceConfig, render_reference
from tests.conftest import REPO, TOY_SPEC, random_layers
from tests.test_metrics import scrape

DOC = REPO / "docs" / "operations.md"


def test_config_reference_is_the_generated_one_and_names_every_key():
    text = DOC.read_text()
    assert render_reference() in text, "docs/operations.md is stale: paste the output of `python -m kvmem.config`"
    for section in dataclasses.fields(ServiceConfig):
        assert f"**[{section.name}]**" in text
        for key in dataclasses.fields(section.default_factory()):
            assert f"| `{key.name}` |" in text, f"{section.name}.{key.name} is not in docs/operations.md"


def test_dashboard_and_doc_use_only_metrics_the_server_exports(start_service):
    service = start_service(metrics=MetricsConfig(enabled=True, port=0))
    with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as client:
        client.save("s", random_layers(TOY_SPEC, 16), list(range(16)))
    exported = {name for name, _ in scrape(service.metrics_port)}
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as response:
        families = {family.name for family in text_string_to_metric_families(response.read().decode())}  # labelled ones without samples too
    dashboard = json.loads((REPO / "docs" / "grafana-kvmem.json").read_text())
    used = {m for panel in dashboard["panels"] for target in panel["targets"] for m in re.findall(r"\bkvmem_\w+", target["expr"])}
    documented = set(re.findall(r"\bkvmem_\w+", DOC.read_text())) - {"kvmem_tier_"}
    assert used and documented
    for name in used | documented:
        assert name in exported or re.sub(r"_(total|bucket|count|sum)$", "", name) in families, f"{name} is not exported"


@pytest.mark.slow  # a server process under a concurrent writer (4 s)
def test_documented_backup_while_serving_restores_bit_exactly(server_process, tmp_path):
    server = server_process(tmp_path / "live")
    saved = {}
    with Client(server.address, spec=TOY_SPEC) as client:
        for index in range(6):
            saved[f"s{index}"] = random_layers(TOY_SPEC, 40, seed=index)
            client.save(f"s{index}", saved[f"s{index}"], [index * 1000 + t for t in range(40)])
        stop = threading.Event()

        def keep_writing():  # the copy is taken while another writer commits
            n = 0
            while not stop.is_set():
                client.save(f"w{n}", random_layers(TOY_SPEC, 16, seed=100 + n), [50_000 + n * 100 + t for t in range(16)])
                n += 1

        writer = threading.Thread(target=keep_writing)
        writer.start()
        snippet = next(block for block in DOC.read_text().split("```") if block.startswith("bash") and "kvmem backup" in block)
        command = re.search(r"kvmem backup --data-dir (\S+) (\S+)", snippet)
        assert command and command.group(1) == "data"  # the documented form, run on this server's directory
        try:
            subprocess.run([sys.executable, "-m", "kvmem.cli", "backup", "--data-dir", str(tmp_path / "live"), str(tmp_path / "backup")],
                           check=True, timeout=120, cwd=REPO)
        finally:
            stop.set()
            writer.join(60)
    verified = subprocess.run([sys.executable, "-m", "kvmem.cli", "verify", "--data-dir", str(tmp_path / "backup")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert verified.returncode == 0 and "ok" in verified.stdout, verified.stdout
    restored_server = server_process(tmp_path / "backup")
    with Client(restored_server.address, spec=TOY_SPEC) as client:
        for name, layers in saved.items():
            restored = client.restore(name)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(layers, restored.layers))
        for info in client.list():  # whatever the writer had committed is whole in the copy
            assert client.restore(info.session_id).info.num_tokens == info.num_tokens
