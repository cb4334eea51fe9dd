"""training_app.services.loras: storing, uploading and reading LoRA files, and what a fault
while storing one leaves (nothing)."""

import os

import pytest
import torch

from core.errors import ServiceError
from sdxl_engine.files import sha256_file
from sessions_app import services as session_services
from sessions_app import storage
from tests import community_loras
from tests.helpers import (
    FAST_TRAINING,
    HOSTILE_LORAS,
    ONE_TINY_MODULE,
    hostile_lora,
    image_bytes,
    lora_bytes,
    safetensors_assembled,
    safetensors_parts,
)
from tests.maintenance_helpers import run as run_command
from tests.maintenance_helpers import stored_checkpoint, stored_samples
from training_app.models import (
    Generation,
    GenerationLora,
    LoraArtifact,
    TrainingCheckpoint,
    TrainingRun,
    TrainingSample,
)
from training_app.selectors import lora_get
from training_app.services import loras as lora_services
from training_app.services import runs as run_services
from training_app.services.watch import checkpoint_path, sample_path

pytestmark = pytest.mark.django_db


def test_lora_numbers_count_up_and_skip_files_dropped_in_by_hand(session_with_images, tmp_path):
    lora = _trained_lora(session_with_images)
    folder = storage.session_dir(session_with_images.pk)
    (folder / "lora_2.safetensors").write_bytes(lora)  # an operator's file
    artifact = lora_services.lora_upload(session_with_images.pk, lora, None)
    assert (artifact.number, artifact.filename) == (3, "lora_3.safetensors")
    assert (folder / "lora_3.safetensors").read_bytes() == lora


def test_upload_with_filename_and_name_taken_is_409(session_with_images):
    lora = _trained_lora(session_with_images)
    artifact = lora_services.lora_upload(session_with_images.pk, lora, "my_lora.safetensors")
    assert artifact.filename == "my_lora.safetensors" and artifact.number == 2
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, b"other bytes", "my_lora.safetensors")
    assert error.value.status in (400, 409)
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, lora, "my_lora.safetensors")
    assert error.value.status == 409
    path = storage.session_dir(session_with_images.pk) / "my_lora.safetensors"
    assert path.read_bytes() == lora
    assert LoraArtifact.objects.count() == 2


@pytest.mark.parametrize(
    "filename",
    [
        "../evil.safetensors",
        "../../../../tmp/evil.safetensors",
        "..\\evil.safetensors",
        "..\\..\\evil.safetensors",
        "a/b.safetensors",
        "a\\b.safetensors",
        "/abs.safetensors",
        "C:\\abs.safetensors",
        "~/evil.safetensors",
        "x.bin",
        "x.pt",
        "x.ckpt",
        "x.safetensors.tmp",
        "X.SAFETENSORS",
        "x\0.safetensors",
        "x.safetensors\0.png",
        ".hidden.safetensors",
        ".safetensors",
        "lora_1.safetensors/",
        "a" * 130 + ".safetensors",
    ],
)
def test_upload_refuses_unsafe_names_and_writes_nothing(session_with_images, filename, tmp_path):
    before = _tree(tmp_path)
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, lora_bytes(), filename)
    assert error.value.status == 400 and "plain file name" in error.value.message
    assert _tree(tmp_path) == before  # nothing anywhere: not in the session, not beside it
    assert not LoraArtifact.objects.exists()


def test_upload_of_non_safetensors_bytes_is_400_and_leaves_nothing(session_with_images):
    folder = storage.session_dir(session_with_images.pk)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, b"\x80\x04 pickle-ish bytes", None)
    assert error.value.status == 400
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not LoraArtifact.objects.exists()
    session_with_images.refresh_from_db()
    assert session_with_images.next_lora_number == 1


def _trained_lora(session) -> bytes:
    run = run_services.training_run_start(session.pk, FAST_TRAINING)
    run_services.training_run_execute(run.pk)
    return (storage.session_dir(session.pk) / "lora_1.safetensors").read_bytes()


