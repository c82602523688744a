"""`maecli serve`: a local web page over one model: reconstructions under a mask slider, the run's training
progress, and nearest neighbours in an image folder. FastAPI and uvicorn come with the `serve` extra and load
only here, on first use; the page itself (maecli/serve_page.py) is one inline HTML file that fetches nothing else.

Nothing is computed differently from the commands: reconstructions are `reconstruct()` + `render()` (the PNG
`maecli reconstruct` writes, byte for byte), and neighbours come from `maecli.embed` vectors.
"""

import base64
import hashlib
import io
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

from .errors import DataError, UserError

EXTRA_HINT = 'pip install "maecli[serve]"'
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 60_000_000  # a 60-megapixel photo decodes to 180 MB; a bomb of a few KB would claim gigabytes
UPLOADS_KEPT = 64  # prepared uploads remembered, so the slider can move without sending the file again
INPUTS_KEPT = 64  # folder images kept prepared for the slider
THUMBS_KEPT = 2048
DECODING = 2  # uploads decoded at once (up to MAX_PIXELS x 3 bytes each)
THUMB_SIDE = 160
EMBED_BATCH = 16  # small batches: the model lock is held per batch, and reconstructions wait behind it
METRIC_POINTS = 2000  # points of the loss curve sent to the page at most
MASK_MIN, MASK_MAX = 0.05, 0.95
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CACHE_VERSION = 1
CACHE_SAVE_S = 60  # a long first embedding saves what it has this often, so an interrupted start is not lost
PREVIEW_NAME = re.compile(r"epoch-(\d{1,9})\.png")


class MissingExtra(UserError):
    """The optional web stack is not installed."""


class Refused(Exception):
    """A request the server will not answer: an HTTP status and a one-line reason for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def require_extra() -> None:
    """Raise MissingExtra, naming the install command, unless FastAPI and uvicorn import."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingExtra(f"maecli serve needs FastAPI and uvicorn: {EXTRA_HINT}") from None


# ----------------------------------------------------------------------------------------------
# Images in: uploads and folder files, prepared exactly as `maecli reconstruct` prepares a file


