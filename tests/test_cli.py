"""The kvmem CLI against a running server."""
import json

from kvmem.cli import main
from tests.conftest import random_layers, TOY_SPEC


def test_cli_lists_shows_and_deletes(client, service, capsys):
    client.save("one", random_layers(TOY_SPEC, 20), list(range(20)))
    address = ["--address", f"127.0.0.1:{service.port}"]
    assert main(address + ["ls"]) == 0
    assert "one\t20 tokens" in capsys.readouterr().out
    assert main(address + ["info", "one"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == "20"
    assert main(address + ["stats"]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == "1"
    assert main(address + ["rm", "one"]) == 0
    assert main(address + ["rm", "one"]) == 1
    assert "does not exist" in capsys.readouterr().err