def test_kohya_upload_is_stored_in_the_trainers_form(session_with_images):
    from safetensors.torch import load

    from sdxl_engine.lora_formats import kohya_lora_bytes

    trained_path = storage.session_dir(session_with_images.pk) / "lora_1.safetensors"
    trained = load(_trained_lora(session_with_images))
    kohya = kohya_lora_bytes(trained_path, base_model="x")
    assert all(key.startswith("lora_unet_") for key in load(kohya))

    artifact = lora_services.lora_upload(session_with_images.pk, kohya, "from_a1111.safetensors")

    stored_path = storage.session_dir(session_with_images.pk) / "from_a1111.safetensors"
    stored = load(stored_path.read_bytes())
    assert stored.keys() == trained.keys()
    assert all(torch.equal(stored[key], trained[key]) for key in trained)
    assert artifact.sha256 == sha256_file(stored_path)
    assert artifact.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    # Read back as kohya, it is the same adapter again.
    assert load(lora_services.lora_read(artifact, "kohya")).keys() == load(kohya).keys()


@pytest.fixture
def tiny_folder(tmp_path):
    """The tiny model's configs laid out as its Base folder (what settings use in tests)."""
    return community_loras.packaged_model_folder("tiny", tmp_path / "tiny-base")


@pytest.mark.parametrize(
    "writer",
    [
        community_loras.write_kohya_locon,
        community_loras.write_lycoris_locon,
        community_loras.write_peft_lora,
    ],
    ids=["sd-scripts LoCon", "LyCORIS LoCon", "PEFT"],
)
def test_community_uploads_are_stored_converted_with_every_module(
    session_with_images, tiny_folder, tmp_path, writer
):
    """sd-scripts' SGM block names are numbered for the tiny UNet (one resnet per block):
    the upload converts for the configured model."""
    from safetensors.torch import load, load_file

    from sdxl_engine.lora_formats import is_canonical, to_canonical

    source = writer(tmp_path / "community.safetensors", tiny_folder)
    original = load_file(source)

    artifact = lora_services.lora_upload(
        session_with_images.pk, source.read_bytes(), "community.safetensors"
    )

    stored_path = storage.session_dir(session_with_images.pk) / "community.safetensors"
    assert is_canonical(stored_path)
    stored = load(stored_path.read_bytes())
    layers = community_loras.model_configs(tiny_folder)["unet"]["layers_per_block"]
    expected = to_canonical(original, _metadata(source), layers_per_block=layers)
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[key], expected[key]) for key in expected)
    # Every pair of the file is there: none dropped on the way.
    pairs = sum(key.endswith(("down.weight", "lora_A.weight")) for key in original)
    assert sum(key.endswith(".down.weight") for key in stored) == pairs
    components = {key.split(".")[0] for key in stored}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert any(stored[key].ndim == 4 for key in stored)  # conv (LoCon) pairs
    # And it goes out as kohya and comes back as the same canonical file.
    kohya = lora_services.lora_read(artifact, "kohya")
    back = to_canonical(load(kohya), {})
    assert back.keys() == stored.keys()
    assert all(torch.equal(back[key], stored[key]) for key in stored)


def _metadata(path) -> dict:
    from sdxl_engine.lora_files import read_lora_metadata

    return read_lora_metadata(path)


def test_sd_scripts_metadata_is_kept(session_with_images, tiny_folder, tmp_path):
    source = community_loras.write_kohya_locon(tmp_path / "k.safetensors", tiny_folder)
    artifact = lora_services.lora_upload(session_with_images.pk, source.read_bytes(), None)
    assert artifact.metadata["ss_network_module"] == "networks.lora"
    assert "conv_dim" in artifact.metadata["ss_network_args"]


