"""`verify`: every row against its file and every file against a row, read in full."""

from datadir_app.reconcile import data_dir_report, reconcile_session, session_ids
from datadir_app.report import Progress, Report, no_progress
from sessions_app.locking import session_lock
from training_app.models import Generation
from training_app.services.generations.lifecycle import generations_dir


def verify(fix: bool = False, progress: Progress = no_progress) -> Report:
    """Every row against its file and every file against a row, decoding and hashing all.

    With `fix`, every repair that loses no data is applied (listed in `fixed`), then all
    is checked again: `changes` and `problems` say what is still wrong.
    """
    report = data_dir_report(session_ids())
    if fix:
        report.apply()
    for sid in progress(sorted(session_ids())):
        with session_lock(sid) as session:
            session_report = reconcile_session(session, deep=True)
            if fix:
                session_report.apply()
        report.extend(session_report)
    report.problems += _generation_problems()
    if fix and report.fixed:
        again = verify(fix=False, progress=progress)
        again.fixed = report.fixed
        return again
    return report


def _generation_problems() -> list[str]:
    problems = []
    finished = Generation.objects.filter(status=Generation.Status.COMPLETED, image_count__gt=0)
    for generation in finished.only("pk", "image_count", "parameters"):
        folder = generations_dir(generation.pk)
        missing = [
            i
            for i in range(generation.image_count)
            if not (folder / generation.image_filename(i)).is_file()
        ]
        if missing:
            problems.append(f"generation {generation.pk}: images {missing} are missing")
    return problems
