"""`mot serve DIR`: an OpenAI-compatible HTTP endpoint for a dense or Token Choice model folder, on transformers' own
serving machinery (`transformers serve`, transformers >= 5.25).

`transformers serve` loads a model as `getattr(transformers, config.architectures[0])`, which our remote-code
folders (`MoTForCausalLM`) are not, so it cannot load them itself. Everything else is its own: the model runs in a
process of its own (its `EngineClient` and `ModelManager`), requests are answered by its handlers
(`CompletionHandler`, `ChatCompletionHandler`, ...) with `generate()` or its continuous batching (`GenerationState`,
`CBGenerateRunner`), on the FastAPI app its `build_server` builds, under uvicorn as its `Serve.run` runs it. What
this module adds:

- `FolderLoader`, the loader its `ModelManager` takes: the folder's config, tokenizer and model come through the
  shared loader (`model_folder.load_model_and_tokenizer`). It has the three methods the serving code calls
  rather than subclassing `ModelLoader`, whose import pulls in torch: the loader is pickled into the model's
  process, so its class must be importable from this module, which `mot serve --help` imports (and must not wait
  for torch, tests/test_cli.py).
- a client that asks `generate()` for no more new tokens than fit in the model's context (a request without
  `max_tokens` gets 1024 otherwise, past the end of the paper block's learned positions), as `mot generate` does;
- a chat handler that answers a tokenizer without a chat template with one clear 400 line, and 400 answers in
  OpenAI's error shape (`{"error": {"message": ...}}`, beside transformers' `detail`), whose message OpenAI
  clients show (with `detail` alone they show "Error code: 400");
- the start, which mirrors `Serve.run`: `Serve` parses typer options and starts the server in its constructor,
  building the stock loader, manager and handlers inside, so it has no seam to hand it ours.

Mixture of Tokens and Expert Choice models are refused before anything starts: their groups mix the tokens of a
batch of sequences, so one request's answer would depend on the others (README, "Batch dependence"). `mot
transition` (or `mot convert --to token_choice`) turns them into Token Choice, which serves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .utils import UserError

# The first release whose serving runs each model in a process of its own, loaded by a `ModelLoader` (5.24's
# `ModelManager` loaded models itself, with other signatures throughout).
MIN_TRANSFORMERS = "5.25.0"
LOG_LEVELS = ("debug", "info", "warning", "error")
# The continuous batching settings that `transformers serve` takes (its --cb-* options), under
# `ContinuousBatchingConfig`'s names.
CB_SETTINGS = ("num_blocks", "page_size", "max_batch_tokens", "max_memory_percent")


def serving_refusal(config) -> str | None:
    """Why `mot serve` cannot serve a model of `config` (one line), or None."""
    grouped = list(getattr(config, "grouped_layer_types", None) or [])
    if not grouped:
        return None
    return (f"{' and '.join(grouped)} layers (mlp_types {config.mlp_types}) cannot be served: their groups mix the "
            "tokens of a batch of sequences, so one request's answer would depend on the others; turn the model into "
            "Token Choice first with `mot transition SRC DST --steps N` (or `mot convert SRC DST --to "
            "token_choice`, without training) and serve that folder")


def check_servable(model_dir: str | Path) -> Path:
    """The folder, checked as every `mot` command checks it, and refused in one `UserError` if it cannot be served."""
    from .folders.model_folder import check_model_folder, check_weights, read_config_dict

    folder = check_model_folder(model_dir, weights=False)
    if read_config_dict(folder).get("model_type") == "mot":
        from .modeling.configuration_mot import MoTConfig

        refusal = serving_refusal(MoTConfig.from_pretrained(folder))
        if refusal:
            raise UserError(f"{folder}: {refusal}")
    check_weights(folder)
    return folder


def check_serving_available() -> None:
    """One line when transformers' serving is missing or too old for `mot serve`."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise UserError(f"mot serve builds on the serving of transformers >= {MIN_TRANSFORMERS}; this is "
                        f"transformers {transformers.__version__}: pip install -U 'transformers[serving]'")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise UserError("mot serve needs transformers' serving extras (fastapi, uvicorn, pydantic, openai): "
                        "pip install 'transformers[serving]'")