def test_diffusers_form_with_conv_and_text_encoder_pairs_is_accepted(
    session_with_images, tiny_folder, tmp_path
):
    from safetensors.torch import load_file

    source = community_loras.write_diffusers_lora(tmp_path / "d.safetensors", tiny_folder)
    artifact = lora_services.lora_upload(session_with_images.pk, source.read_bytes(), None)
    stored = load_file(lora_services.lora_file_path(artifact))
    assert len(stored) == len(load_file(source))
    assert "unet.conv_in.lora.down.weight" in stored


@pytest.mark.parametrize(
    ("writer", "kind"),
    [
        (community_loras.write_loha, "LoHa is not supported"),
        (community_loras.write_lokr, "LoKr is not supported"),
    ],
    ids=["LoHa", "LoKr"],
)
def test_loha_and_lokr_uploads_are_refused_by_name_and_store_nothing(
    session_with_images, data_dir, tiny_folder, tmp_path, writer, kind
):
    source = writer(tmp_path / "lycoris.safetensors", tiny_folder)
    before = _tree(data_dir)
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, source.read_bytes(), "x.safetensors")
    assert error.value.status == 400
    assert kind in error.value.message
    assert "upload a plain LoRA or LoCon" in error.value.message
    _nothing_stored(session_with_images, data_dir, before)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda t: {**t, "lora_unet_input_blocks_3_1_proj_in.dora_scale": torch.ones(1, 64)},
            "DoRA is not supported",
        ),
        (
            lambda t: {
                **t,
                "lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight": torch.ones(2, 2, 3, 3),
            },
            "Tucker-decomposed LoCon (lora_mid) is not supported",
        ),
        (
            lambda t: {
                **t,
                "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.ones(2, 64),
                "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.ones(64, 2),
            },
            "is no Linear or Conv2d module of this model's unet",
        ),
        (
            lambda t: {
                **t,
                "lora_unet_middle_block_1_nonsense.lora_down.weight": torch.ones(2, 64),
                "lora_unet_middle_block_1_nonsense.lora_up.weight": torch.ones(64, 2),
            },
            "unet.mid_block.attentions.0.nonsense is no Linear or Conv2d module",
        ),
        (
            lambda t: {
                key: (value[:, :, :1, :1].contiguous() if "in_layers_2.lora_down" in key else value)
                for key, value in t.items()
            },
            "but this model's Conv2d is",
        ),
    ],
    ids=["DoRA", "lora_mid", "no such block", "no such module", "wrong kernel"],
)
def test_kohya_uploads_that_do_not_fit_are_refused_naming_why(
    session_with_images, data_dir, tiny_folder, tmp_path, change, problem
):
    from safetensors.torch import load_file, save_file

    source = community_loras.write_kohya_locon(tmp_path / "k.safetensors", tiny_folder)
    changed = tmp_path / "changed.safetensors"
    save_file(change(load_file(source)), str(changed))
    before = _tree(data_dir)
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, changed.read_bytes(), None)
    assert error.value.status == 400
    assert problem in error.value.message
    _nothing_stored(session_with_images, data_dir, before)


def test_canonical_upload_is_stored_byte_for_byte(session_with_images):
    lora = _trained_lora(session_with_images)
    artifact = lora_services.lora_upload(session_with_images.pk, lora, None)
    assert lora_services.lora_read(artifact) == lora


def _tree(root) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def _nothing_stored(session, data_dir, files_before: list[str]) -> None:
    """No row, no counter moved, no file added (staged uploads cleaned up too)."""
    assert _tree(data_dir) == files_before or _tree(data_dir) == sorted(
        [*files_before, "session_data/.staging"]
    )
    assert not list((data_dir / "session_data" / ".staging").glob("*"))
    session.refresh_from_db()
    assert LoraArtifact.objects.filter(session=session).count() == session.next_lora_number - 1


