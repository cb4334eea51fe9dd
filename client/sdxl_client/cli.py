"""`sdxl`, the command line of the SDXL LoRA service, over `SDXLClient`.

Every command prints what a person reads (ids, file paths, a live progress line on stderr)
or, with `--json`, one JSON document on stdout for scripts. The exit code says how it went
(see EXIT_CODES_HELP): a script can tell a failed run from a refused request from a server
it could not reach without parsing any text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import httpx

from .client import SDXLClient
from .errors import SDXLError
from .models import GENERATION_FIELDS, TRAINING_FIELDS, LoraRef

EXIT_OK = 0
EXIT_FAILED = 1  # the run or generation ended failed or cancelled
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_REFUSED = 3  # the API answered 4xx
EXIT_SERVER = 4  # the API answered 5xx, or could not be reached
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

EXIT_CODES_HELP = """\
exit codes:
  0    done
  1    the training run or generation failed or was cancelled
  2    usage: a bad command line
  3    the API refused the request (4xx: a bad field, an unknown session, no token)
  4    the server failed (5xx) or could not be reached
  130  interrupted (Ctrl-C)

environment:
  SDXL_URL        the server (default http://127.0.0.1:8000); --url wins
  SDXL_API_TOKEN  the API token; --token wins

--json (on any command) prints one JSON document on stdout and nothing else there;
an error is {"status": "error", "message": ..., "http_status": ..., "field": ...}.
"""


class UsageError(Exception):
    """A command line argparse accepted but whose values make no sense (exit 2)."""


# --- parsing helpers (pure, unit-tested) -------------------------------------------------


def parse_lora(spec: str) -> LoraRef:
    """`SESSION[:ITER][@scale]` -> LoraRef: `12`, `12:3`, `12@0.8`, `12:3@-0.5`; ITER may
    also name a file of the session (`12:lora_run4_step50.safetensors`, a checkpoint)."""
    rest, has_scale, scale_text = spec.partition("@")
    session_text, has_iteration, iteration_text = rest.partition(":")
    if not session_text.isdigit():
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected SESSION[:ITER][@SCALE] with SESSION a session id, e.g. 12:3@0.8"
        )
    if has_iteration and not iteration_text:
        raise argparse.ArgumentTypeError(f"{spec!r}: ITER is empty; e.g. 12:3")
    scale = 1.0
    if has_scale:
        try:
            scale = float(scale_text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{spec!r}: SCALE must be a number, e.g. 12@0.8"
            ) from None
    is_number = iteration_text.isdigit()
    return LoraRef(
        session_id=int(session_text),
        iteration=int(iteration_text) if is_number else None,
        lora_filename=iteration_text if has_iteration and not is_number else None,
        scale=scale,
    )


def parse_field_value(text: str) -> Any:
    """A training field's value from the command line: JSON where it parses as JSON
    (numbers, true/false/null, lists, objects), else the text itself (`--trigger sks`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_extra_fields(extra: Sequence[str], sets: Sequence[str]) -> dict[str, Any]:
    """Any training field: `--field value`, `--field=value` and `--set key=value`
    (dashes in a name become underscores: `--sample-every 2` is `sample_every`)."""
    fields: dict[str, Any] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or item == "--":
            raise UsageError(f"unexpected argument {item!r}: give training fields as --name value")
        name, has_value, value = item[2:].partition("=")
        if not has_value:
            if not items or items[0].startswith("--"):
                raise UsageError(f"--{name} needs a value")
            value = items.pop(0)
        fields[name.replace("-", "_")] = parse_field_value(value)
    for assignment in sets:
        name, has_value, value = assignment.partition("=")
        if not has_value or not name:
            raise UsageError(f"--set {assignment!r}: expected key=value")
        fields[name.replace("-", "_")] = parse_field_value(value)
    return fields


def check_known(fields: dict[str, Any], known: Sequence[str], what: str) -> None:
    """A field the API does not take is a bad command line, found before any request."""
    unknown = sorted(set(fields) - set(known))
    if unknown:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in unknown)
        raise UsageError(f"no {what} field {names}; the fields: {', '.join(sorted(known))}")


def exit_code_for(error: BaseException) -> int:
    """The exit code of an exception a command let through."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, SDXLError):
        return EXIT_REFUSED if 400 <= error.status < 500 else EXIT_SERVER
    if isinstance(error, httpx.HTTPError):  # no connection, a timeout, a dropped stream
        return EXIT_SERVER
    raise error


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_run_progress(status: dict[str, Any]) -> str:
    """One line from a run's /train_status body (an event's `data`):
    `training  step 21/50  42%  loss 0.1130  ETA 37s`."""
    state = status.get("status")
    if state == "in-progress" and status.get("queued"):
        position = status.get("queue_position")
        eta = status.get("queue_eta_seconds")
        where = f" #{position}" if position else ""
        return f"queued{where}  starts in {format_duration(eta)}"
    if state != "in-progress":
        message = status.get("message")
        return f"{state}: {message}" if message else f"{state}"
    total = status.get("total_steps")
    parts = [
        str(status.get("stage") or "training"),
        f"step {status.get('step', 0)}/{total if total is not None else '?'}",
        f"{status.get('progress', 0)}%",
    ]
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    parts.append(f"ETA {format_duration(status.get('eta_seconds'))}")
    return "  ".join(parts)


def format_generation_progress(status: dict[str, Any]) -> str:
    """One line from a generation's GET /generations/<id> body."""
    state = status.get("status")
    if state == "running":
        return f"running  step {status.get('step', 0)}/{status.get('total_steps') or '?'}"
    if state == "queued":
        return f"queued #{status.get('queue_position') or '?'}"
    return str(state)


