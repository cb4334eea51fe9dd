"""`manage.py create_token --owner NAME [--scopes read,generate] [--name LABEL]`."""

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count

from access_app.models import DEFAULT_OWNER_NAME, DEFAULT_SCOPES, SCOPES, ApiToken, Owner
from access_app.services import api_token_create
from core.errors import ServiceError


class Command(BaseCommand):
    help = (
        "Creates an API token for an owner (created if new) and prints it once: only its "
        "sha256 is stored. The owner's tokens see only the owner's sessions; a token with "
        f"the 'admin' scope sees every session. Scopes: {', '.join(SCOPES)} "
        f"(default: {','.join(DEFAULT_SCOPES)})."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", required=True, help="the owner (tenant) it belongs to")
        parser.add_argument(
            "--scopes", help=f"comma-separated, of {','.join(SCOPES)} (default: all but admin)"
        )
        parser.add_argument("--name", default="", help="a label for it (default: the owner)")

    def handle(
        self, *args: object, owner: str, scopes: str | None, name: str, **options: object
    ) -> None:
        wanted = None if scopes is None else [s.strip() for s in scopes.split(",") if s.strip()]
        try:
            token, plaintext = api_token_create(owner, name, wanted)
        except ServiceError as error:
            raise CommandError(error.message) from None
        self.stderr.write(
            f"API token {token.pk} of owner {token.owner.name!r}, scopes "
            f"{','.join(token.scopes)}. Copy it now: it cannot be shown again."
        )
        self.stderr.write(whose_sessions(token))
        self.stdout.write(plaintext)


def whose_sessions(token: ApiToken) -> str:
    """What the new token will see: its owner's sessions, and a word on the sessions of
    other owners it will not (those from before tokens belong to `default`), with the two
    ways to reach them."""
    counts = {
        owner.name: owner.session_count
        for owner in Owner.objects.annotate(session_count=Count("sessions")).filter(
            session_count__gt=0
        )
    }
    name = token.owner.name
    own = counts.pop(name, 0)
    if "admin" in token.scopes:
        return f"An admin token sees every owner's sessions ({own + sum(counts.values())} now)."
    text = f"Owner {name!r} has {own} session{'s' if own != 1 else ''}; this token sees only those."
    if not counts:
        return text
    others = ", ".join(f"{owner!r}: {count}" for owner, count in sorted(counts.items()))
    source = DEFAULT_OWNER_NAME if DEFAULT_OWNER_NAME in counts else next(iter(sorted(counts)))
    quoted = f'"{name}"' if " " in name else name
    return (
        f"{text}\n{sum(counts.values())} other sessions belong to other owners ({others}) and "
        f"answer this token 404, as if missing. Sessions made before API tokens belong to "
        f"{DEFAULT_OWNER_NAME!r}. To use them with this token, give them to {name!r}:\n"
        f"  bin/manage reassign_owner {source} {quoted} --dry-run   (then without --dry-run)\n"
        f"or create the token for their owner instead: bin/manage create_token --owner {source}"
    )
