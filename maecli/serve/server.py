"""The server's state and work: the model with its lock, the folder, its index, the uploads and the caches, and
the three features (reconstruction, neighbours, progress) as plain methods the routes call."""

import base64
import hashlib
import shlex
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from .errors import Refused
from .folder import Folder, progress, run_folder
from .images import MAX_PIXELS, MAX_UPLOAD_BYTES, clean_name, model_input, thumbnail_jpeg, upload_pixels
from .index import Index, default_cache_dir, weights_digest

UPLOADS_KEPT = 64  # prepared uploads remembered, so the slider can move without sending the file again
INPUTS_KEPT = 64  # folder images kept prepared for the slider
THUMBS_KEPT = 2048
DECODING = 2  # uploads decoded at once (up to MAX_PIXELS x 3 bytes each)
RENDERS_ADMITTED = 8  # requests that run the model, admitted at once (one runs, the rest wait for it); more: 503
FILES_ADMITTED = 16  # thumbnails being made at once; more: 503
MASK_MIN, MASK_MAX = 0.05, 0.95
MAX_TILE_SIDE = 1024


class LRU:
    """A small thread-safe least-recently-used map."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key, value):
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class Gate:
    """At most `size` requests of one kind admitted at once; one more is refused at the door with 503 and
    Retry-After. The routes admit on the event loop, before a worker thread is taken, so admitted requests hold at
    most `size` of the thread pool's threads (40), and the cheap requests (the model's description, the run's
    progress, the lists) never queue behind the model."""

    def __init__(self, size: int, what: str):
        self.size = size
        self.what = what
        self.admitted = 0
        self.lock = threading.Lock()

    @contextmanager
    def admit(self):
        with self.lock:
            if self.admitted >= self.size:
                raise Refused(
                    503,
                    f"the server is busy: {self.size} {self.what} are queued already; try again in a moment",
                    headers={"Retry-After": "1"},
                )
            self.admitted += 1
        try:
            yield
        finally:
            with self.lock:
                self.admitted -= 1


def max_zoom(img_size: int) -> int:
    """The largest zoom the page draws: tiles of at most MAX_TILE_SIDE px, so a picture holds at most 4 x 1024^2
    pixels whatever is asked (a zoom of 16 on a 224 px model would draw four 3584 px tiles, 150 MB each)."""
    return max(1, min(16, MAX_TILE_SIDE // img_size))


def page_zoom(img_size: int) -> int:
    """Enlarge small models' tiles on the page as `maecli reconstruct` does by default."""
    from ..reconstruct import readable_zoom

    return readable_zoom(img_size)


