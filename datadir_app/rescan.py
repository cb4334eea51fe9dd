"""`rescan`: rows follow the files a person added to or removed from session folders."""

import logging

from datadir_app.reconcile import data_dir_report, reconcile_session, session_ids
from datadir_app.report import Progress, Report, no_progress
from sessions_app.locking import session_lock

logger = logging.getLogger(__name__)


def rescan_session(session_id: int) -> Report:
    """Brings one session's rows in line with its folder; `fixed` lists what changed."""
    with session_lock(session_id) as session:
        report = reconcile_session(session, deep=False)
        report.apply()
    for change in report.fixed:
        logger.debug("rescan: %s", change.text)
    return report


def rescan(session_id: int | None = None, progress: Progress = no_progress) -> Report:
    """Brings the rows of one session, or of every session and session folder, in line."""
    if session_id is not None:
        return rescan_session(session_id)
    report = data_dir_report(session_ids())
    report.apply()
    for sid in progress(sorted(session_ids())):
        report.extend(rescan_session(sid))
    return report