def event_body(data: dict[str, Any]) -> dict[str, Any]:
    """The run's or generation's status in an event: the webhook payload's `data`."""
    inner = data.get("data")
    return inner if isinstance(inner, dict) else data


# --- output ------------------------------------------------------------------------------


@dataclass
class Output:
    """Where a command writes: text for a person, or one JSON document for a script."""

    json_mode: bool
    stdout: TextIO
    stderr: TextIO

    def result(self, document: Any, text: str) -> None:
        if self.json_mode:
            self.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        else:
            self.stdout.write(text + "\n")
        self.stdout.flush()

    last_progress: str = ""

    def progress(self, line: str) -> None:
        """A live line on stderr: rewritten in place on a terminal, one per change
        otherwise (a log keeps each). Silent under --json."""
        if self.json_mode or line == self.last_progress:
            return
        self.last_progress = line
        if self.stderr.isatty():
            self.stderr.write("\r\033[K" + line)
        else:
            self.stderr.write(line + "\n")
        self.stderr.flush()

    def end_progress(self) -> None:
        """Leaves the live line as it stands, before the result is printed."""
        if not self.json_mode and self.last_progress and self.stderr.isatty():
            self.stderr.write("\n")
            self.stderr.flush()
        self.last_progress = ""

    def note(self, line: str) -> None:
        """A line on stderr that stays (a sample's URL), clear of the live line."""
        if self.json_mode:
            return
        if self.stderr.isatty():
            self.stderr.write("\r\033[K")
        self.stderr.write(line + "\n")
        self.last_progress = ""  # the live line was wiped: the next one is written again
        self.stderr.flush()


# --- commands ----------------------------------------------------------------------------


