"""The `sdxl` command line without a server: its arguments, the --lora parser, the exit
codes, the progress line and --json's one document (a fake client stands in for the
API; tests/system/client/ runs the command against a real server)."""

import json
from types import SimpleNamespace

import httpx
import pytest
from sdxl_client import Generation, LoraRef, SDXLError
from sdxl_client.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_USAGE,
    format_run_progress,
    main,
    parse_args,
    parse_extra_fields,
    parse_lora,
)

pytestmark = pytest.mark.one_pass


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("12", LoraRef(12)),
        ("12:3", LoraRef(12, iteration=3)),
        ("12@0.8", LoraRef(12, scale=0.8)),
        ("12:3@-0.5", LoraRef(12, iteration=3, scale=-0.5)),
        (
            "4:lora_run9_step50.safetensors@2",
            LoraRef(4, lora_filename="lora_run9_step50.safetensors", scale=2.0),
        ),
    ],
)
def test_lora_spec(spec, expected):
    assert parse_lora(spec) == expected


@pytest.mark.parametrize("spec", ["", "x", "12:", "12@", "12@high", ":3", "-1"])
def test_lora_spec_refused(spec, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["generate", "a cat", "--lora", spec])
    assert exit_info.value.code == EXIT_USAGE
    assert f"argument --lora: {spec!r}" in capsys.readouterr().err


def test_train_takes_any_field_before_or_after_the_session():
    args = parse_args(
        ["--json", "train", "--sample-prompts", '["a b"]', "12", "--steps", "4",
         "--learning-rate=2e-4", "--noise-offset", "-0.1", "--set", "enable_bucket=false",
         "--trigger", "ohwx woman"]
    )  # fmt: skip
    assert (args.session, args.steps, args.trigger, args.json) == (12, 4, "ohwx woman", True)
    assert parse_extra_fields(args.extra_fields, args.set) == {
        "sample_prompts": ["a b"],
        "learning_rate": 2e-4,
        "noise_offset": -0.1,
        "enable_bucket": False,
    }


def test_json_before_or_after_the_command():
    assert parse_args(["runs"]).json is False
    assert parse_args(["runs", "--json"]).json is True
    assert parse_args(["--json", "session", "create"]).json is True
    assert parse_args(["--url", "http://h:1", "runs", "--token", "t"]).url == "http://h:1"


def test_unknown_option_outside_train_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["runs", "--steps", "3"])
    assert exit_info.value.code == EXIT_USAGE


def test_progress_line():
    assert (
        format_run_progress(
            {
                "status": "in-progress",
                "stage": "training",
                "step": 21,
                "total_steps": 50,
                "progress": 42,
                "loss": 0.11304,
                "eta_seconds": 97,
            }
        )  # fmt: skip
        == "training  step 21/50  42%  loss 0.1130  ETA 1m37s"
    )
    assert (
        format_run_progress(
            {
                "status": "in-progress",
                "stage": "loading",
                "step": 0,
                "total_steps": None,
                "progress": 0,
                "loss": None,
                "eta_seconds": None,
            }
        )  # fmt: skip
        == "loading  step 0/?  0%  ETA ?"
    )
    assert (
        format_run_progress(
            {"status": "in-progress", "queued": True, "queue_position": 2, "queue_eta_seconds": 140}
        )
        == "queued #2  starts in 2m20s"
    )
    assert format_run_progress({"status": "cancelled", "message": "training was cancelled"}) == (
        "cancelled: training was cancelled"
    )