def upload_pixels(data: bytes, in_chans: int, img_size: int, max_pixels: int = MAX_PIXELS):
    """Uploaded bytes -> uint8 (C, H, W), the pixels `data.decode` gives for the same file.

    The only preparation code for uploads: the size is checked from the header before any pixel is decoded,
    and a JPEG is decoded in draft mode at the model's size, as `decode(path, min_side=img_size)` does for a
    file (draft changes the pixels, so skipping it would break "same picture as the CLI").
    Raises Refused(400) with a reason the page can show.
    """
    from PIL import Image

    from . import data as D

    if not data:
        raise Refused(400, "the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.width * img.height
                if pixels > max_pixels:
                    raise Refused(
                        400,
                        f"the image has {img.width} x {img.height} = {pixels:,} pixels; the limit is "
                        f"{max_pixels:,} (a decompression bomb?)",
                    )
                if img.format == "JPEG":
                    img.draft("L" if in_chans == 1 else "RGB", (img_size, img_size))
                img.load()
                return D.from_pil(img, in_chans)
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001 -- every decoder failure is the upload's fault, told in a few words
        raise Refused(400, f"cannot read the upload: {D.describe_error(e)}") from None


def model_input(pixels, img_size: int, in_chans: int):
    """uint8 (C, H, W) -> (1, C, S, S) normalized: `data.eval_transform`, as reconstruct applies to a file."""
    from . import data as D

    return D.eval_transform(img_size, in_chans)(pixels).unsqueeze(0)


def thumbnail_jpeg(path: Path, side: int = THUMB_SIDE) -> bytes:
    """A small JPEG of a folder image for the page's grids (the whole image, EXIF orientation applied)."""
    from PIL import Image

    from . import data as D

    pixels = D.decode(path, 3, min_side=side)
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


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


# ----------------------------------------------------------------------------------------------
# What may be served: folder images by their relative path, previews by epoch


def check_relative(rel: str) -> None:
    """Refuse what is not a plain relative path inside a folder: `..`, absolute paths, backslashes, NULs. (Only
    listed files are served anyway; this says why, where a lookup would only say "not found".)"""
    if not rel:
        raise Refused(400, "no path given")
    if "\x00" in rel or "\\" in rel or rel.startswith("/") or ".." in rel.split("/"):
        raise Refused(403, f"refused {rel!r}: give a path relative to the image folder, without '..'")


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink followed, lies in `root` (already resolved)."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return False


class Folder:
    """The images under --images that may be served: found once, each checked to resolve inside the folder.

    A symlink that points out of the folder (a file, or a folder that find_images follows) is left out, and the
    check runs again on every request, in case a link changed since.
    """

    def __init__(self, root: str | os.PathLike):
        from . import data as D

        given = Path(root)
        if not given.is_dir():
            raise DataError(f"--images {given} is not a folder")
        self.given = given
        self.root = given.resolve()
        self.files: dict[str, Path] = {}
        self.left_out = 0
        for path in D.find_images(self.root):
            rel = path.relative_to(self.root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # a name that is not UTF-8 cannot travel in JSON
                self.left_out += 1
                continue
            if inside(path, self.root):
                self.files[rel] = path
            else:
                self.left_out += 1

    def path(self, rel: str) -> Path:
        """The file for a relative path from the page, resolved; Refused for anything else."""
        check_relative(rel)
        path = self.files.get(rel)
        if path is None:
            raise Refused(404, f"{rel} is not an image in the folder")
        if not inside(path, self.root):
            raise Refused(403, f"refused {rel}: it now leads out of the folder")
        return path.resolve()

    def stats(self) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of each file, what the embedding cache is keyed by; a vanished file is left out."""
        out = {}
        for rel, path in self.files.items():
            try:
                st = path.stat()
            except OSError:
                continue
            out[rel] = (st.st_size, st.st_mtime_ns)
        return out


def run_folder(weights: Path) -> Path:
    """The run folder of the weights: the folder given, or the one holding the weights file."""
    return weights if weights.is_dir() else weights.parent


def preview_files(run: Path) -> dict[int, Path]:
    """epoch -> previews/epoch-NNNN.png, only regular files inside the run folder."""
    folder = run / "previews"
    if not folder.is_dir():
        return {}
    root = run.resolve()
    out = {}
    for path in folder.iterdir():
        m = PREVIEW_NAME.fullmatch(path.name)
        if m and inside(path, root) and path.resolve().is_file():
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def read_metrics(path: Path, limit: int = METRIC_POINTS) -> list[dict]:
    """metrics.jsonl -> [{step, loss, lr, epoch}], thinned evenly to `limit` points (the last one kept).

    Training may be writing the file: a half-written last line, or any line that is not a JSON object with a
    finite step and loss, is skipped.
    """
    points = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                point = {k: row.get(k) for k in ("step", "loss", "lr", "epoch")}
                if all(isinstance(point[k], (int, float)) and math.isfinite(point[k]) for k in ("step", "loss")):
                    points.append({k: v for k, v in point.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    except OSError:
        return []
    if len(points) > limit:
        stride = len(points) / limit
        points = [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]
    return points


# ----------------------------------------------------------------------------------------------
# Similar images: the folder embedded once, cached on disk


def weights_digest(model) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, bytes): the same weights from any file format."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def default_cache_dir(run: Path) -> Path:
    """serve-cache/ in the run folder where it can be written, else the user's cache folder."""
    folder = run / "serve-cache"
    if os.access(folder if folder.exists() else run, os.W_OK):
        return folder
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "maecli" / "serve"


class Index:
    """The folder's embeddings (`maecli.embed`, mean pool), built in a background thread and cached on disk.

    The cache file is named by the weights' digest and the folder; inside, each file's vector is kept with the
    file's size and mtime, so a second start reuses every unchanged file (instant) and embeds only what is new.
    Unreadable files are remembered too, so they are not retried on every start.
    """

    def __init__(self, folder: Folder, cache_dir: Path, log=None):
        self.folder = folder
        self.cache_dir = cache_dir
        self.log = log or (lambda message: None)
        self.state = "waiting"
        self.done = 0
        self.total = len(folder.files)
        self.reused = 0
        self.skipped: dict[str, str] = {}
        self.error = None
        self.seconds = 0.0
        self.names: list[str] = []
        self.rows: dict[str, int] = {}
        self.vectors = None  # (N, D) unit vectors in the order of `names`, set when ready
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.cache_path: Path | None = None
        self.dim = 0

    # -- building

    def start(self, model, model_lock: threading.Lock, digest: str) -> threading.Thread:
        thread = threading.Thread(
            target=self._build_safely, args=(model, model_lock, digest), name="maecli-serve-index", daemon=True
        )
        thread.start()
        return thread

    def _build_safely(self, model, model_lock, digest):
        try:
            self.build(model, model_lock, digest)
        except Exception as e:  # noqa: BLE001 -- shown on the page and in the log; reconstruction keeps working
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            self.log(f"warning: could not index {self.folder.given}: {self.error}")
        finally:
            self.ready.set()

    def build(self, model, model_lock: threading.Lock, digest: str) -> None:
        import torch

        from . import __version__
        from . import data as D
        from .embedding import embed

        start = time.perf_counter()
        self.state = "building"
        key = hashlib.sha256(f"{digest}|{self.folder.root}|mean|{__version__}|{CACHE_VERSION}".encode()).hexdigest()
        self.cache_path = self.cache_dir / f"embeddings-{key[:24]}"
        stats = self.folder.stats()
        vectors, skipped, entries = self._read_cache(stats, digest)
        self.reused = len(vectors)
        self.skipped = {rel: why for rel, (_, _, why) in skipped.items()}
        todo = [rel for rel in stats if rel not in vectors and rel not in skipped]
        self.total = len(stats)
        self.done = self.reused + len(skipped)
        if todo:
            self.log(
                f"embedding {len(todo)} image(s) of {self.folder.given}"
                + (f" ({self.reused} from the cache)" if self.reused else "")
            )
        cfg = model.cfg
        self.dim = cfg.embed_dim
        saved = time.monotonic()
        for i in range(0, len(todo), EMBED_BATCH):
            if self.stop.is_set():  # keep what is done: the next start goes on from there
                self._write_cache(vectors, stats, skipped, digest)
                self.state = "stopped"
                return
            if time.monotonic() - saved > CACHE_SAVE_S:
                self._write_cache(vectors, stats, skipped, digest)
                saved = time.monotonic()
            names, pixels = [], []
            for rel in todo[i : i + EMBED_BATCH]:  # decoded outside the lock: requests keep flowing meanwhile
                try:
                    pixels.append(D.decode(self.folder.path(rel), cfg.in_chans, min_side=cfg.img_size))
                    names.append(rel)
                except Refused as e:
                    skipped[rel] = (*stats[rel], str(e))
                except Exception as e:  # noqa: BLE001 -- an unreadable file is left out, as embed skips it
                    skipped[rel] = (*stats[rel], D.describe_error(e))
                if rel in skipped:
                    self.skipped[rel] = skipped[rel][2]
            if pixels:
                with model_lock:
                    batch = embed(model, pixels, pool="mean", batch_size=EMBED_BATCH)
                for rel, v in zip(names, batch.numpy()):
                    vectors[rel] = v
            self.done = len(vectors) + len(skipped)
        order, matrix = self._matrix(vectors, stats, cfg.embed_dim)
        if todo or entries != len(order) + len(skipped):  # new files, or entries of files gone or changed
            self._write_cache(vectors, stats, skipped, digest)
        self.names = order
        self.rows = {rel: i for i, rel in enumerate(order)}
        self.vectors = torch.nn.functional.normalize(torch.from_numpy(matrix), dim=-1)
        self.seconds = time.perf_counter() - start
        self.state = "ready"
        self.log(
            f"{len(order)} image(s) of {self.folder.given} ready for search in {self.seconds:.1f}s"
            + (f", {len(todo)} embedded" if todo else ", all from the cache")
            + (f"; {len(skipped)} unreadable" if skipped else "")
        )

    def _read_cache(self, stats, digest) -> tuple[dict, dict, int]:
        """Vectors and skips from the cache for files whose size and mtime did not change, and how many entries
        the cache held (({}, {}, 0) when there is none, or it does not fit)."""
        import numpy as np

        meta_path, npy_path = self.cache_path.with_suffix(".json"), self.cache_path.with_suffix(".npy")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            matrix = np.load(npy_path, allow_pickle=False)
        except (OSError, ValueError):
            return {}, {}, 0
        vectors, skipped = {}, {}
        try:
            if (
                meta.get("weights") != digest
                or meta.get("version") != CACHE_VERSION
                or matrix.ndim != 2
                or matrix.dtype != np.float32
                or matrix.shape[0] != len(meta["files"])
            ):
                return {}, {}, 0
            for rel, (size, mtime, row) in meta["files"].items():
                if stats.get(rel) == (size, mtime):
                    vectors[rel] = matrix[row]
            for rel, (size, mtime, why) in meta["skipped"].items():
                if stats.get(rel) == (size, mtime):
                    skipped[rel] = (size, mtime, str(why))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # a cache of another shape: ignore it
            return {}, {}, 0
        return vectors, skipped, matrix.shape[0] + len(meta["skipped"])

    @staticmethod
    def _matrix(vectors: dict, stats: dict, dim: int):
        """The vectors in folder order: (names, float32 (N, D) array)."""
        import numpy as np

        order = [rel for rel in stats if rel in vectors]
        if not order:
            return order, np.zeros((0, dim), np.float32)
        return order, np.stack([vectors[rel] for rel in order]).astype(np.float32)

    def _write_cache(self, vectors, stats, skipped, digest) -> None:
        import numpy as np

        from .files import write_bytes

        order, matrix = self._matrix(vectors, stats, self.dim)
        buf = io.BytesIO()
        np.save(buf, matrix, allow_pickle=False)
        meta = {
            "version": CACHE_VERSION,
            "weights": digest,
            "folder": str(self.folder.root),
            "pool": "mean",
            "files": {rel: [*stats[rel], i] for i, rel in enumerate(order)},
            "skipped": {rel: list(v) for rel, v in skipped.items()},
        }
        try:  # vectors first, then the index that points into them: a reader never sees one without the other
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_bytes(self.cache_path.with_suffix(".npy"), buf.getvalue())
            write_bytes(self.cache_path.with_suffix(".json"), json.dumps(meta).encode())
        except OSError as e:  # no cache is slower next time, not wrong
            self.log(f"warning: cannot write the embedding cache {self.cache_path}: {e.strerror or e}")

    # -- searching

    def status(self) -> dict:
        return {
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "reused": self.reused,
            "skipped": len(self.skipped),
            "error": self.error,
            "seconds": round(self.seconds, 2),
        }

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state in ("waiting", "building"):
            raise Refused(
                503, f"the folder is still being embedded ({self.done} of {self.total} images); try again in a moment"
            )
        raise Refused(503, f"the folder could not be indexed: {self.error or self.state}")

    def nearest(self, query, k: int, exclude: str | None = None) -> list[dict]:
        """The k most similar folder images to `query` (D,), by cosine similarity, best first."""
        import torch

        self.require_ready()
        if self.vectors.shape[0] == 0:
            return []
        q = torch.nn.functional.normalize(query.float().reshape(-1), dim=0)
        sims = self.vectors @ q
        if exclude is not None and exclude in self.rows:
            sims[self.rows[exclude]] = -math.inf
        k = min(k, sims.shape[0] - (exclude in self.rows))
        if k <= 0:
            return []
        top = torch.topk(sims, k)
        return [
            {"path": self.names[i], "similarity": round(float(s), 4)}
            for s, i in zip(top.values.tolist(), top.indices.tolist())
        ]


# ----------------------------------------------------------------------------------------------
# The app


def page_zoom(img_size: int) -> int:
    """Enlarge small models' tiles to about 256 px on the page (the same `--zoom` the CLI would take)."""
    return max(1, min(16, round(256 / img_size)))


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
    ):
        self.log = log or (lambda message: None)
        self.weights = Path(weights)
        self.folder = Folder(images_dir) if images_dir is not None else None
        if model is None:
            import maecli

            from .runtime import default_device

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
        self.zoom = page_zoom(self.model.cfg.img_size)
        self.index = None
        if self.folder is not None and index:
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.run)
            self.index = Index(self.folder, cache, log=self.log)
            if self.folder.left_out:
                self.log(
                    f"warning: {self.folder.left_out} file(s) of {self.folder.given} left out: links out of the "
                    "folder or names that are not UTF-8"
                )
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
        path = self.folder.path(rel)
        st = path.stat()
        key = (rel, st.st_size, st.st_mtime_ns)
        cached = self.inputs.get(key)
        if cached is not None:
            return cached
        from . import data as D

        cfg = self.model.cfg
        try:
            pixels = D.decode(path, cfg.in_chans, min_side=cfg.img_size)  # as reconstruct reads a file
        except Exception as e:  # noqa: BLE001 -- any decoder failure: the file's fault, said on the page
            raise Refused(400, f"cannot read {rel}: {D.describe_error(e, path)}") from None
        return self.inputs.put(key, model_input(pixels, cfg.img_size, cfg.in_chans))

    def add_upload(self, data: bytes, name: str) -> dict:
        cfg = self.model.cfg
        name = clean_name(name)
        with self.decoding:
            pixels = upload_pixels(data, cfg.in_chans, cfg.img_size, self.max_pixels)
            x = model_input(pixels, cfg.img_size, cfg.in_chans)
        vector = None
        if self.index is not None:
            from .embedding import embed

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
        from .reconstruct import png_bytes, reconstruct, render

        if not self.model.has_decoder:
            raise Refused(
                409, "these weights hold only the encoder: reconstruction needs the decoder (similar images still work)"
            )
        name, x = self.source(path, upload)
        with self.model_lock:
            rec = reconstruct(self.model, x, mask_ratio=mask, seed=seed, use_patch_stats=patch_stats, names=[name])
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
            "mask_range": [MASK_MIN, MASK_MAX],
            "limits": {"upload_bytes": self.max_upload_bytes, "pixels": self.max_pixels},
        }

    def progress(self) -> dict:
        metrics = self.run / "metrics.jsonl"
        return {
            "run": str(self.run),
            "previews": list(preview_files(self.run)),
            "metrics": read_metrics(metrics) if metrics.is_file() and inside(metrics, self.run.resolve()) else [],
        }


