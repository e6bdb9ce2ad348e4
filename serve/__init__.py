"""slm.serve: talk to a trained model.

  slm chat  --model DIR                       terminal chat (serve/chat.py)
  slm serve --model DIR [--host 127.0.0.1] [--port 8000]
                                              OpenAI-compatible API + web chat page (serve/api.py)

DIR is an HF-format directory as model.save_hf_dir writes it, with the tokenizer files (a ChatML
chat template). Generation is model/generate.py's Engine. This module only holds the command-line
arguments, so that `slm --help` stays fast (torch and FastAPI load when a command runs).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _model_dir(value: str) -> Path:
    path = Path(value)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a model directory (no config.json): pass the HF "
                                         "directory the export stage wrote (model.save_hf_dir)")
    if not any(path.glob("*.safetensors")):
        raise argparse.ArgumentTypeError(f"{value} has no *.safetensors weights (other formats are not loaded)")
    return path


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, type=_model_dir, metavar="DIR",
                   help="HF-format model directory with tokenizer files")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    _engine_arguments(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (static cache; each new batch/length bucket compiles once, "
                        "~10 s; 3x the decode speed of the CUDA graph alone on a GPU). Default: off")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting for a place in the batch beyond this get 503")
    p.add_argument("--api-key", default=os.environ.get("SLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SLM_API_KEY, else none)")


def run_chat(args) -> int:
    from .chat import main

    return main(args)


def run_serve(args) -> int:
    from .api import main

    return main(args)