class FolderLoader:
    """Loads a model folder for transformers' serving (`ModelManager`, `EngineClient`), through the shared loader.

    The interface of transformers' `ModelLoader` that serving calls: `load_config` and `load_processor` in the API
    server, `load_model_and_processor` in the model's process, to which the loader is pickled.
    """

    def __init__(self, device: str | None = None):
        self.device = device

    def load_config(self, model_id: str):
        """The model's config and generation config (the folder's `generation_config.json`, else the config's)."""
        from transformers import AutoConfig, GenerationConfig

        import mixture_of_tokens  # noqa: F401  (registers the `mot` model type with the Auto classes)

        config = AutoConfig.from_pretrained(model_id)
        try:
            generation_config = GenerationConfig.from_pretrained(model_id)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        return config, generation_config

    def load_processor(self, model_id: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_id)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load the tokenizer saved in {model_id}: {error}") from None

    def load_model_and_processor(self, model_id: str, on_progress=None):
        from .folders.model_folder import load_model_and_tokenizer

        if on_progress is not None:
            on_progress({"status": "loading", "model": model_id, "stage": "model"})
        return load_model_and_tokenizer(model_id, device=self.device)


def _serving_classes():
    """transformers' engine client, model manager and chat handlers with `mot serve`'s changes (see the module's
    docstring). Defined on first use: their bases import torch. They live in the API server's process only."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import EngineClient, ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.utils import canonical_model_id, prompt_length

    class FolderEngineClient(EngineClient):
        def _fit_in_context(self, inputs: dict, generation_kwargs: dict) -> None:
            """At most as many new tokens as the model's context leaves after the prompt (the handlers read the
            same dict afterwards, so a cut answer finishes with "length")."""
            limit = self.generation_state.context_length(self.model_config)
            requested = generation_kwargs.get("max_new_tokens")
            if limit is not None and requested is not None:
                generation_kwargs["max_new_tokens"] = max(1, min(requested, limit - prompt_length(inputs)))

        async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict):
            self._fit_in_context(inputs, generation_kwargs)
            return await super().generate_non_streaming(inputs, generation_kwargs)

        def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser=None):
            self._fit_in_context(inputs, generation_kwargs)
            return super().generate_streaming(inputs, generation_kwargs, response_parser)

    class FolderModelManager(ModelManager):
        def preload_engine(self, force_model: str, engine_connection: tuple | None) -> None:
            model_id = canonical_model_id(force_model)
            engine = FolderEngineClient(model_id, self.loader, self.generation_state, connection=engine_connection)
            self.engines[model_id] = engine
            if engine_connection is None:
                engine.start()

    class NeedsChatTemplate:
        """Chat messages become a prompt through the tokenizer's chat template: without one, a 400 in one line."""

        def render_messages(self, engine, messages: list[dict], body: dict) -> dict:
            if not getattr(engine.processor, "chat_template", None):
                raise ValueError(
                    f"the tokenizer of {engine.model_id} has no chat template, so chat messages cannot be turned "
                    "into a prompt: send text to /v1/completions, or give the tokenizer a chat template "
                    "(tokenizer.chat_template = ...; tokenizer.save_pretrained(folder))")
            return super().render_messages(engine, messages, body)

    class FolderChatCompletionHandler(NeedsChatTemplate, ChatCompletionHandler):
        pass

    class FolderResponseHandler(NeedsChatTemplate, ResponseHandler):
        pass

    return FolderModelManager, FolderChatCompletionHandler, FolderResponseHandler


def build_app(folder: str | Path, *, continuous_batching: bool = False, device: str | None = None,
              seed: int | None = None, log_level: str = "info", cb_settings: dict | None = None):
    """Start the model's process and build the app: (FastAPI app, model manager). Built as `Serve.run` builds it;
    `cb_settings` are `ContinuousBatchingConfig` fields (`CB_SETTINGS`), transformers' defaults where absent."""
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState, set_serve_log_level
    from transformers.utils import logging as hf_logging

    model_manager_class, chat_handler_class, response_handler_class = _serving_classes()
    set_serve_log_level(hf_logging.log_levels[log_level])
    cb_config = ContinuousBatchingConfig(**cb_settings) if cb_settings else None
    generation_state = GenerationState(continuous_batching=continuous_batching, cb_config=cb_config, seed=seed)
    manager = model_manager_class(FolderLoader(device), generation_state, force_model=str(folder))
    shared = dict(model_manager=manager, generation_state=generation_state)
    app = build_server(
        manager,
        chat_handler_class(**shared),
        completion_handler=CompletionHandler(**shared),
        response_handler=response_handler_class(**shared),
        transcription_handler=TranscriptionHandler(manager),
        systemone_handler=SystemOneHandler(**shared),
    )

    async def bad_request(_request, error: ValueError):
        """transformers' 400, in OpenAI's error shape as well, whose message OpenAI clients show."""
        from fastapi.responses import JSONResponse

        message = str(error)
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}, "detail": message},
                            status_code=400)

    app.add_exception_handler(ValueError, bad_request)
    return app, manager