def cmd_session_create(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    session_id = client.create_session()
    out.result({"session_id": session_id}, str(session_id))
    return EXIT_OK


def cmd_upload(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    def on_progress(sent: int, total: int) -> None:
        out.progress(f"uploading  {sent:,}/{total:,} bytes")

    answer = client.upload(args.session, args.source, caption=args.caption, on_progress=on_progress)
    out.end_progress()
    images = answer.get("images", [])
    out.result(answer, f"uploaded {len(images)} image(s) to session {args.session}")
    return EXIT_OK


def cmd_train(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    fields = parse_extra_fields(args.extra_fields, args.set)
    for name in ("trigger", "steps", "rank"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    check_known(fields, [name for name in TRAINING_FIELDS if name != "session_id"], "training")
    started = client.train(args.session, **fields)
    run_id = started["run_id"]
    if args.no_wait:
        out.result(started, f"run {run_id} queued for session {args.session}")
        return EXIT_OK
    out.note(f"run {run_id} queued for session {args.session}; waiting (Ctrl-C stops waiting)")
    seen_samples: set[str] = set()

    def on_event(event: Any) -> None:
        status = event_body(event.data)
        for sample in status.get("samples") or []:
            url = sample.get("url")
            if url and url not in seen_samples:
                seen_samples.add(url)
                out.note(f"sample  step {sample.get('step')}  {client_url(client, url)}")
        if status.get("status") == "in-progress":
            out.progress(format_run_progress(status))

    final = client.wait_for_run(run_id, on_event=on_event)
    state = final.get("status")
    out.end_progress()
    document = {"run_id": run_id, "session_id": args.session, **final}
    if state == "completed":
        out.result(document, f"run {run_id} completed: {final.get('lora')}")
        return EXIT_OK
    out.result(document, f"run {run_id} {state}: {final.get('message', '')}".rstrip(": "))
    return EXIT_FAILED


def cmd_generate(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    fields = {
        name: getattr(args, name)
        for name in (
            "negative_prompt",
            "steps",
            "width",
            "height",
            "seed",
            "num_images",
            "guidance_scale",
            "scheduler",
            "output_format",
        )
        if getattr(args, name) is not None
    }
    fields.update(parse_extra_fields([], args.set))
    check_known(fields, GENERATION_FIELDS, "/txt2img")
    init_image = Path(args.init_image).read_bytes() if args.init_image else None
    out.progress("generating ...")

    def on_event(event: Any) -> None:
        out.progress(format_generation_progress(event_body(event.data)))

    generation = client.generate(
        args.prompt,
        loras=args.lora or None,
        init_image=init_image,
        wait=not args.no_wait,
        on_event=on_event,
        **fields,
    )
    document: dict[str, Any] = {
        "generation_id": generation.id,
        "status": generation.status,
        "image_urls": [client_url(client, url) for url in generation.image_urls],
        "parameters": generation.parameters,
    }
    out.end_progress()
    if args.no_wait:
        out.result(document, f"generation {generation.id} {generation.status}")
        return EXIT_OK
    if generation.status != "completed":
        ended = f"generation {generation.id} {generation.status}: {generation.message or ''}"
        document["message"] = generation.message
        out.result(document, ended.rstrip(": "))
        return EXIT_FAILED
    paths = generation.save(args.output)
    document["files"] = [str(path) for path in paths]
    out.result(document, "\n".join(str(path) for path in paths))
    return EXIT_OK


def cmd_lora_download(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    path = client.download_lora(args.session, args.output, filename=args.file, format=args.format)
    out.result(
        {"session_id": args.session, "path": str(path), "size": path.stat().st_size}, str(path)
    )
    return EXIT_OK


def cmd_runs(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    page = client.list_sessions(limit=args.limit, offset=args.offset)
    sessions = page.get("sessions", [])
    rows = ["SESSION  STATUS       PROGRESS  LORA"]
    for session in sessions:
        training = session.get("training") or {}
        state = training.get("status", "none")
        if state == "in-progress" and training.get("queued"):
            state = "queued"
        detail = training.get("lora") or session.get("latest_lora") or training.get("message")
        rows.append(
            f"{session['session_id']:<8} {state:<12} {training.get('progress', 0):>7}%  "
            f"{detail or '-'}"
        )
    if page.get("next_offset") is not None:
        rows.append(f"(more: --offset {page['next_offset']})")
    out.result(page, "\n".join(rows))
    return EXIT_OK


def cmd_cancel(client: SDXLClient, args: argparse.Namespace, out: Output) -> int:
    if args.generation is not None:
        answer = client.cancel_generation(args.generation)
        out.result(answer, f"generation {args.generation} {answer.get('status')}")
        return EXIT_OK
    if args.session is None:
        raise UsageError("give SESSION (its training run) or --generation ID")
    answer = client.cancel_training(args.session)
    out.result(answer, f"run {answer.get('run_id')} of session {args.session} cancelled")
    return EXIT_OK


def client_url(client: SDXLClient, url: str) -> str:
    """A path the API answers (`/training_samples/7.png`) as a full URL to open."""
    return url if "://" in url else f"{client.url.rstrip('/')}{url}"


# --- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The common options are accepted before or after the command (`sdxl --json runs`,
    # `sdxl runs --json`): the sub-parsers' copies default to SUPPRESS so that one given
    # before the command is not reset by the sub-parser.
    def common(suppress: bool) -> argparse.ArgumentParser:
        default = argparse.SUPPRESS if suppress else None
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--url", default=default, help="the server (SDXL_URL)")
        parser.add_argument("--token", default=default, help="the API token (SDXL_API_TOKEN)")
        parser.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS if suppress else False,
            help="print one JSON document on stdout",
        )
        return parser

    parser = argparse.ArgumentParser(
        prog="sdxl",
        description="The SDXL LoRA service from the command line.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common(suppress=False)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = [common(suppress=True)]

    def add(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=shared, **kwargs)

    session = add("session", "sessions")
    session_sub = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    session_sub.add_parser(
        "create", help="create an empty session; prints its id", parents=shared
    ).set_defaults(handler=cmd_session_create)

    upload = add("upload", "upload training photos: a folder (kohya captions), a zip or files")
    upload.add_argument("session", type=int, metavar="SESSION")
    upload.add_argument("source", metavar="PHOTOS_DIR_OR_ZIP")
    upload.add_argument("--caption", help="the caption of a single image file")
    upload.set_defaults(handler=cmd_upload)

    train = add(
        "train",
        "train a LoRA, showing its progress and samples until it ends",
        epilog="Any other training field of POST /train_lora: --name value "
        "(--sample-every 2, --learning-rate 2e-4, --enable-bucket false) or --set name=value; "
        "values are JSON where they parse as JSON.",
    )
    train.add_argument("session", type=int, metavar="SESSION")
    train.add_argument("--trigger", help="the identity token put before every caption")
    train.add_argument("--steps", type=int, help="the run's length in steps (recipe: original)")
    train.add_argument("--rank", type=int, help="the LoRA's rank, 1 to 128")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any training field"
    )
    train.add_argument("--no-wait", action="store_true", help="print the run and return")
    train.set_defaults(handler=cmd_train)

    generate = add("generate", "generate images, optionally with LoRAs, into a folder")
    generate.add_argument("prompt")
    generate.add_argument(
        "--lora",
        action="append",
        type=parse_lora,
        metavar="SESSION[:ITER][@SCALE]",
        help="a LoRA to apply (repeatable, up to 4): the session's latest, LoRA ITER, at SCALE",
    )
    generate.add_argument("-o", "--output", default=".", metavar="DIR", help="default: .")
    generate.add_argument("--negative-prompt")
    generate.add_argument("--steps", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--num-images", type=int)
    generate.add_argument("--guidance-scale", type=float)
    generate.add_argument("--scheduler")
    generate.add_argument("--output-format", choices=["png", "jpeg", "webp"])
    generate.add_argument("--init-image", metavar="FILE", help="img2img: the image to start from")
    generate.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any /txt2img field"
    )
    generate.add_argument("--no-wait", action="store_true", help="print the generation and return")
    generate.set_defaults(handler=cmd_generate)

    lora = add("lora", "LoRA files")
    lora_sub = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    download = lora_sub.add_parser(
        "download", help="download a session's LoRA (the latest by default)", parents=shared
    )
    download.add_argument("session", type=int, metavar="SESSION")
    download.add_argument("--format", choices=["diffusers", "kohya"])
    download.add_argument("--file", help="a LoRA or checkpoint file by name")
    download.add_argument("-o", "--output", default=".", metavar="PATH", help="default: .")
    download.set_defaults(handler=cmd_lora_download)

    runs = add("runs", "sessions and the state of their latest training run")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--offset", type=int, default=0)
    runs.set_defaults(handler=cmd_runs)

    cancel = add("cancel", "cancel a session's training run, or a generation")
    cancel.add_argument("session", type=int, nargs="?", metavar="SESSION")
    cancel.add_argument("--generation", type=int, metavar="ID")
    cancel.set_defaults(handler=cmd_cancel)
    return parser


def split_training_fields(
    argv: Sequence[str], parser: argparse.ArgumentParser
) -> tuple[list[str], list[str]]:
    """Takes `sdxl train`'s training fields (`--name value`, `--name=value`: any option the
    train command does not declare itself) out of argv, so that argparse never mistakes a
    field's value for SESSION. Returns (the rest of argv, the fields' tokens)."""
    argv = list(argv)
    global_with_value = {"--url", "--token"}
    index = 0
    while index < len(argv) and argv[index] != "train":
        index += 2 if argv[index] in global_with_value else 1
    if index >= len(argv):
        return argv, []
    train_parser = command_parser(parser, "train")
    declared = set(train_parser._option_string_actions)
    flags = {
        option
        for option, action in train_parser._option_string_actions.items()
        if action.nargs == 0
    }
    rest, fields = argv[: index + 1], []
    tokens = argv[index + 1 :]
    while tokens:
        token = tokens.pop(0)
        name = token.partition("=")[0]
        if token == "--":
            rest += [token, *tokens]
            break
        if not token.startswith("--") or name in declared:
            rest.append(token)
            if name in declared and name not in flags and "=" not in token and tokens:
                rest.append(tokens.pop(0))  # a declared option's value, e.g. --trigger sks
            continue
        fields.append(token)
        if "=" not in token and tokens:
            fields.append(tokens.pop(0))
    return rest, fields


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return cast(argparse.ArgumentParser, action.choices[name])
    raise LookupError(name)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    rest, fields = split_training_fields(argv, parser)
    args = parser.parse_args(rest)
    args.extra_fields = fields
    return args


def main(
    argv: Sequence[str] | None = None,
    client_factory: Callable[..., SDXLClient] = SDXLClient,
) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Output(json_mode=args.json, stdout=sys.stdout, stderr=sys.stderr)
    try:
        with client_factory(
            url=args.url or os.environ.get("SDXL_URL"),
            token=args.token or os.environ.get("SDXL_API_TOKEN"),
        ) as client:
            return int(args.handler(client, args, out))
    except (SDXLError, httpx.HTTPError, UsageError, KeyboardInterrupt) as error:
        code = exit_code_for(error)
        report_error(error, out)
        return code


def report_error(error: BaseException, out: Output) -> None:
    if isinstance(error, KeyboardInterrupt):
        # Only the waiting stops: the server goes on with what it was asked.
        message = "interrupted; a run or generation already queued goes on (sdxl cancel stops it)"
    elif isinstance(error, SDXLError):
        message = error.message
    elif isinstance(error, httpx.TransportError):
        message = f"cannot reach the server: {error or type(error).__name__}"
    else:
        message = str(error) or type(error).__name__
    if out.json_mode:
        document = {
            "status": "error",
            "message": message,
            "http_status": getattr(error, "status", None),
            "field": getattr(error, "field", None),
        }
        out.stdout.write(json.dumps(document) + "\n")
        out.stdout.flush()
    status = f" ({error.status})" if isinstance(error, SDXLError) and error.status else ""
    out.end_progress()
    out.stderr.write(f"sdxl: error{status}: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