def test_upload_of_a_pickle_is_refused_without_unpickling(session_with_images, data_dir, tmp_path):
    import pickle

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    before = _tree(data_dir)
    for data in (pickle.dumps(Payload()), pickle.dumps({"unet.x.to_q.lora.down.weight": [0.0]})):
        with pytest.raises(ServiceError) as error:
            lora_services.lora_upload(session_with_images.pk, data, None)
        assert error.value.status == 400
        assert "is not a readable safetensors file" in error.value.message
    assert not marker.exists()
    _nothing_stored(session_with_images, data_dir, before)


def test_upload_never_calls_an_unpickler(session_with_images, monkeypatch):
    import pickle

    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError("an uploaded file was unpickled")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, forbidden)
    with pytest.raises(ServiceError):
        lora_services.lora_upload(session_with_images.pk, pickle.dumps([1, 2, 3]), None)
    assert lora_services.lora_upload(session_with_images.pk, lora_bytes(), None).number == 1


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (os.urandom(4096), "is not a readable safetensors file"),
        (b"", "is not a readable safetensors file"),
        (
            lora_bytes(
                shapes={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 32)}
            ),
            "adds a 64 x 32 weight, but this model's Linear is 64 x 64",
        ),
        (
            lora_bytes(
                shapes={"down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}
            ),
            "is no Linear or Conv2d module of this model's unet",
        ),
        (lora_bytes(fill=float("nan")), "holds NaN or infinite values"),
        (lora_bytes(fill=float("inf")), "holds NaN or infinite values"),
    ],
    ids=["random bytes", "empty", "wrong shape", "unknown module", "NaN", "Inf"],
)
def test_upload_of_no_lora_for_this_model_is_400_naming_the_problem(
    session_with_images, data_dir, data, problem
):
    before = _tree(data_dir)
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, data, "named.safetensors")
    assert error.value.status == 400
    assert error.value.message.startswith("lora_base64 is not a usable LoRA file")
    assert problem in error.value.message
    _nothing_stored(session_with_images, data_dir, before)


def test_upload_of_a_taken_name_is_409_and_the_old_file_is_untouched(session_with_images):
    first, second = lora_bytes(seed=1), lora_bytes(seed=2)
    lora_services.lora_upload(session_with_images.pk, first, "mine.safetensors")
    path = storage.session_dir(session_with_images.pk) / "mine.safetensors"
    # Also a file that an operator dropped in by hand, with no row.
    (path.parent / "by_hand.safetensors").write_bytes(b"operator's")
    for name in ("mine.safetensors", "by_hand.safetensors"):
        with pytest.raises(ServiceError) as error:
            lora_services.lora_upload(session_with_images.pk, second, name)
        assert error.value.status == 409
    assert path.read_bytes() == first
    assert (path.parent / "by_hand.safetensors").read_bytes() == b"operator's"
    assert LoraArtifact.objects.count() == 1


def test_upload_to_a_session_deleted_meanwhile_is_404_and_recreates_nothing(
    session_with_images, monkeypatch, django_capture_on_commit_callbacks
):
    folder = storage.session_dir(session_with_images.pk)
    real_check = lora_services._canonical_lora_for_the_model

    def delete_while_checking(upload, converted):
        checked = real_check(upload, converted)
        session_services.session_delete(session_with_images.pk)
        return checked

    monkeypatch.setattr(lora_services, "_canonical_lora_for_the_model", delete_while_checking)
    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(ServiceError) as error:
            lora_services.lora_upload(session_with_images.pk, lora_bytes(), None)
    assert error.value.status == 404
    assert not folder.exists()
    assert [p.name for p in folder.parent.iterdir()] == [".staging"]
    assert not list((folder.parent / ".staging").iterdir())


# --- A crash between the temporary file and the rename, or a truncated file ------------------


