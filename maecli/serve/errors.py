"""What a request may be refused with, and the check that the optional web stack is installed."""

from ..errors import UserError

EXTRA_HINT = 'pip install "maecli[serve]"'


class MissingExtra(UserError):
    """The optional web stack is not installed."""


class Refused(Exception):
    """A request the server will not answer: an HTTP status and a one-line reason for the page."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


def require_extra() -> None:
    """Raise MissingExtra, naming the install command, unless FastAPI and uvicorn import."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingExtra(f"maecli serve needs FastAPI and uvicorn: {EXTRA_HINT}") from None