class FakeClient:
    """Answers as the API would; `fail` makes every call raise it."""

    def __init__(self, fail=None, final=None, **_):
        self.url = "http://127.0.0.1:8000"
        self.fail = fail
        self.final = final or {"status": "completed", "progress": 100, "lora": "lora_1.safetensors"}
        self.calls = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _call(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def create_session(self):
        self._call("create_session")
        return 7

    def train(self, session_id, **fields):
        self._call("train", session_id, **fields)
        return {"status": "started", "run_id": 3, "recipe": {}}

    def generate(self, prompt, *, loras=None, init_image=None, wait=True, on_event=None, **fields):
        self._call("generate", prompt, loras=loras, wait=wait, **fields)
        running = {"generation_id": 5, "status": "running", "step": 3, "total_steps": 5}
        on_event(
            SimpleNamespace(id=1, name="progress", data={"event": "progress", "data": running})
        )
        return Generation(
            id=5, status="cancelled", message="cancelled by POST /generations/<id>/cancel"
        )

    def cancel_generation(self, generation_id):
        self._call("cancel_generation", generation_id)
        return {"generation_id": generation_id, "status": "cancelled"}

    def list_sessions(self, limit=50, offset=0):
        self._call("list_sessions", limit=limit, offset=offset)
        queued = {"status": "in-progress", "progress": 0, "queued": True}
        completed = {"status": "completed", "progress": 100, "lora": "lora_2.safetensors"}
        return {
            "sessions": [
                {"session_id": "7", "latest_lora": None, "image_groups": 1, "training": queued},
                {"session_id": "8", "latest_lora": "lora_2.safetensors", "training": completed},
            ]
        }

    def wait_for_run(self, run_id, on_event=None):
        samples = [{"step": 2, "prompt": "sks", "url": "/training_samples/1.png"}]
        progress = {"status": "in-progress", "stage": "training", "step": 2, "total_steps": 4,
                    "progress": 50, "loss": 0.25, "eta_seconds": 3, "samples": samples}  # fmt: skip
        on_event(
            SimpleNamespace(id=1, name="progress", data={"event": "progress", "data": progress})
        )
        on_event(SimpleNamespace(id=2, name="sample", data={"event": "sample", "data": progress}))
        return self.final


def run_cli(argv, capsys, **fake):
    clients = []

    def factory(**kwargs):
        clients.append(FakeClient(**fake, **kwargs))
        return clients[-1]

    code = main(argv, client_factory=factory)
    captured = capsys.readouterr()
    return code, captured.out, captured.err, clients[0] if clients else None


def test_session_create_json(capsys):
    code, out, _, _ = run_cli(["session", "create", "--json"], capsys)
    assert (code, json.loads(out)) == (EXIT_OK, {"session_id": 7})


def test_train_shows_progress_and_each_sample_once(capsys):
    code, out, err, client = run_cli(["train", "7", "--steps", "4", "--sample-every", "2"], capsys)
    assert code == EXIT_OK
    assert client.calls[0] == ("train", (7,), {"steps": 4, "sample_every": 2})
    assert err.count("training  step 2/4  50%  loss 0.2500  ETA 3s") == 1  # once per change
    assert err.count("http://127.0.0.1:8000/training_samples/1.png") == 1
    assert out.strip() == "run 3 completed: lora_1.safetensors"


@pytest.mark.parametrize("state", ["error", "cancelled"])
def test_train_that_ends_badly_exits_1(state, capsys):
    final = {"status": state, "message": "training was cancelled"}
    code, out, err, _ = run_cli(["train", "7", "--json"], capsys, final=final)
    assert code == EXIT_FAILED
    assert json.loads(out) == {"run_id": 3, "session_id": 7, **final}
    assert err == ""  # --json: nothing but the document


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SDXLError(404, "session 7 not found"), EXIT_REFUSED),
        (SDXLError(400, "steps: must be at least 1", field="steps"), EXIT_REFUSED),
        (SDXLError(503, "no generation worker is running"), EXIT_SERVER),
        (httpx.ConnectError("connection refused"), EXIT_SERVER),
        (KeyboardInterrupt(), EXIT_INTERRUPTED),
    ],
)
def test_exit_codes(error, code, capsys):
    exit_code, out, err, _ = run_cli(["--json", "train", "7"], capsys, fail=error)
    assert exit_code == code
    document = json.loads(out)
    assert document["status"] == "error"
    assert document["http_status"] == getattr(error, "status", None)
    assert document["field"] == getattr(error, "field", None)
    assert "sdxl: error" in err


def test_bad_training_field_is_a_usage_error_before_any_request(capsys):
    code, _, err, client = run_cli(["train", "7", "--set", "no-equals-sign"], capsys)
    assert code == EXIT_USAGE and "key=value" in err
    assert client.calls == []


def test_url_and_token_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("SDXL_URL", "http://env:1")
    monkeypatch.setenv("SDXL_API_TOKEN", "from-env")
    seen = {}

    def factory(url, token):
        seen.update(url=url, token=token)
        return FakeClient()

    assert main(["runs", "--token", "given"], client_factory=factory) == EXIT_OK
    assert seen == {"url": "http://env:1", "token": "given"}
    assert capsys.readouterr().out.splitlines() == [
        "SESSION  STATUS       PROGRESS  LORA",
        "7        queued             0%  -",
        "8        completed        100%  lora_2.safetensors",
    ]


def test_generate_passes_loras_and_fields_and_a_cancelled_one_exits_1(capsys, tmp_path):
    code, out, err, client = run_cli(
        ["generate", "a cat", "--lora", "7:2@0.5", "--lora", "8", "--steps", "5", "--seed", "1",
         "--set", "scheduler=euler_a", "-o", str(tmp_path / "out")],
        capsys,
    )  # fmt: skip
    assert code == EXIT_FAILED
    assert client.calls == [
        ("generate", ("a cat",), {"loras": [LoraRef(7, 2, 0.5), LoraRef(8)], "wait": True,
                                  "steps": 5, "seed": 1, "scheduler": "euler_a"}),
    ]  # fmt: skip
    assert "running  step 3/5" in err
    assert out.strip() == "generation 5 cancelled: cancelled by POST /generations/<id>/cancel"
    assert not (tmp_path / "out").exists()  # nothing written for a generation that ended badly


def test_cancel_a_generation_or_a_run(capsys):
    code, out, _, client = run_cli(["cancel", "--generation", "5", "--json"], capsys)
    assert (code, json.loads(out)) == (EXIT_OK, {"generation_id": 5, "status": "cancelled"})
    code, _, err, client = run_cli(["cancel"], capsys)
    assert code == EXIT_USAGE and "SESSION" in err and client.calls == []


def test_an_unknown_training_field_is_a_usage_error_naming_it(capsys):
    code, _, err, client = run_cli(["train", "7", "--max-train-steps", "10"], capsys)
    assert code == EXIT_USAGE and client.calls == []
    assert "no training field --max-train-steps; the fields: " in err and "steps" in err