def listening_socket(host: str, port: int):
    """The server's socket, bound before the model loads (as uvicorn binds it): a busy port is one line, at once."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}); give another --port or --host") \
            from None
    return sock


def serve(model_dir: str | Path, host: str = "localhost", port: int = 8000, *, continuous_batching: bool = False,
          device: str | None = None, seed: int | None = None, log_level: str = "info",
          cb_settings: dict | None = None) -> int:
    """Serve the folder until stopped (Ctrl+C, SIGTERM). Returns the exit code: 1 if the model's process died."""
    folder = check_servable(model_dir)
    check_serving_available()
    sock = listening_socket(host, port)
    try:
        return _run(folder, sock, host, port, continuous_batching=continuous_batching, device=device, seed=seed,
                    log_level=log_level, cb_settings=cb_settings)
    finally:
        sock.close()


def _run(folder: Path, sock, host: str, port: int, *, log_level: str, **options) -> int:
    """`Serve.run`'s start: the app on uvicorn, stopped when the model's process dies."""
    import gc

    import uvicorn
    from transformers.cli.serving.utils import freeze_garbage_collector

    app, manager = build_app(folder, log_level=log_level, **options)
    engine = next(iter(manager.engines.values()))
    routes = "/v1/models, /v1/completions" + (", /v1/chat/completions" if engine.processor.chat_template else
                                              " (no chat template: /v1/chat/completions answers 400)")
    batching = "continuous batching" if engine.use_cb else "generate()"
    print(f"mot serve: {folder} as model {str(folder)!r} on http://{host}:{port}/v1 ({routes}; {batching})",
          file=sys.stderr, flush=True)

    async def stop_if_the_engine_died() -> None:
        if manager.is_dead:
            server.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, callback_notify=stop_if_the_engine_died,
                            timeout_notify=5)
    server = uvicorn.Server(config)
    freeze_garbage_collector()
    try:
        server.run(sockets=[sock])
    finally:
        gc.unfreeze()
        manager.shutdown()
    if manager.is_dead:
        print("mot serve: the model's process died (see the error above); stopping", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mot serve",
        description="Serve a dense or Token Choice model folder over an OpenAI-compatible HTTP API (/v1/models, "
                    "/v1/completions, /v1/chat/completions when the tokenizer has a chat template), with "
                    "transformers' serving. Clients name the model by its folder's path (GET /v1/models lists "
                    "it). MoT and Expert Choice models are refused: `mot transition` them to Token Choice first.",
    )
    parser.add_argument("model", metavar="DIR", help="model folder (with its tokenizer)")
    parser.add_argument("--host", default="localhost", help="address to listen on (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--continuous_batching", action="store_true",
                        help="transformers' continuous batching (paged attention): requests join the running batch "
                             "as they arrive, instead of one generate() call after another")
    cb_help = {
        "num_blocks": "KV cache blocks for continuous batching: the cache's size, fixed (default: as much as "
                      "--cb_max_memory_percent allows)",
        "page_size": "tokens per page of the KV cache in continuous batching (default: transformers')",
        "max_batch_tokens": "most tokens per forward pass in continuous batching (default: transformers')",
        "max_memory_percent": "fraction of the device's free memory, in (0, 1], that continuous batching may take "
                              "for its KV cache (default 0.6-0.9 by transformers; on a CPU that is of the RAM: "
                              "give this or --cb_num_blocks on a shared machine)",
    }
    for name in CB_SETTINGS:
        parser.add_argument(f"--cb_{name}", type=float if name == "max_memory_percent" else int, default=None,
                            help=cb_help[name])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=None, help="torch seed set as the model's process starts")
    parser.add_argument("--log_level", choices=LOG_LEVELS, default="info", help="level of the server's messages")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    cb_settings = {name: getattr(args, f"cb_{name}") for name in CB_SETTINGS if getattr(args, f"cb_{name}") is not None}
    for name, value in cb_settings.items():
        if not args.continuous_batching:
            raise UserError(f"--cb_{name} is a continuous batching setting: give --continuous_batching too")
        if name == "max_memory_percent" and not 0 < value <= 1:
            raise UserError(f"--cb_max_memory_percent must be in (0, 1], got {value}")
        if name != "max_memory_percent" and value < 1:
            raise UserError(f"--cb_{name} must be a positive integer, got {value}")
    return serve(args.model, args.host, args.port, continuous_batching=args.continuous_batching, device=args.device,
                 seed=args.seed, log_level=args.log_level, cb_settings=cb_settings)