class DiskFull(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


def _crash_on_replace(source, target):
    raise DiskFull


def _truncate_then_replace(source, target):
    """What a lost write looks like: the file renamed into place is short."""
    with open(source, "r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) // 2)
    os.replace(source, target)


@pytest.mark.parametrize(
    ("fault", "message"),
    [(_crash_on_replace, "could not be moved into place"), (_truncate_then_replace, "sha256")],
    ids=["replace fails", "file truncated"],
)
def test_upload_store_fault_leaves_the_old_lora_and_no_new_one(
    session_with_images, data_dir, monkeypatch, fault, message
):
    old = lora_services.lora_upload(session_with_images.pk, lora_bytes(seed=1), None)
    old_path = storage.session_dir(session_with_images.pk) / old.filename
    old_bytes = old_path.read_bytes()
    before = _tree(data_dir)
    monkeypatch.setattr(lora_services, "replace_with_retry", fault)

    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, lora_bytes(seed=2), None)
    assert error.value.status == 500 and message in error.value.message
    _nothing_stored(session_with_images, data_dir, before)
    assert old_path.read_bytes() == old_bytes
    assert lora_get(session_with_images.pk) == old  # the latest is still the old one


@pytest.mark.parametrize(
    ("fault", "message"),
    [(_crash_on_replace, "could not be moved into place"), (_truncate_then_replace, "sha256")],
    ids=["replace fails", "file truncated"],
)
def test_training_store_fault_ends_the_run_in_error_with_no_lora(
    session_with_images, data_dir, monkeypatch, fault, message
):
    old = lora_services.lora_upload(session_with_images.pk, lora_bytes(seed=1), None)
    before = _tree(data_dir)
    run = run_services.training_run_start(session_with_images.pk, FAST_TRAINING)
    monkeypatch.setattr(lora_services, "replace_with_retry", fault)
    run_services.training_run_execute(run.pk)

    run.refresh_from_db()
    assert run.status == "error" and message in run.error_message
    _nothing_stored(session_with_images, data_dir, before)  # and no .training-run-* file
    assert lora_get(session_with_images.pk) == old


def test_the_row_is_written_only_once_the_verified_file_is_in_place(
    session_with_images, monkeypatch
):
    data = lora_bytes()
    real_create = LoraArtifact.objects.create
    seen = {}

    def create(**fields):
        path = storage.session_dir(session_with_images.pk) / fields["filename"]
        seen["bytes"] = path.read_bytes()
        return real_create(**fields)

    monkeypatch.setattr(LoraArtifact.objects, "create", create)
    artifact = lora_services.lora_upload(session_with_images.pk, data, None)
    assert seen["bytes"] == data
    assert artifact.sha256 == storage.sha256_bytes(data) and artifact.size == len(data)


# --- prune_loras: checkpoints ----------------------------------------------------------------


@pytest.fixture
def runs_with_checkpoints():
    """A session with two uploaded LoRAs and runs in every state, each with checkpoints; the
    completed run has sample images too."""
    session = session_services.session_create()
    for seed in (1, 2):
        lora_services.lora_upload(session.pk, lora_bytes(seed=seed), None)
    completed = TrainingRun.objects.create(session=session, status="completed")
    failed = TrainingRun.objects.create(session=session, status="error")
    running = TrainingRun.objects.create(session=session, status="running")
    checkpoints = {
        "completed": [stored_checkpoint(completed, 2, seed=3), stored_checkpoint(completed, 4)],
        "error": [stored_checkpoint(failed, 2, seed=5)],
        "running": [stored_checkpoint(running, 2, seed=6)],
    }
    samples = stored_samples(completed, 2, prompts=("a red square", "a cat"))
    return session, checkpoints, samples


def _names(session, checkpoints) -> list[str]:
    return [f"session_{session.pk}/checkpoints/{c.filename}" for c in checkpoints]


def test_prune_keeps_the_newest_keep_checkpoints_of_ended_runs_and_all_of_running_ones(
    runs_with_checkpoints, django_capture_on_commit_callbacks
):
    """`--keep 2` keeps two checkpoints: the newest run's, its last step first."""
    session, checkpoints, samples = runs_with_checkpoints
    (old_step, last_step), errored = checkpoints["completed"], checkpoints["error"][0]
    running = checkpoints["running"][0]
    folder = storage.session_dir(session.pk)
    before = _tree(folder)

    dry = run_command("prune_loras", "--keep", "2", "--dry-run")

    assert f"would delete {_names(session, [old_step])[0]}" in dry
    assert "would delete 1 LoRA files" in dry
    assert _tree(folder) == before and TrainingCheckpoint.objects.count() == 4

    with django_capture_on_commit_callbacks(execute=True):
        output = run_command("prune_loras", "--keep", "2")

    assert f"deleted {_names(session, [old_step])[0]}" in output
    assert set(TrainingCheckpoint.objects.all()) == {last_step, errored, running}
    assert not checkpoint_path(old_step).exists()
    assert all(checkpoint_path(c).is_file() for c in (last_step, errored, running))
    # keep=2 keeps both LoRAs, and the ended run's sample images stay, rows and files.
    assert LoraArtifact.objects.count() == 2
    assert list(TrainingSample.objects.all()) == samples
    assert all(sample_path(sample).is_file() for sample in samples)
    assert lora_services.loras_prune(keep=2) == []
    assert lora_services.loras_prune(keep=3) == []


def test_prune_keep_0_removes_every_checkpoint_of_ended_runs_but_not_a_running_runs(
    runs_with_checkpoints, django_capture_on_commit_callbacks
):
    session, checkpoints, _ = runs_with_checkpoints
    ended = checkpoints["completed"] + checkpoints["error"]

    with django_capture_on_commit_callbacks(execute=True):
        pruned = lora_services.loras_prune(keep=0)

    assert pruned == [
        f"session_{session.pk}/lora_2.safetensors",
        f"session_{session.pk}/lora_1.safetensors",
    ] + _names(session, ended)
    assert list(TrainingCheckpoint.objects.all()) == checkpoints["running"]
    assert not any(checkpoint_path(checkpoint).exists() for checkpoint in ended)
    assert checkpoint_path(checkpoints["running"][0]).is_file()


def test_prune_with_keep_names_loras_and_checkpoints_and_honours_the_session(
    runs_with_checkpoints, django_capture_on_commit_callbacks
):
    session, checkpoints, _ = runs_with_checkpoints
    other = session_services.session_create()
    other_run = TrainingRun.objects.create(session=other, status="completed")
    other_checkpoint = stored_checkpoint(other_run, 2, seed=9)

    with django_capture_on_commit_callbacks(execute=True):
        pruned = lora_services.loras_prune(keep=1, session_id=session.pk)

    # The newest checkpoint of an ended run stays: the errored run's, the latest.
    assert pruned == [f"session_{session.pk}/lora_1.safetensors"] + _names(
        session, checkpoints["completed"]
    )
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_2.safetensors"]
    assert not (storage.session_dir(session.pk) / "lora_1.safetensors").exists()
    # Another session's checkpoint is not touched when one session is pruned.
    assert TrainingCheckpoint.objects.filter(pk=other_checkpoint.pk).exists()
    assert checkpoint_path(other_checkpoint).is_file()


def test_prune_keeps_a_checkpoint_a_waiting_generation_uses(
    runs_with_checkpoints, django_capture_on_commit_callbacks
):
    session, checkpoints, _ = runs_with_checkpoints
    in_use = checkpoints["completed"][0]
    generation = Generation.objects.create(
        status="queued", prompt="a cat", parameters={}, seed=1, session=session
    )
    GenerationLora.objects.create(
        generation=generation,
        position=0,
        checkpoint=in_use,
        source_session_id=session.pk,
        filename=in_use.filename,
        sha256=in_use.sha256,
        scale=1.0,
    )

    with django_capture_on_commit_callbacks(execute=True):
        pruned = lora_services.loras_prune(keep=2)

    # Past the newest two, but a waiting generation uses it: kept.
    assert pruned == []
    with django_capture_on_commit_callbacks(execute=True):
        pruned = lora_services.loras_prune(keep=0)

    assert pruned[2:] == _names(session, checkpoints["completed"][1:] + checkpoints["error"])
    assert set(TrainingCheckpoint.objects.all()) == {in_use, checkpoints["running"][0]}
    assert checkpoint_path(in_use).read_bytes()  # still there, whole
    assert sha256_file(checkpoint_path(in_use)) == in_use.sha256

    # Once the generation is done with it, the next prune removes it.
    Generation.objects.filter(pk=generation.pk).update(status="completed")
    with django_capture_on_commit_callbacks(execute=True):
        assert lora_services.loras_prune(keep=0) == _names(session, [in_use])
    assert not checkpoint_path(in_use).exists()
    applied = generation.applied_loras.get()
    assert applied.checkpoint is None and applied.filename == in_use.filename


def test_prune_command_lists_checkpoints(runs_with_checkpoints):
    session, checkpoints, _ = runs_with_checkpoints
    output = run_command("prune_loras", "--keep", "1", "--dry-run")
    for name in _names(session, checkpoints["completed"]):
        assert f"would delete {name}" in output
    assert "would delete 3 LoRA files" in output
    assert TrainingCheckpoint.objects.count() == 4


def test_auto_preset_converts_sd_scripts_block_names_for_the_model_they_fit(
    session_with_images, settings, tiny_folder, tmp_path
):
    """With the automatic preset the model is real SDXL (two resnets per block) or the tiny
    one (one): sd-scripts' numbering is read for each, and the tiny one fits."""
    from safetensors.torch import load_file

    settings.SDXL_MODEL_PRESET = ""
    settings.SDXL_BASE_MODEL = ""
    source = community_loras.write_kohya_locon(tmp_path / "k.safetensors", tiny_folder)
    artifact = lora_services.lora_upload(session_with_images.pk, source.read_bytes(), None)
    stored = load_file(lora_services.lora_file_path(artifact))
    assert "unet.down_blocks.0.downsamplers.0.conv.lora.down.weight" in stored
    # A file for neither is refused with the first model's (real SDXL's) problem.
    settings.SDXL_MODEL_PRESET = "sdxl-random"
    with pytest.raises(ServiceError, match="names no Linear or Conv2d module of SDXL's UNet"):
        lora_services.lora_upload(session_with_images.pk, source.read_bytes(), None)


def test_prune_keeps_the_lora_a_queued_run_continues(django_capture_on_commit_callbacks):
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    for seed in (1, 2):
        lora_services.lora_upload(session.pk, lora_bytes(seed=seed), None)
    run_services.training_run_start(session.pk, FAST_TRAINING, init_lora={"iteration": 1})

    with django_capture_on_commit_callbacks(execute=True):
        assert lora_services.loras_prune(keep=0) == [f"session_{session.pk}/lora_2.safetensors"]
    assert (storage.session_dir(session.pk) / "lora_1.safetensors").is_file()


@pytest.mark.parametrize("defect", list(HOSTILE_LORAS))
def test_hostile_uploads_are_400_naming_the_problem_and_store_nothing(
    session_with_images, data_dir, defect
):
    before = _tree(data_dir)
    with pytest.raises(ServiceError) as error:
        lora_services.lora_upload(session_with_images.pk, hostile_lora(defect), None)
    assert error.value.status == 400
    assert error.value.message.startswith("lora_base64 is not a usable LoRA file")
    assert HOSTILE_LORAS[defect] in error.value.message
    _nothing_stored(session_with_images, data_dir, before)


def test_a_lora_with_metadata_within_64_kb_uploads_and_its_row_keeps_it(session_with_images):
    header, data = safetensors_parts(lora_bytes(shapes=ONE_TINY_MODULE))
    metadata = {"notes": "x" * (63 * 1024)}
    upload = safetensors_assembled({"__metadata__": metadata, **header}, data)
    artifact = lora_services.lora_upload(session_with_images.pk, upload, None)
    assert artifact.metadata == metadata
    assert lora_services.lora_read(artifact) == upload
