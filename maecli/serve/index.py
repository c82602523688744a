"""Similar images: the --images folder embedded once in a background thread (`maecli.embed`, mean pool), cached
on disk per file, and searched by cosine similarity."""

import hashlib
import io
import json
import math
import os
import threading
import time
from pathlib import Path

from .errors import Refused
from .folder import Folder

EMBED_BATCH = 16  # small batches: the model lock is held per batch, and reconstructions wait behind it
CACHE_VERSION = 1
CACHE_FOLDER = "serve-cache"  # in the run folder; the only file the page writes there
CACHE_SAVE_S = 60  # a long first embedding saves what it has this often, so an interrupted start is not lost


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
    folder = run / CACHE_FOLDER
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

        from .. import __version__
        from .. import data as D
        from ..embedding import embed

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
                    side = cfg.img_size
                    pixels.append(D.decode(self.folder.path(rel), cfg.pixels, min_side=side, resize_to=side))
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

        from ..files import write_bytes

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