class Server:
    """Everything a request needs: the model and its lock, the folder, its index, uploads, the run folder."""

    def __init__(
        self,
        weights,
        images_dir=None,
        *,
        model=None,
        cache_dir=None,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_pixels=MAX_PIXELS,
        index=True,
        log=None,
        show_bands=None,
    ):
        self.log = log or (lambda message: None)
        self.show_bands = tuple(show_bands) if show_bands else None  # the bands pictured (reconstruct --show-bands)
        self.weights = Path(weights)
        self.folder = Folder(images_dir) if images_dir is not None else None
        if model is None:
            import maecli

            from ..runtime import default_device

            model = maecli.load(self.weights).to(default_device())
        self.model = model.eval()
        self.device = str(next(model.parameters()).device)
        self.model_lock = threading.Lock()  # one forward at a time: reconstruct and embed switch the model's mode
        self.run = run_folder(self.weights)
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.uploads = LRU(UPLOADS_KEPT)
        self.inputs = LRU(INPUTS_KEPT)
        self.thumbs = LRU(THUMBS_KEPT)
        self.decoding = threading.BoundedSemaphore(DECODING)  # big uploads at once would each hold their pixels
        self.renders = Gate(RENDERS_ADMITTED, "requests for the model")
        self.files = Gate(FILES_ADMITTED, "thumbnails")
        self.zoom = page_zoom(self.model.cfg.img_size)
        self.index = None
        if self.folder is not None and index:
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.run)
            self.index = Index(self.folder, cache, log=self.log)
            if self.folder.left_out:
                why = ", ".join(f"{n} {reason}" for reason, n in self.folder.left_out.items())
                self.log(f"warning: {self.folder.left_out.total()} file(s) of {self.folder.given} left out: {why}")
            self.indexing = self.index.start(self.model, self.model_lock, weights_digest(self.model))

    def close(self, wait: float = 10.0):
        """Stop the background embedding (it stops between batches) and wait for it up to `wait` seconds."""
        if self.index is not None:
            self.index.stop.set()
            self.indexing.join(wait)

    # -- sources: an image from the folder or an upload, as (name, model input, vector or None)

    def folder_input(self, rel: str):
        if self.folder is None:
            raise Refused(404, "no image folder: start maecli serve with --images DIR")
        path, st = self.folder.file(rel)
        key = (rel, st.st_size, st.st_mtime_ns)
        cached = self.inputs.get(key)
        if cached is not None:
            return cached
        from .. import data as D

        cfg = self.model.cfg
        try:
            pixels = D.decode(path, cfg.pixels, min_side=cfg.img_size, resize_to=cfg.img_size)  # as reconstruct does
        except Exception as e:  # noqa: BLE001 -- any decoder failure: the file's fault, said on the page
            raise Refused(400, f"cannot read {rel}: {D.describe_error(e, path)}") from None
        return self.inputs.put(key, model_input(pixels, cfg.img_size, cfg.pixels))

    def thumbnail(self, rel: str) -> bytes:
        """A small JPEG of a folder image, made once per version of the file."""
        if self.folder is None:
            raise Refused(404, "no image folder: start maecli serve with --images DIR")
        path, st = self.folder.file(rel)
        key = (rel, st.st_size, st.st_mtime_ns)
        data = self.thumbs.get(key)
        if data is None:
            from .. import data as D

            try:
                data = self.thumbs.put(
                    key, thumbnail_jpeg(path, pixels=self.model.cfg.pixels, show_bands=self.show_bands)
                )
            except Exception as e:  # noqa: BLE001 -- an unreadable file, said on the page
                raise Refused(400, f"cannot read {rel}: {D.describe_error(e, path)}") from None
        return data

    def add_upload(self, data: bytes, name: str) -> dict:
        cfg = self.model.cfg
        name = clean_name(name)
        with self.decoding:
            pixels = upload_pixels(data, cfg.pixels, cfg.img_size, self.max_pixels)
            x = model_input(pixels, cfg.img_size, cfg.pixels)
        vector = None
        if self.index is not None:
            from ..embedding import embed

            with self.model_lock:
                vector = embed(self.model, [pixels], pool="mean")[0]
        upload_id = hashlib.sha256(name.encode() + b"\0" + data).hexdigest()[:20]
        self.uploads.put(upload_id, {"name": name, "input": x, "vector": vector})
        return {"id": upload_id, "name": name}

    def upload(self, upload_id: str) -> dict:
        entry = self.uploads.get(upload_id)
        if entry is None:
            raise Refused(
                404, "this upload is no longer on the server (restarted, or many uploads since): upload it again"
            )
        return entry

    def source(self, path: str | None, upload: str | None):
        if (path is None) == (upload is None):
            raise Refused(400, "give either path (an image of the folder) or upload (an upload's id)")
        if path is not None:
            return path, self.folder_input(path)
        entry = self.upload(upload)
        return entry["name"], entry["input"]

    # -- the three features

    def reconstruction(self, path, upload, mask: float, seed: int, patch_stats: bool, zoom: int) -> tuple[dict, bytes]:
        from ..reconstruct import png_bytes, reconstruct, render

        if not self.model.has_decoder:
            raise Refused(
                409, "these weights hold only the encoder: reconstruction needs the decoder (similar images still work)"
            )
        if zoom > max_zoom(self.model.cfg.img_size):
            side = self.model.cfg.img_size
            raise Refused(
                400, f"zoom {zoom} would draw {side * zoom} px tiles; at most {max_zoom(side)} for this {side} px model"
            )
        name, x = self.source(path, upload)
        with self.model_lock:
            rec = reconstruct(
                self.model,
                x,
                mask_ratio=mask,
                seed=seed,
                use_patch_stats=patch_stats,
                names=[name],
                show_bands=self.show_bands,
            )
        png = png_bytes(render(rec, zoom))
        record = rec.records()[0]
        patches = record["patches"]
        shown = str(self.folder.given / path) if path is not None else name
        command = ["maecli", "reconstruct", shown, "-w", str(self.weights), "--mask", f"{mask:g}", "--seed", str(seed)]
        if not patch_stats:
            command.append("--no-patch-stats")
        if zoom > 1:
            command += ["--zoom", str(zoom)]
        return {
            **record,
            "name": name,
            "zoom": zoom,
            "legend": rec.legend(),
            "note": rec.note("untick patch statistics"),
            "warning": (
                f"at mask {mask:g} none of the {patches} patches stays visible: the decoder sees nothing but position"
            )
            if record["hidden"] == patches
            else None,
            "command": shlex.join(command),
            "image": "data:image/png;base64," + base64.b64encode(png).decode(),
        }, png

    def neighbours(self, path, upload, k: int) -> dict:
        if self.index is None:
            raise Refused(404, "no image folder to search: start maecli serve with --images DIR")
        if (path is None) == (upload is None):
            raise Refused(400, "give either path (an image of the folder) or upload (an upload's id)")
        if path is not None:
            self.folder.path(path)  # the same refusals as every other path
            self.index.require_ready()
            row = self.index.rows.get(path)
            if row is None:
                raise Refused(400, f"cannot read {path}: {self.index.skipped.get(path, 'not embedded')}")
            return {"query": path, "results": self.index.nearest(self.index.vectors[row], k, exclude=path)}
        entry = self.upload(upload)
        self.index.require_ready()
        return {"query": entry["name"], "results": self.index.nearest(entry["vector"], k)}

    def info(self) -> dict:
        cfg = self.model.cfg
        return {
            "weights": str(self.weights),
            "device": self.device,
            "has_decoder": self.model.has_decoder,
            "model": {
                "img_size": cfg.img_size,
                "patch_size": cfg.patch_size,
                "in_chans": cfg.in_chans,
                "embed_dim": cfg.embed_dim,
                "depth": cfg.depth,
                "patches": cfg.num_patches,
                "norm_pix_loss": cfg.norm_pix_loss,
            },
            "images": str(self.folder.given) if self.folder is not None else None,
            "zoom": self.zoom,
            "max_zoom": max_zoom(cfg.img_size),
            "mask_range": [MASK_MIN, MASK_MAX],
            "limits": {"upload_bytes": self.max_upload_bytes, "pixels": self.max_pixels},
        }

    def progress(self) -> dict:
        return progress(self.run)
