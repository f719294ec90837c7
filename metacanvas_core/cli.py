"""What the pack's command lines share, so an artist gets one clear line for a mistake and no library noise.

    parser = cli.ArgumentParser(description=__doc__)   # adds --verbose and --debug; usage errors are one line
    args = parser.parse_args(argv)
    return cli.run(lambda: work(args), debug=args.debug)

and in `work`, once the inputs are checked and before the Hugging Face libraries are imported:

    if not args.verbose:
        cli.quiet_libraries()

This module imports nothing heavy, so `--help` and input errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from .errors import MetaCanvasInputError

INPUT_ERROR_EXIT = 2  # as argparse's own usage errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse with --verbose/--debug, the module docstring shown as written, and one-line usage errors."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.add_argument("--verbose", action="store_true", help="show the libraries' loading bars and warnings")
        self.add_argument("--debug", action="store_true", help="a traceback for input errors too")

    def error(self, message: str) -> NoReturn:
        self.exit(INPUT_ERROR_EXIT, f"error: {message} (--help lists the options)\n")


def run(work: Callable[[], None], debug: bool = False) -> int:
    """Run a command's work and return its exit status. A mistake the user can fix (see `user_error`) prints
    `error: ...` on stderr and returns 2 (raised, with its traceback, when `debug`); any other exception is a
    bug and keeps its traceback."""
    try:
        work()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    return 0


def user_error(e: BaseException) -> bool:
    """An input error, or a file the OS or safetensors could not read (missing, no permission, truncated by an
    interrupted download)."""
    safetensors = sys.modules.get("safetensors")  # not imported: then no error can be one of its
    kinds = (MetaCanvasInputError, OSError) + ((safetensors.SafetensorError,) if safetensors else ())
    return isinstance(e, kinds)


def all_or_none(options: dict[str, object]) -> bool:
    """True when every option is given, False when none is; refuses a partial set, naming what is missing
    (a partial set must never quietly become a run on something else)."""
    missing = [name for name, value in options.items() if value is None]
    if missing and len(missing) < len(options):
        given = [name for name in options if name not in missing]
        raise MetaCanvasInputError(
            f"{' and '.join(given)} given without {' and '.join(missing)}: give {' and '.join(options)} together "
            "(or none of them, to run the tiny random models)."
        )
    return not missing


def add_mllm_options(parser: argparse.ArgumentParser, use: str = "") -> None:
    """--mllm (a Hugging Face folder or ComfyUI's single file, as the MLLM Loader takes) and --mllm-tokenizer."""
    parser.add_argument(
        "--mllm",
        type=Path,
        help=f"Qwen2.5-VL: a Hugging Face folder or ComfyUI's single file "
        f"(models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors or the bf16 one){use}",
    )
    parser.add_argument(
        "--mllm-tokenizer",
        type=Path,
        help="tokenizer folder for a --mllm single file (which holds weights only): ComfyUI's "
        "comfy/text_encoders/qwen25_tokenizer",
    )


def models_given(mllm: Path | None, tokenizer: Path | None, backbone: Path | None, backbone_option: str) -> bool:
    """`all_or_none` for the MLLM and backbone options; a --mllm-tokenizer without a --mllm is refused too."""
    real = all_or_none({"--mllm": mllm, backbone_option: backbone})
    if tokenizer is not None and not real:
        raise MetaCanvasInputError("--mllm-tokenizer goes with a --mllm single file (and a backbone).")
    return real


def readable_file(path: Path, what: str) -> None:
    """Refuse `path` unless it is a file this process can read, naming `what` and the reason."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise MetaCanvasInputError(f"{what} '{path}': {e.strerror or e}.") from None


def existing_folder(path: Path, what: str) -> None:
    """Refuse `path` unless it is a folder, naming `what`."""
    if not path.is_dir():
        raise MetaCanvasInputError(f"{what} '{path}' is not a folder{'' if path.exists() else ' (it does not exist)'}.")


def check_models(mllm: Path, tokenizer: Path | None, backbone: Path, backbone_option: str = "--backbone") -> str:
    """Refuse a missing or unreadable MLLM (folder or single file), tokenizer or backbone folder, before any model
    loads; returns the backbone's kind ("sana", "flux_kontext", "wan")."""
    from .backbones import backbone_class_for

    check_mllm(mllm, tokenizer)
    existing_folder(backbone, backbone_option)
    try:
        return backbone_class_for(backbone).kind
    except json.JSONDecodeError as e:
        raise MetaCanvasInputError(f"{backbone_option} '{backbone}': its model_index.json is damaged ({e}).") from None


def check_mllm(mllm: Path, tokenizer: Path | None) -> None:
    """A Hugging Face folder with a readable config.json, or a readable Qwen2.5-VL single file with a tokenizer:
    its own (in its metadata) or --mllm-tokenizer's. Only headers are read."""
    from .files import SafetensorsFile
    from .planner import read_model_config
    from .qwen_file import is_qwen25_vl

    if mllm.is_dir():
        if tokenizer is not None:
            raise MetaCanvasInputError(f"--mllm-tokenizer is for a single file: the folder '{mllm}' has its own.")
        try:
            read_model_config(mllm)
        except json.JSONDecodeError as e:
            raise MetaCanvasInputError(f"--mllm '{mllm}': its config.json is damaged ({e}).") from None
        return
    if not mllm.exists():
        raise MetaCanvasInputError(
            f"--mllm '{mllm}' does not exist: give a Qwen2.5-VL folder or ComfyUI's single file (.safetensors)."
        )
    header = SafetensorsFile.open(mllm, "--mllm")
    if not is_qwen25_vl(header):
        raise MetaCanvasInputError(f"--mllm '{mllm}' holds {header.describe()}, not Qwen2.5-VL.")
    if tokenizer is not None:
        existing_folder(tokenizer, "--mllm-tokenizer")
    elif "tokenizer" not in header.metadata:
        raise MetaCanvasInputError(
            f"--mllm '{mllm}' holds weights only: give --mllm-tokenizer ComfyUI/comfy/text_encoders/qwen25_tokenizer "
            "(ComfyUI's Qwen2.5 tokenizer folder)."
        )


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


class _DropTorchvisionFallback(logging.Filter):
    """transformers warns on import that it uses its PIL image processors without torchvision: the pack
    never installs torchvision, so the warning says nothing the user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_libraries() -> None:
    """No progress bars from huggingface_hub, transformers and diffusers, and none of two notices the user cannot
    act on: the torchvision fallback, and transformers' deprecation of `is_gradient_checkpointing`, which peft
    reads when it adds the canvas LoRA (training). Every other warning stays. Imports diffusers' logging (torch with
    it), so call it after the input checks."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


@contextmanager
def tiny_models() -> Iterator[dict[str, Path]]:
    """The tiny random models (`tiny.write_all`) in a temporary folder that is removed afterwards."""
    import tempfile

    from .tiny import write_all

    with tempfile.TemporaryDirectory(prefix="metacanvas-tiny-") as folder:
        yield write_all(Path(folder))
