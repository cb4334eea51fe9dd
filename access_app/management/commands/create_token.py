"""`manage.py create_token --owner NAME [--scopes read,generate] [--name LABEL]`."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from access_app.models import DEFAULT_SCOPES, SCOPES
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
        self.stdout.write(plaintext)
