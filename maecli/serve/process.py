"""The process: the listening socket, uvicorn, and a clean stop on Ctrl-C."""

import signal
import socket
import sys

from ..errors import UserError
from .errors import require_extra
from .guard import LOOPBACK_NAMES, host_name


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a port in use is one line for the user before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def loopback(sock: socket.socket) -> bool:
    """Whether the socket is bound to a loopback address (127.0.0.0/8, ::1): whatever name --host gave for it."""
    import ipaddress

    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def page_url(host: str, port: int) -> str:
    """The address to open. Bound to every address (0.0.0.0, ::), the page is at this machine's loopback address."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host_name(host), host_name(host))
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def serve(
    weights,
    images=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model=None,
    cache_dir=None,
    log=None,
    ready=None,
    show_bands=None,
) -> None:
    """Serve the page until Ctrl-C (or SIGTERM). Raises UserError (bad weights or folder, port taken) and,
    after a clean shutdown on Ctrl-C, KeyboardInterrupt.

    `model` is the loaded `weights` if the caller has it; `ready(url)` is called once the server accepts
    connections (default: print the address on stderr). Messages go to `log` (default: stderr). `show_bands`
    picks the bands pictured, as reconstruct's --show-bands.
    """
    require_extra()
    import uvicorn

    from .app import create_app

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    sock = listen(host, port)
    server = None
    try:
        local = loopback(sock)
        if not local:
            log(f"warning: listening on {host}: anyone who can reach this machine can use the page (no login)")
        allowed = (*LOOPBACK_NAMES, host_name(host)) if local else None  # the names of this machine, and --host
        app = create_app(
            weights, images, model=model, cache_dir=cache_dir, log=log, allowed_hosts=allowed, show_bands=show_bands
        )
        server = app.state.server
        url = page_url(host, sock.getsockname()[1])

        class Uvicorn(uvicorn.Server):
            interrupted = False

            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:
                    (ready or (lambda u: log(f"maecli serve: open {u} (Ctrl-C to stop)")))(url)

            def handle_exit(self, sig, frame):
                self.interrupted = self.interrupted or sig == signal.SIGINT
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        uv = Uvicorn(config)
        uv.run(sockets=[sock])
        if uv.interrupted:  # uvicorn does not always pass the Ctrl-C on once it has shut down: say it ourselves
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and passes the Ctrl-C on
        log("maecli serve: stopped")
        raise
    finally:
        if server is not None:
            server.close()
        sock.close()
