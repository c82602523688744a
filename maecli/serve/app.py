"""The routes: the page and the JSON API over one Server. FastAPI is imported here, on first use."""

from .errors import Refused, require_extra
from .folder import preview_files
from .guard import cross_site, upload_refusal, wrong_host
from .images import MAX_PIXELS, MAX_UPLOAD_BYTES
from .server import MASK_MAX, MASK_MIN, Server

PAGE_FILES = (  # url, file in page/, type
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/app.js", "app.js", "text/javascript; charset=utf-8"),
    ("/style.css", "style.css", "text/css; charset=utf-8"),
)
# The page loads its own script and style and nothing else; no other site may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def create_app(
    weights,
    images_dir=None,
    *,
    model=None,
    cache_dir=None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    allowed_hosts=None,
    index: bool = True,
    log=None,
    show_bands=None,
):
    """The FastAPI app for `maecli serve` (tests drive it with its TestClient).

    Loads the model from `weights` on the default device unless `model` is given (`weights` still names the run
    folder), raising WeightsError for bad weights, and starts embedding `images_dir` in the background.
    `allowed_hosts` restricts the Host header to those names (serve() sets it when bound to loopback, so a web page
    elsewhere cannot reach the server through DNS rebinding); `app.state.server.close()` stops the background
    embedding.
    """
    require_extra()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    server = Server(
        weights,
        images_dir,
        model=model,
        cache_dir=cache_dir,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        index=index,
        log=log,
        show_bands=show_bands,
    )
    app = FastAPI(title="maecli serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    allowed_hosts = tuple(allowed_hosts) if allowed_hosts else None

    @app.middleware("http")
    async def guard_and_headers(request: Request, call_next):
        why = wrong_host(request.headers, allowed_hosts)
        if why is not None:
            response = JSONResponse({"detail": why}, status_code=400)
        elif request.url.path.startswith("/api/") and (why := cross_site(request.headers)) is not None:
            response = JSONResponse({"detail": why}, status_code=403)  # the page opens from links; the API does not
        else:
            response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"detail": str(e)}, status_code=e.status, headers=e.headers)

    page_routes(app)
    folder_routes(app, server)
    model_routes(app, server)
    run_routes(app, server)
    return app


def page_routes(app) -> None:
    """The page: three static files shipped in maecli/serve/page/, read once."""
    from importlib.resources import files

    from fastapi.responses import Response

    folder = files(__package__) / "page"
    for url, name, media_type in PAGE_FILES:
        app.get(url, include_in_schema=False)(static(Response, (folder / name).read_bytes(), media_type))


def static(response, body: bytes, media_type: str):
    """A route that sends `body`. It takes no arguments: FastAPI would read any from the query string."""

    def send():
        return response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return send


def folder_routes(app, server: Server) -> None:
    """The --images folder: its list, a file, a thumbnail."""
    from fastapi.responses import FileResponse, Response
    from starlette.concurrency import run_in_threadpool

    @app.get("/api/images")
    async def images():  # async: from memory, on the event loop, never waiting for a worker thread
        if server.folder is None:
            return {"folder": None, "images": []}
        return {"folder": str(server.folder.given), "images": list(server.folder.files)}

    @app.get("/api/image")
    def image(path: str):
        """The original file, for "open the original"."""
        if server.folder is None:
            raise Refused(404, "no image folder: start maecli serve with --images DIR")
        real, st = server.folder.file(path)
        return FileResponse(real, stat_result=st, headers={"Cache-Control": "no-cache"})

    @app.get("/api/thumb")
    async def thumb(path: str):
        with server.files.admit():  # admitted before a thread is taken: a flood of them cannot take them all
            data = await run_in_threadpool(server.thumbnail, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})


def model_routes(app, server: Server) -> None:
    """What runs the model: uploads, reconstructions, neighbours, and the model's description."""
    from fastapi import Query, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    mask_query = Query(0.75, ge=MASK_MIN, le=MASK_MAX, description="fraction of patches hidden")
    seed_query = Query(0, ge=0, le=2**63 - 1)

    @app.get("/api/info")
    async def info():
        return server.info()

    @app.post("/api/upload")
    async def upload(request: Request, name: str = Query("upload", max_length=1000)):
        """The image file as the request body, with the header X-Maecli: 1 (what the page's script sends)."""
        refusal = upload_refusal(request.headers)
        if refusal is not None:
            raise Refused(*refusal)
        with server.renders.admit():  # before the body is read: a full queue holds no uploads in memory
            data = await read_body(request, server.max_upload_bytes)
            return await run_in_threadpool(server.add_upload, data, name)

    async def reconstruction(path, upload, mask, seed, patch_stats, zoom):
        with server.renders.admit():
            return await run_in_threadpool(
                server.reconstruction, path, upload, mask, seed, patch_stats, zoom or server.zoom
            )

    @app.get("/api/reconstruct")
    async def reconstruct_json(
        path: str | None = None,
        upload: str | None = None,
        mask: float = mask_query,
        seed: int = seed_query,
        patch_stats: bool = True,
        zoom: int | None = Query(None, ge=1, le=16),
    ):
        """The four tiles as one PNG (a data URL: the same bytes `maecli reconstruct` writes), the hidden-patch
        error, and what the prediction borrows."""
        return (await reconstruction(path, upload, mask, seed, patch_stats, zoom))[0]

    @app.get("/api/reconstruct.png")
    async def reconstruct_png(
        path: str | None = None,
        upload: str | None = None,
        mask: float = mask_query,
        seed: int = seed_query,
        patch_stats: bool = True,
        zoom: int | None = Query(None, ge=1, le=16),
    ):
        png = (await reconstruction(path, upload, mask, seed, patch_stats, zoom))[1]
        return Response(png, media_type="image/png")

    @app.get("/api/neighbours")
    def neighbours(path: str | None = None, upload: str | None = None, k: int = Query(12, ge=1, le=100)):
        return server.neighbours(path, upload, k)

    @app.get("/api/index")
    async def index_status():
        if server.index is None:
            return {"state": "off"}
        return server.index.status()


async def read_body(request, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the upload is {int(declared) / 2**20:.1f} MB, over the limit of {limit / 2**20:g} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the upload goes on past the limit of {limit / 2**20:g} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def run_routes(app, server: Server) -> None:
    """The run folder's progress: the loss points and the previews."""
    from fastapi.responses import FileResponse

    @app.get("/api/run")
    def run():
        return server.progress()

    @app.get("/api/run/previews/{epoch}")
    def preview(epoch: int):
        path = preview_files(server.run).get(epoch)
        if path is None:
            raise Refused(404, f"no preview for epoch {epoch}")
        return FileResponse(path.resolve(), media_type="image/png", headers={"Cache-Control": "no-cache"})