def clean_name(name: str | None) -> str:
    """An upload's file name for captions: the last component, printable, short."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()[:120]
    return name or "upload"


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
):
    """The FastAPI app for `maecli serve` (tests drive it with its TestClient).

    Loads the model from `weights` on the default device unless `model` is given (`weights` still names the run
    folder), raising WeightsError for bad weights, and starts embedding `images_dir` in the background.
    `allowed_hosts` restricts the Host header (serve() sets it to the loopback names when bound to loopback, so
    a web page elsewhere cannot reach the server through DNS rebinding); `app.state.server.close()` stops the
    background embedding.
    """
    require_extra()
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from .serve_page import PAGE

    server = Server(
        weights,
        images_dir,
        model=model,
        cache_dir=cache_dir,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        index=index,
        log=log,
    )
    app = FastAPI(title="maecli serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        # the page is self-contained: nothing may load from elsewhere, and no other site may frame it
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    mask_query = Query(0.75, ge=MASK_MIN, le=MASK_MAX, description="fraction of patches hidden")
    seed_query = Query(0, ge=0, le=2**63 - 1)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})

    @app.get("/api/info")
    def info():
        return server.info()

    @app.get("/api/images")
    def images():
        if server.folder is None:
            return {"folder": None, "images": []}
        return {"folder": str(server.folder.given), "images": list(server.folder.files)}

    @app.get("/api/image")
    def image(path: str):
        """The original file, for "open the original"."""
        if server.folder is None:
            raise Refused(404, "no image folder: start maecli serve with --images DIR")
        return FileResponse(server.folder.path(path), headers={"Cache-Control": "no-cache"})

    @app.get("/api/thumb")
    def thumb(path: str):
        if server.folder is None:
            raise Refused(404, "no image folder: start maecli serve with --images DIR")
        real = server.folder.path(path)
        st = real.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        data = server.thumbs.get(key)
        if data is None:
            from . import data as D

            try:
                data = server.thumbs.put(key, thumbnail_jpeg(real))
            except Exception as e:  # noqa: BLE001 -- as above: an unreadable file, said on the page
                raise Refused(400, f"cannot read {path}: {D.describe_error(e, real)}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @app.post("/api/upload")
    async def upload(request: Request, name: str = Query("upload", max_length=1000)):
        """The image file as the request body (what `fetch(url, {body: file})` sends)."""
        limit = server.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the upload is {int(declared) / 2**20:.1f} MB, over the limit of {limit / 2**20:g} MB")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the upload goes on past the limit of {limit / 2**20:g} MB")
            chunks.append(chunk)
        return await run_in_threadpool(server.add_upload, b"".join(chunks), name)

    def reconstruction(path, upload, mask, seed, patch_stats, zoom):
        return server.reconstruction(path, upload, mask, seed, patch_stats, zoom or server.zoom)

    @app.get("/api/reconstruct")
    def reconstruct_json(
        path: str | None = None,
        upload: str | None = None,
        mask: float = mask_query,
        seed: int = seed_query,
        patch_stats: bool = True,
        zoom: int | None = Query(None, ge=1, le=16),
    ):
        """The four tiles as one PNG (a data URL: the same bytes `maecli reconstruct` writes), the hidden-patch
        error, and what the prediction borrows."""
        return reconstruction(path, upload, mask, seed, patch_stats, zoom)[0]

    @app.get("/api/reconstruct.png")
    def reconstruct_png(
        path: str | None = None,
        upload: str | None = None,
        mask: float = mask_query,
        seed: int = seed_query,
        patch_stats: bool = True,
        zoom: int | None = Query(None, ge=1, le=16),
    ):
        return Response(reconstruction(path, upload, mask, seed, patch_stats, zoom)[1], media_type="image/png")

    @app.get("/api/neighbours")
    def neighbours(path: str | None = None, upload: str | None = None, k: int = Query(12, ge=1, le=100)):
        return server.neighbours(path, upload, k)

    @app.get("/api/index")
    def index_status():
        if server.index is None:
            return {"state": "off"}
        return server.index.status()

    @app.get("/api/run")
    def run():
        return server.progress()

    @app.get("/api/run/previews/{epoch}")
    def preview(epoch: int):
        path = preview_files(server.run).get(epoch)
        if path is None:
            raise Refused(404, f"no preview for epoch {epoch}")
        return FileResponse(path.resolve(), media_type="image/png", headers={"Cache-Control": "no-cache"})

    return app


# ----------------------------------------------------------------------------------------------
# Serving


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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    weights, images=None, host: str = "127.0.0.1", port: int = 8000, *, model=None, cache_dir=None, log=None, ready=None
) -> None:
    """Serve the page until Ctrl-C (or SIGTERM). Raises UserError (bad weights or folder, port taken) and,
    after a clean shutdown on Ctrl-C, KeyboardInterrupt.

    `model` is the loaded `weights` if the caller has it; `ready(url)` is called once the server accepts
    connections (default: print the address on stderr). Messages go to `log` (default: stderr).
    """
    require_extra()
    import uvicorn

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    sock = listen(host, port)
    server = None
    try:
        loopback = is_loopback(host)
        if not loopback:
            log(f"warning: listening on {host}: anyone who can reach this machine can use the page (no login)")
        app = create_app(
            weights,
            images,
            model=model,
            cache_dir=cache_dir,
            log=log,
            allowed_hosts=[*LOOPBACK, "[::1]"] if loopback else None,
        )
        server = app.state.server
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}/"

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
